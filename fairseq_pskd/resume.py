"""Whose priors a store holds, and what a resumed run found of its own (docs/STORE.md, "Run
identity").

A store's header records the id and save dir of the run that wrote it; a checkpoint carries the
id of the run that saved it. ``Priors`` (priors.py) compares the two at a process's first epoch:
``foreign_store_error`` says why a store must not be used, ``report_resumed_priors`` logs how
many of the previous epoch's priors a resumed run reads.
"""
import logging
import os

from .store import StoreError

__all__ = ["foreign_store_error", "report_resumed_priors"]

logger = logging.getLogger(__name__)


def foreign_store_error(store, epoch, ckpt, save_dir, checkpoint_loaded):
    """A StoreError if ``store`` holds priors that are not this run's, else None.

    ``ckpt``: the run id of the checkpoint fairseq restored (None without one, or for a
    checkpoint no PS-KD run wrote); ``checkpoint_loaded``: whether one was restored at all;
    ``save_dir``: this run's --save-dir. A new run (epoch 1, no checkpoint) may take over a store
    an earlier run in the same save dir left: that save dir's run starts over."""
    newest = store.newest_epoch()
    if newest is None or (ckpt is not None and store.run_id == ckpt):
        return None  # no priors, or this run's
    theirs = store.run_save_dir
    same_dir = theirs is not None and save_dir and os.path.realpath(theirs) == os.path.realpath(save_dir)
    if epoch == 1 and ckpt is None and same_dir:
        return None  # this save dir's run starting over
    who = (f"run {store.run_id or '(no id recorded)'}" + (f", save dir {theirs}" if theirs else "")
           + f", priors up to epoch {newest}")
    discard = (f"Give this run its own --pskd-store-dir, or, if that run's priors are no longer "
               f"needed, delete {store.path} (it is only a cache of that run's last epochs' "
               f"predictions; that run could then resume only without priors for one epoch)")
    if epoch == 1 and ckpt is None:
        return StoreError(
            f"the PS-KD store at {store.path} holds the priors of another training run ({who}). This "
            f"new run would reset them, and that run could no longer resume with its priors. " + discard)
    if ckpt is None:
        how = ("from a checkpoint that carries no PS-KD run identity (it was not written by a PS-KD "
               "training run of this version, e.g. a label-smoothing checkpoint given as "
               "--restore-file; fairseq reloads --restore-file on every rerun, so to resume a "
               "warm-started run drop --restore-file)"
               if checkpoint_loaded else "without a restored checkpoint")
        return StoreError(
            f"this run starts at epoch {epoch} {how}, but the PS-KD store at {store.path} holds the "
            f"priors of a training run ({who}): they are not this model's predictions, and "
            f"training against them would distil that run's model into this one. Pass a new "
            f"--pskd-store-dir: epoch {epoch} then trains against the label-smoothed target alone "
            f"and stores this model's priors for epoch {epoch + 1}. Or, if that run's priors are no "
            f"longer needed, delete {store.path}")
    return StoreError(
        f"the PS-KD store at {store.path} holds the priors of another training run ({who}), not of "
        f"the run this checkpoint belongs to (run {ckpt}): another run used this --pskd-store-dir "
        f"after this run's last epoch, and training epoch {epoch} against its priors would distil "
        f"that run's model into this one. Delete {store.path} (it is only a cache of the last "
        f"epochs' predictions) or pass a new --pskd-store-dir: the resumed epoch {epoch} then trains "
        f"without priors (against the label-smoothed target alone) and stores new ones for epoch "
        f"{epoch + 1}")


def report_resumed_priors(store, epoch):
    """Say, at the first epoch of a resumed run, how many of the priors it reads it found, and
    why any that its previous epoch wrote are gone."""
    prev = epoch - 1
    found, total = store.sentences_written(prev), store.num_sentences
    lost = store.sentences_overwritten(prev)
    if lost:
        logger.warning(
            "PS-KD epoch %d (resumed): priors of epoch %d found for %d of %d sentences; %d were "
            "overwritten by epoch %d of this run, which trained after the checkpoint it resumed "
            "from (the store keeps the last two epochs). Those sentences train against the "
            "label-smoothed target alone in this epoch. A checkpoint at every epoch end prevents "
            "this: keep --save-interval 1 (the default; --no-epoch-checkpoints keeps only "
            "checkpoint_last.pt)", epoch, prev, found, total, lost, store.newest_epoch(prev))
    elif found == 0:
        logger.warning("PS-KD epoch %d: the store at %s holds no priors of epoch %d (a new or "
                       "emptied store), so this epoch trains against the label-smoothed target "
                       "alone (pskd_coverage 0) and stores new priors for epoch %d", epoch,
                       store.path, prev, epoch + 1)
    else:
        logger.info("PS-KD epoch %d (resumed): priors of epoch %d found for %d of %d sentences",
                    epoch, prev, found, total)
