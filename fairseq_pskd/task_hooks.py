"""What the criterion learns through the task: fairseq tells the epoch, the training step and
the checkpoints only to the task, so the criterion wraps documented methods of the task it is
built on:

- ``begin_epoch``: the epoch number (right after a resume too);
- ``train_step``: tells a training batch from a validation batch, and a dummy batch from a real
  one; the batch's prior read starts here, before its forward pass;
- ``begin_valid_epoch`` and ``state_dict``: flush writes before validation and checkpoints;
- ``load_dataset``: the training set's collater also puts the batch's sentence ids into the
  sample as numpy (HOST_IDS);
- ``get_batch_iterator``: the train iterator's state, which every checkpoint saves and a resume
  restores, carries the run's identity (fairseq 0.12's trainer saves task.state_dict() but never
  gives it back on resume, so the task state cannot carry it).

The hooks are installed once per task and call the criterion most recently built on it, so
building a second criterion does not chain a second set.
"""
import os

import numpy as np
import torch

HOST_IDS = "pskd_host_ids"  # sample key: the batch's sentence ids, int64 numpy, never on a device


class CollaterWithHostIds:
    """A dataset's collater that also puts the batch's ids into the sample as numpy.

    The store is addressed by sentence id on the host. fairseq moves every tensor of a sample
    to the GPU before the criterion sees it, and leaves numpy arrays where they are: without
    this copy, every step would read the ids back from the GPU (a synchronisation that stalls
    it). A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, collater):
        self.collater = collater

    def __call__(self, samples):
        batch = self.collater(samples)
        ids = batch.get("id") if isinstance(batch, dict) else None
        if isinstance(ids, torch.Tensor):
            batch[HOST_IDS] = ids.numpy().astype(np.int64, copy=True)
        return batch


def add_host_ids(dataset):
    """Wrap ``dataset.collater`` (once) so its batches carry HOST_IDS; returns the dataset."""
    if dataset is not None and hasattr(dataset, "collater") \
            and not isinstance(dataset.collater, CollaterWithHostIds):
        dataset.collater = CollaterWithHostIds(dataset.collater)
    return dataset


def refuse_unservable_data(task):
    """Refuse, before training, the data options under which priors would be read for the wrong
    tokens: the store keeps row j of a sentence for its target position j (right padding), and
    expects the same training set (ids and lengths) every epoch."""
    cfg = getattr(task, "cfg", None)
    if cfg is None:
        return
    if getattr(cfg, "left_pad_target", False):
        raise ValueError(
            "--left-pad-target: PS-KD stores one prior per target position of a right-padded "
            "target (stored row j of a sentence is its target token j), so with left-padded targets "
            "the priors would land on the wrong tokens; drop --left-pad-target (fairseq's default "
            "is False)")
    data = getattr(cfg, "data", None)
    if isinstance(data, str) and os.pathsep in data:
        shards = [d for d in data.split(os.pathsep) if d]
        raise ValueError(
            f"PS-KD needs the same training set every epoch (epoch t trains every sentence against "
            f"what the model predicted for that sentence in epoch t-1), but the data path {data} is "
            f"sharded ({len(shards)} shards: fairseq trains shard (t-1) mod {len(shards)} in epoch "
            f"t), which changes it; binarise the shards into one data directory (one "
            f"fairseq-preprocess --trainpref over all the training text) and pass that")


class TaskHooks:
    """The wrapped task methods; ``criterion`` is the one they call (the latest built)."""

    def __init__(self, task, criterion):
        self.task = task
        self.criterion = criterion

    @classmethod
    def install(cls, task, criterion):
        """Hook ``task`` for ``criterion``: wraps its methods the first time, afterwards only
        points the existing hooks at the new criterion."""
        hooks = getattr(task, "_pskd_hooks", None)
        if hooks is None:
            hooks = cls(task, criterion)
            hooks._wrap()
            task._pskd_hooks = hooks
        hooks.criterion = criterion
        add_host_ids(getattr(task, "datasets", {}).get(criterion.train_subset))  # already loaded
        return hooks

    def _wrap(self):
        hooks, task = self, self.task
        begin_epoch, begin_valid_epoch = task.begin_epoch, task.begin_valid_epoch
        train_step, state_dict = task.train_step, task.state_dict
        load_dataset, get_batch_iterator = task.load_dataset, task.get_batch_iterator

        def pskd_load_dataset(split, *args, **kwargs):
            result = load_dataset(split, *args, **kwargs)
            if split == hooks.criterion.train_subset:
                add_host_ids(task.datasets.get(split))
            return result

        def pskd_get_batch_iterator(dataset, *args, **kwargs):
            epoch_itr = get_batch_iterator(dataset, *args, **kwargs)
            if dataset is not None and dataset is getattr(task, "datasets", {}).get(
                    hooks.criterion.train_subset):
                hooks._carry_run_id(epoch_itr)
            return epoch_itr

        def pskd_begin_epoch(epoch, model):
            hooks.criterion.begin_epoch(epoch)
            return begin_epoch(epoch, model)

        def pskd_begin_valid_epoch(epoch, model):
            # every rank drains its writes before validation, i.e. before any checkpoint save
            hooks.criterion.flush()
            return begin_valid_epoch(epoch, model)

        def pskd_train_step(sample, model, criterion, optimizer, update_num, ignore_grad=False,
                            **kwargs):
            # the trainer's criterion when it is a PS-KD one (the newest built, in fairseq-train)
            pskd = criterion if isinstance(criterion, type(hooks.criterion)) else hooks.criterion
            try:
                pskd.start_train_step(sample, update_num, ignore_grad)
                return train_step(sample, model, criterion, optimizer, update_num,
                                  ignore_grad=ignore_grad, **kwargs)
            finally:
                pskd.end_train_step()

        def pskd_state_dict():
            hooks.criterion.flush()  # a checkpoint never refers to priors still in flight
            return state_dict()

        task.load_dataset = pskd_load_dataset
        task.get_batch_iterator = pskd_get_batch_iterator
        task.begin_epoch = pskd_begin_epoch
        task.begin_valid_epoch = pskd_begin_valid_epoch
        task.train_step = pskd_train_step
        task.state_dict = pskd_state_dict

    def _carry_run_id(self, epoch_itr):
        """Make the train iterator's state (saved in every checkpoint as
        extra_state["train_iterator"], and handed back to load_state_dict on every rank when
        fairseq-train resumes) carry the run's identity."""
        if getattr(epoch_itr, "_pskd_carries_run_id", False):  # fairseq caches iterators
            return
        hooks = self
        state_dict, load_state_dict = epoch_itr.state_dict, epoch_itr.load_state_dict

        def pskd_state_dict():
            state = state_dict()
            run_id = hooks.criterion.priors.run_id
            if run_id is not None and isinstance(state, dict):
                state = dict(state, pskd_run_id=run_id)
            return state

        def pskd_load_state_dict(state):
            hooks.criterion.priors.restored_from_checkpoint(
                state.get("pskd_run_id") if isinstance(state, dict) else None)
            return load_state_dict(state)

        epoch_itr.state_dict = pskd_state_dict
        epoch_itr.load_state_dict = pskd_load_state_dict
        epoch_itr._pskd_carries_run_id = True
