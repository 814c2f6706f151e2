"""What a learning-rate schedule needs to know of the data: updates per epoch, as fairseq-train
will batch it.

A schedule given in updates (``--warmup-updates``, ``--total-num-update``) means something else
on a corpus of another size; recipes that train on any amount of data (``quickstart.sh --long
--train-size N``) derive those numbers from this count instead of a constant. The count is
fairseq's own: the task loads the training split and builds the epoch's batch iterator with the
same arguments the trainer uses (max tokens and sentences, max positions of the model, the
batch-size multiple, the data-parallel shards, ``--update-freq``), so nothing is re-implemented.
"""
from __future__ import annotations

import math


def updates_per_epoch(train_argv) -> int:
    """Optimizer updates per epoch of ``fairseq-train *train_argv`` (its data directory first,
    then its options; ``--user-dir`` as the run will give it)."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(a) for a in train_argv])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset(cfg.dataset.train_subset, combine=False, epoch=1)
    model = task.build_model(cfg.model)  # its max positions decide which pairs are skipped
    world = max(1, cfg.distributed_training.distributed_world_size or 1)
    itr = task.get_batch_iterator(
        dataset=task.dataset(cfg.dataset.train_subset),
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(
            task.max_positions(), model.max_positions(), cfg.dataset.max_tokens),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=cfg.common.seed,
        num_shards=world,
        shard_id=0,
        epoch=1,
        disable_iterator_cache=True,
    )
    update_freq = cfg.optimization.update_freq[0]  # fairseq uses the first for epoch 1
    return math.ceil(len(itr) / update_freq)
