"""The ``calibration`` command: a teacher-forced pass of a fairseq checkpoint over one split,
giving per target token the confidence of the prediction and whether it is right; the
metrics of these (ECE, NLL, AURC, the reliability diagram) are fairseq_pskd/calibration.py's."""
import os
from pathlib import Path

# importing the package (fairseq_pskd) put torch >= 2.6's checkpoint allow-list and the
# criterion's registration in place for when torch and fairseq are imported (__init__.py)
from ..calibration import calibration_metrics, plot_reliability
from .common import EvaluationError, write_json

__all__ = ["collect_token_statistics", "load_model", "cmd_calibration"]


def collect_token_statistics(model, task, subset, max_tokens=None, batch_size=None,
                             device="cpu", skip_invalid_size_inputs=False):
    """Teacher-forced pass over ``subset``: per non-pad target token, the max-softmax
    confidence and whether the argmax is the reference token, plus the summed NLL (nats).

    Returns ``(confidence float64[N], correct bool[N], nll_sum, num_sentences)``.
    """
    import torch
    from fairseq import utils

    dataset = task.dataset(subset)
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=skip_invalid_size_inputs, required_batch_size_multiple=1,
        seed=1, num_shards=1, shard_id=0, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    pad = task.target_dictionary.pad()
    confs, corrects = [], []
    nll_sum, n_sent = 0.0, 0
    model.eval()  # no dropout: the model as it translates
    with torch.no_grad():
        for sample in itr:
            if not sample or "net_input" not in sample:
                continue
            if device != "cpu":
                sample = utils.move_to_cuda(sample)
            net_output = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(net_output, log_probs=True).float()
            target = sample["target"]
            mask = target.ne(pad)
            max_lp, pred = lprobs.max(dim=-1)
            tgt_lp = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            confs.append(max_lp[mask].exp().double().cpu())
            corrects.append(pred[mask].eq(target[mask]).cpu())
            nll_sum -= float(tgt_lp[mask].double().sum())
            n_sent += int(sample["nsentences"]) if "nsentences" in sample else target.size(0)
    if not confs:
        raise EvaluationError(f"no batches in subset {subset!r}")
    return (torch.cat(confs).numpy(), torch.cat(corrects).numpy().astype(bool), nll_sum, n_sent)


def load_model(path, data_bin, use_cuda):
    import pickle

    from fairseq import checkpoint_utils
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides={"data": str(data_bin)})
    except pickle.UnpicklingError as e:
        # torch's safe loader refused an object that is not on the plugin's allow-list
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), str(e))
        raise EvaluationError(f"cannot load {path} with torch's weights-only loader: {detail}") from e
    model = models[0]
    model.float()  # fp16-trained checkpoints: score in float32
    if use_cuda:
        model.cuda()
    return model, task


def cmd_calibration(args):
    if not os.path.isfile(args.path):
        raise EvaluationError(f"checkpoint not found: {args.path}")
    if not os.path.isdir(args.data_bin):
        raise EvaluationError(f"data-bin directory not found: {args.data_bin}")
    if args.bins < 1:
        raise EvaluationError("--bins must be >= 1")
    import torch

    use_cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if use_cuda else "cpu"
    max_tokens = args.max_tokens
    if max_tokens is None and args.batch_size is None:
        max_tokens = 4096
    model, task = load_model(args.path, args.data_bin, use_cuda)
    try:
        task.load_dataset(args.subset, combine=False, epoch=1)
    except FileNotFoundError as e:
        raise EvaluationError(f"cannot load subset {args.subset!r} from {args.data_bin}: {e}") from e
    confidence, correct, nll_sum, n_sent = collect_token_statistics(
        model, task, args.subset, max_tokens=max_tokens, batch_size=args.batch_size,
        device=device, skip_invalid_size_inputs=args.skip_invalid_size_inputs)
    result = calibration_metrics(confidence, correct, nll_sum=nll_sum, n_bins=args.bins)
    result = {"checkpoint": str(args.path), "data_bin": str(args.data_bin), "subset": args.subset,
              "device": device, "num_sentences": n_sent, **result}

    print(f"subset {args.subset}: {n_sent} sentences, {result['num_tokens']} target tokens "
          f"(teacher forcing, incl. EOS), device {device}")
    print(f"ECE       {100 * result['ece']:.2f}%  ({args.bins} equal-width bins)")
    print(f"accuracy  {100 * result['accuracy']:.2f}%  (mean confidence {100 * result['mean_confidence']:.2f}%)")
    print(f"NLL       {result['nll']:.4f} nats/token  (ppl {result['ppl']:.2f})")
    print(f"AURC      {1000 * result['aurc']:.2f}  (x1000)")
    print(f"E-AURC    {1000 * result['eaurc']:.2f}  (x1000; optimal AURC {1000 * result['optimal_aurc']:.2f})")
    if args.png:
        plot_reliability(result["reliability"], args.png, title=args.title or Path(args.path).name,
                         ece=result["ece"])
        print(f"reliability diagram: {args.png}")
    if args.json:
        write_json(args.json, result)
    return result
