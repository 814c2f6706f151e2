"""``score``: decode and score any raw test set with a finished run (output in
RUN_DIR/score-NAME)."""
import json
import os
import shutil
from pathlib import Path

from .common import ExperimentError, finished_run, log, run_logged
from .decode import evaluate_test_set

__all__ = ["score"]


def score(args):
    """Score a finished run on any raw parallel text: the run's own preprocessing (the
    prepared data's normalisation, Moses tokenisation, sentencepiece model and dictionary),
    its checkpoint and decoding settings; BLEU/chrF and calibration."""
    from ..prepare import binarize, subword, text
    from ..prepare.errors import PrepareError

    run_dir, results, prepared, manifest = finished_run(args.run)
    src, tgt = results["src"], results["tgt"]
    data_bin = prepared / manifest.get("data_bin", "data-bin")
    ckpt = Path(results["checkpoint"])
    try:
        src_lines, ref_lines = text.read_lines(args.src), text.read_lines(args.ref)
    except PrepareError as e:
        raise ExperimentError(str(e)) from None
    if not src_lines or len(src_lines) != len(ref_lines):
        raise ExperimentError(f"{args.src} has {len(src_lines)} lines and {args.ref} "
                              f"{len(ref_lines)}: they must be parallel and not empty")
    name = args.name or Path(args.src).name.split(".")[0]
    out = Path(args.out).resolve() if args.out else run_dir / f"score-{name}"
    enc, bin_dir = out / "encoded", out / "data-bin"
    out.mkdir(parents=True, exist_ok=True)
    for old in ("generate.test.txt", "score.test.json", "calibration.test.json"):
        (out / old).unlink(missing_ok=True)  # from an earlier score into OUT: never reused
    # the preprocessing of scripts/prepare-*.sh (prepare/pipeline.py), as its manifest records
    normalize = manifest.get("text", {}).get("normalize_punctuation", True)
    sp = subword.load(prepared / manifest["spm"]["model"])
    for lang, lines in ((src, src_lines), (tgt, ref_lines)):
        tok = text.tokenize_lines(lines, lang, normalize=normalize, label=f"{name}.{lang}")
        text.write_lines(enc / f"test.{lang}", subword.encode(sp, tok))
    text.write_lines(out / f"ref.{tgt}", map(text.squash_whitespace, ref_lines))
    if bin_dir.exists():
        shutil.rmtree(bin_dir)
    cmd = binarize.find_preprocess() + [
        "--source-lang", src, "--target-lang", tgt, "--testpref", str(enc / "test"),
        "--destdir", str(bin_dir), "--srcdict", str(data_bin / f"dict.{src}.txt"),
        "--tgtdict", str(data_bin / f"dict.{tgt}.txt"), "--workers", "1"]
    run_logged(cmd, out / "preprocess.log")
    args.beam, args.lenpen = results["beam"], results["lenpen"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    title = f"{results['name']} ({name})"
    scored = evaluate_test_set(bin_dir, src, tgt, ckpt, "test", out / f"ref.{tgt}", out, args, env, title)
    report = {"run": str(run_dir), "name": results["name"], "test_set": name,
              "src": str(Path(args.src).resolve()), "ref": str(Path(args.ref).resolve()),
              "checkpoint": str(ckpt), "beam": args.beam, "lenpen": args.lenpen, **scored}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{results['name']} on {name} ({scored['sentences']} sentences, beam {args.beam}, "
          f"lenpen {args.lenpen}):")
    print(f"BLEU = {scored['bleu']:.2f}  {scored['bleu_signature']}")
    print(f"chrF = {scored['chrf']:.2f}  {scored['chrf_signature']}")
    print(f"ECE {100 * scored['ece']:.2f}% ({args.bins} bins), NLL {scored['nll']:.3f}, "
          f"AURC x1000 {1000 * scored['aurc']:.1f}")
    log(f"results: {out / 'results.json'}")
    return 0
