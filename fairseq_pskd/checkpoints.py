"""fairseq's checkpoint files, safe to kill at any moment (docs/STORE.md, "Failure modes").

fairseq 0.12 writes a checkpoint atomically (a temporary file renamed over the old one), then
copies it to checkpoint_last.pt and checkpoint_best.pt with a plain ``shutil.copyfile``: a run
killed during that copy leaves a truncated checkpoint_last.pt, and rerunning the same command
dies with a bare ``EOFError``. With the plugin loaded (any criterion), ``install_atomic_copy``
makes those copies atomic too: a copy to a temporary file renamed over the destination, so a
kill leaves the old checkpoint_last.pt or the new one, never half of one. Like fairseq's own
save, it protects against a killed process, not against a machine that loses power (no fsync).

A checkpoint_last.pt damaged by a run without the plugin (or by a full disk) is refused before
training, with the command that repairs it (``restore_file_error``; the PS-KD criterion raises it).
"""
import glob
import os
import re
import shutil
import zipfile

__all__ = ["atomic_copy", "install_atomic_copy", "checkpoint_suffix", "restore_file_error", "damage"]

_TMP_SUFFIX = ".tmp"  # fairseq's own suffix for the checkpoint it writes before renaming it


def atomic_copy(src, dst):
    """Copy ``src`` to ``dst`` so that ``dst`` is always the old file or the complete new one.

    A ``dst`` that is a symbolic link keeps it: the file it points to is the one replaced, as
    ``shutil.copyfile`` would write through it (a checkpoint_last.pt linked to another disk stays
    there)."""
    dst = os.path.realpath(dst)
    tmp = dst + _TMP_SUFFIX
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def install_atomic_copy():
    """Make fairseq.checkpoint_utils copy checkpoints atomically (local paths; others as before).

    Replaces the ``PathManager`` that checkpoint_utils imported (a subclass whose ``copy`` is
    atomic), so no other fairseq module is affected. Idempotent."""
    from fairseq import checkpoint_utils

    base = checkpoint_utils.PathManager
    if getattr(base, "pskd_atomic_copy", False):
        return

    class AtomicCopyPathManager(base):
        pskd_atomic_copy = True

        @staticmethod
        def copy(src_path, dst_path, overwrite=False):
            remote = base.path_requires_pathmanager(src_path) or base.path_requires_pathmanager(dst_path)
            if remote or (not overwrite and os.path.exists(dst_path)):
                return base.copy(src_path, dst_path, overwrite=overwrite)
            return atomic_copy(src_path, dst_path)

    checkpoint_utils.PathManager = AtomicCopyPathManager


def damage(path):
    """Why the checkpoint file ``path`` cannot be loaded ("0 bytes", "truncated"), or None.

    torch saves a zip archive; one cut short has no end-of-archive record. Files in torch's
    legacy (non-zip) format are not judged."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "0 bytes"
        with open(path, "rb") as f:
            zip_magic = f.read(4) == b"PK\x03\x04"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if zip_magic and not zipfile.is_zipfile(path):
        return f"truncated: {size} bytes, no end of archive"
    return None


def checkpoint_suffix(suffix, ddp_backend, use_sharded_state, rank):
    """What fairseq 0.12 adds to this rank's checkpoint file names (``Trainer.checkpoint_suffix``):
    ``--checkpoint-suffix``, and with FSDP's ``--use-sharded-state`` a ``-shard{rank}`` per rank."""
    if ddp_backend == "fully_sharded" and use_sharded_state:
        return f"{suffix or ''}-shard{rank}"
    return suffix or ""


def restore_file_error(save_dir, restore_file="checkpoint_last.pt", suffix=""):
    """A ValueError to stop with when the checkpoint fairseq-train would resume from is damaged,
    naming the newest intact checkpoint and the command that resumes from it; else None.
    ``suffix``: this rank's, from ``checkpoint_suffix``."""
    # the path fairseq 0.12's checkpoint_utils.load_checkpoint reads
    if restore_file == "checkpoint_last.pt":
        path = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
    else:
        path = restore_file.replace(".pt", suffix + ".pt")
    why = damage(path) if os.path.isfile(path) else None
    if why is None:
        return None
    newest = _newest_intact_checkpoint(os.path.dirname(path) or ".", exclude=path, suffix=suffix)
    if newest is not None:
        fix = (f"Resume from the newest intact checkpoint, {os.path.basename(newest)}: cp {newest} {path} "
               f"(and rerun the same command), or start the run over: rm {path}")
    else:
        fix = f"No intact checkpoint is left beside it: start the run over with rm {path}"
    return ValueError(f"the checkpoint to resume from, {path}, is damaged ({why}): the run was stopped while "
                      f"it was being written. {fix}")


def _newest_intact_checkpoint(directory, exclude, suffix=""):
    """The most recently written checkpointN.pt / checkpoint_N_U.pt in ``directory`` that is intact."""
    pattern = re.compile(r"checkpoint(\d+|_\d+_\d+)" + re.escape(suffix) + r"\.pt")
    candidates = [p for p in glob.glob(os.path.join(glob.escape(directory), "checkpoint*.pt"))
                  if pattern.fullmatch(os.path.basename(p)) and os.path.abspath(p) != os.path.abspath(exclude)]
    for p in sorted(candidates, key=os.path.getmtime, reverse=True):
        if damage(p) is None:
            return p
    return None
