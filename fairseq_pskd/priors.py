"""The priors of one training run: reading last epoch's top-k for a batch and writing this
epoch's, off the training step's critical path, and the store's epoch transitions.

Per training step nothing here adds a forward pass or a GPU synchronisation: the batch's
sentence ids come as a numpy array (task_hooks.HOST_IDS), the read starts on a helper thread as
soon as task.train_step receives the batch (overlapping the forward pass), the priors go to the
device from pinned memory without blocking, and the top-k is taken on the device and copied
back asynchronously by the store's writer. On CPU the helper thread also takes the top-k,
during the backward pass.

The criterion (criterion.py) decides when to read and what to do with the priors; the store
(store/) decides how they lie on disk; this module knows neither the loss nor the file layout.
"""
import concurrent.futures
import logging
import os
import uuid
from typing import Optional

import torch

from .distributed import all_gather_object, all_gather_rows, barrier, dist_info, raise_on_every_rank
from .resume import foreign_store_error, report_resumed_priors
from .store import compact_rows
from .store_opening import open_run_store
from .task_hooks import HOST_IDS

logger = logging.getLogger(__name__)

#: Largest sum of a stored top-k row read back: 1 plus float16 rounding of the k values.
MAX_PRIOR_MASS = 1.0 + 1e-2


def to_device(t, device):
    """Host tensor -> device without blocking: through pinned memory on CUDA (torch's caching
    host allocator keeps the pinned block until the copy has run), a plain copy elsewhere."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def nonfinite_warning(epoch, count):
    return (f"PS-KD epoch {epoch} priors: {count} sentences skipped for non-finite values (inf/NaN "
            f"log-probabilities in their training forward pass, e.g. an fp16 overflow); they keep "
            f"no prior, so epoch {epoch + 1} trains them against the label-smoothed target alone")


def untrained_warning(epoch, count, total):
    return (f"PS-KD epoch {epoch}: {count} of the {total} training sentences were not trained in "
            f"this epoch, so epoch {epoch + 1} trains them against the label-smoothed target "
            f"alone. Causes: fairseq 0.12 leaves out the last sentences of every epoch when their "
            f"number is not a multiple of --required-batch-size-multiple (default 8; pass "
            f"--required-batch-size-multiple 1); a resume from a mid-epoch checkpoint trains "
            f"other batches than those before it unless --update-epoch-batch-itr True; "
            f"sentences longer than --max-positions are skipped with "
            f"--skip-invalid-size-inputs-valid-test")


class Priors:
    """This process's view of the run's top-k store (opened at the first training epoch).

    Args:
        store_dir: --pskd-store-dir (may hold {rank} / {node} / {local_rank}).
        topk: k, the stored entries per token.
        sync: --pskd-store-sync, "shared" or "all_gather" (docs/DISTRIBUTED.md).
        save_dir: the run's --save-dir (names the run to a second run that finds the store locked).
        topk_on_helper: on CPU, take the top-k on the helper thread beside the backward pass
            (False: on the training thread; benchmarks/throughput.py --inline-topk compares them).
    """

    def __init__(self, store_dir, topk, sync, save_dir, topk_on_helper=True):
        self.store_dir = store_dir
        self.topk = topk
        self.sync = sync
        self.save_dir = save_dir
        self.topk_on_helper = topk_on_helper
        self.store = None  # a TopKStore
        self.epoch: Optional[int] = None
        # epoch whose rows this process may still have to end (flush + header) in the store
        self._written_epoch: Optional[int] = None
        self._writes_rows = True  # this rank writes to its store (all_gather: one rank per directory)
        self._updates_header = True  # this rank rewrites its store's header at epoch ends
        self.dummy_batches = 0  # trainer dummy batches seen this epoch (neither read nor written)
        # one helper thread: reads a batch's priors during its forward pass and, on CPU, takes
        # the top-k and hands it to the store during the backward pass
        self._helper = None
        self._prefetch = None  # (sample, future of _read_host) for the batch in train_step
        self._cpu_write = None  # future of the last _topk_and_write on the helper (CPU only)
        self._warned_no_host_ids = False
        # Run identity: a uuid made at the first epoch of a new run, recorded in the store's header
        # and carried by every checkpoint (in the train iterator's state, which fairseq restores
        # on resume: task_hooks), so a resume refuses a store that another run has written meanwhile.
        self.run_id: Optional[str] = None
        self._checkpoint_loaded = False  # fairseq restored the train iterator from a checkpoint
        self._checkpoint_run_id: Optional[str] = None  # the run id that checkpoint carried

    # ---- the run's identity, carried by checkpoints ----------------------------------------

    def restored_from_checkpoint(self, run_id):
        """The train iterator was restored from a checkpoint that carried ``run_id`` (or None)."""
        self._checkpoint_loaded = True
        self._checkpoint_run_id = run_id

    # ---- epochs ----------------------------------------------------------------------------

    def begin_epoch(self, epoch, train_set, vocab_size, dictionary=None):
        """Before training epoch ``epoch`` (1-based): open the store (first call), end the previous
        epoch's writes (flush, barrier, header, summary) or settle the run's identity.
        ``dictionary``: the target symbols in order (the store refuses another dictionary).

        Called by every rank with the same epoch, so the collectives here line up."""
        if self.store is None:
            lengths = getattr(train_set, "tgt_sizes", None)
            if lengths is None:
                raise ValueError(
                    f"PS-KD needs per-sentence target lengths, but the training set "
                    f"({type(train_set).__name__}) has no tgt_sizes; use a translation task")
            opened = open_run_store(self.store_dir, lengths, self.topk, vocab_size, self.sync,
                                    self.save_dir, dictionary)
            self.store, self.store_dir = opened.store, opened.directory
            self._writes_rows, self._updates_header = opened.writes_rows, opened.updates_header
        # An overflowing forward pass (inf/NaN log-probs, which fairseq skips and goes on) must
        # not end the run: the store drops those sentences after its copy, with no device sync
        # here, and counts them for the epoch summary below.
        self.store.skip_nonfinite = True
        prev = self._written_epoch
        if prev is None:  # this process's first epoch: a new run, or a resume
            self._claim_store(epoch)
        elif prev < epoch:
            self._end_epoch(prev)
        self.dummy_batches = 0
        self.epoch = epoch
        self._written_epoch = epoch  # ended (flush, barrier, header) at the next epoch or at exit

    def _end_epoch(self, prev):
        self._wait_cpu_write()
        self.store.flush()  # this rank's epoch-prev writes are applied and msynced
        counts = all_gather_object((self.dummy_batches, self.store.skipped_nonfinite(prev)))
        dummies = sum(c[0] for c in counts)
        # shared: each rank dropped rows it trained itself; all_gather: every writer (rank 0
        # among them) saw every rank's rows
        nonfinite = sum(c[1] for c in counts) if self.sync == "shared" else counts[0][1]
        # every rank's epoch-prev writes are in the files before any rank reads them
        barrier()
        if not self._updates_header:
            return
        self.store.end_epoch(prev, update_header=True)
        if dist_info()[0] != 0:
            return
        buf = self.store.summary()["buffers"][prev % 2]
        written = buf["sentences_written"] if buf["epoch"] == prev else 0
        logger.info("PS-KD epoch %d priors: %d of %d training sentences stored in %s "
                    "(%d ranks, %s sync, %d dummy batches skipped)", prev, written,
                    self.store.num_sentences, self.store.path, dist_info()[1], self.sync, dummies)
        if nonfinite:  # the sentences missing from the count above, and why
            logger.warning(nonfinite_warning(prev, nonfinite))
        untrained = self.store.num_sentences - written - nonfinite
        if untrained > 0:
            logger.warning(untrained_warning(prev, untrained, self.store.num_sentences))

    def _claim_store(self, epoch):
        """This process's first epoch: settle the run's identity and check the store against it.

        The store must hold this run's priors or none (resume.foreign_store_error). They are this
        run's when the checkpoint fairseq restored carries the store's run id. A new run (epoch 1, no
        checkpoint restored) also takes over a store an earlier run in the same save dir left (killed
        in epoch 1, or restarted with --reset-dataloader): that save dir's run starts over. Any other
        store that holds priors is another run's and is refused: resetting it would cost that run its
        priors, training on it would distil that run's model into this one.

        Epoch 1 (a new run, or one resumed inside epoch 1) starts from an emptied store: priors of
        a killed epoch 1 are forgotten, which costs at most some epoch-2 priors (those tokens train
        against y_ls for one epoch; pskd_coverage shows it)."""
        ckpt = self._checkpoint_run_id
        error = foreign_store_error(self.store, epoch, ckpt, self.save_dir, self._checkpoint_loaded) \
            if self._updates_header else None
        raise_on_every_rank(error, "checking the PS-KD store's run")
        # the same id on every rank: rank 0's
        self.run_id = all_gather_object(ckpt or uuid.uuid4().hex)[0]
        if not self._updates_header:
            if epoch == 1:
                barrier()  # the other ranks read nothing before the holder has reset the store
            return
        store = self.store
        if epoch == 1:
            newest = store.newest_epoch()
            if newest is not None and store.run_id != self.run_id:
                logger.info("PS-KD: the store at %s held priors (up to epoch %d) of an earlier run in this "
                            "save dir; this run restored no checkpoint of it, so it is a new run: they are "
                            "discarded", store.path, newest)
            store.reset(run_id=self.run_id, save_dir=self._run_save_dir)
            barrier()
            return
        if store.run_id != self.run_id or store.run_save_dir != self._run_save_dir:
            store.set_run_id(self.run_id, save_dir=self._run_save_dir)  # a new store, or a moved save dir
        report_resumed_priors(self.store, epoch)

    @property
    def _run_save_dir(self):
        return os.path.abspath(self.save_dir) if self.save_dir else None

    def flush(self):
        """Apply every write in flight (before validation and every checkpoint)."""
        self._wait_cpu_write()
        if self.store is not None:
            self.store.flush()

    def close(self):
        """End the epoch's writes and release the store. At exit (atexit) or by hand; no
        collectives here: the process group may be gone. Each step runs even if one before it
        failed (the first error is raised at the end), so the store's writer thread and lock are
        always released."""
        errors = []

        def attempt(step):
            try:
                step()
            except BaseException as e:  # noqa: B902 - re-raised below, after the other steps
                errors.append(e)

        attempt(self.drop_read)
        attempt(self._wait_cpu_write)
        if self._helper is not None:
            attempt(lambda: self._helper.shutdown(wait=True))
            self._helper = None
        store, self.store = self.store, None
        if store is not None:
            if self._written_epoch is not None:
                attempt(lambda: self._end_last_epoch(store))
            attempt(store.close)
        self._written_epoch = None
        if errors:
            raise errors[0]

    def _end_last_epoch(self, store):
        epoch = self._written_epoch
        store.end_epoch(epoch, update_header=self._updates_header)
        nonfinite = store.skipped_nonfinite(epoch)
        if nonfinite:  # the last epoch has no next begin_epoch to report it
            logger.warning(nonfinite_warning(epoch, nonfinite))

    # ---- reading priors ----------------------------------------------------------------------

    def _host_ids(self, sample):
        """The batch's sentence ids, int64 numpy: the host copy the collater made (task_hooks),
        else read back from the device (warned once: on a GPU that is a synchronisation)."""
        ids = sample.get(HOST_IDS)
        if ids is not None:
            return ids
        if not self._warned_no_host_ids:  # e.g. a dataset loaded around task.load_dataset
            self._warned_no_host_ids = True
            logger.warning("PS-KD: training samples carry no host-side ids (%s); reading them "
                           "back from the device every step, which synchronises a GPU. Load the "
                           "train set with task.load_dataset after building the criterion, or "
                           "wrap its collater with fairseq_pskd.task_hooks.add_host_ids.", HOST_IDS)
        return sample["id"].cpu().numpy()

    def _read_host(self, ids, width):
        """The batch's priors as CPU tensors in the dtypes they cross to the device in: indices
        int32 and probs float16 (B, width, k), has_prior bool (B,).

        Lengths come from the store (the train set's own, checked when it was opened): the
        device-side lengths are checked against them by the writer, off the critical path. The
        rows read are checked too (a top-k of one distribution sums to at most 1, plus float16
        rounding): a store damaged on disk stops the run with the file and sentence named."""
        return self.store.read(self.epoch, ids, max_len=width, max_mass=MAX_PRIOR_MASS)

    def start_read(self, sample):
        """Start reading this batch's priors on the helper thread, to overlap the forward pass
        (numpy's gathers release the GIL). Called before the batch's forward pass."""
        self.drop_read()
        if isinstance(sample, dict) and HOST_IDS in sample and "target" in sample:
            self._prefetch = (sample, self._helper_thread().submit(
                self._read_host, sample[HOST_IDS], sample["target"].size(1)))

    def take_read(self, sample):
        """This batch's priors: the read started for it, or a read now."""
        if self._prefetch is not None and self._prefetch[0] is sample:
            future = self._prefetch[1]
            self._prefetch = None
            return future.result()  # re-raises what the read raised
        return self._read_host(self._host_ids(sample), sample["target"].size(1))

    def drop_read(self):
        """Forget a read the step did not use (fairseq skipped the batch, e.g. out of memory),
        after it has finished, so no read runs while the store changes epoch."""
        if self._prefetch is not None:
            concurrent.futures.wait([self._prefetch[1]])
            self._prefetch = None

    def _helper_thread(self):
        if self._helper is None:
            self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pskd")
        return self._helper

    # ---- writing priors ------------------------------------------------------------------------

    def _wait_cpu_write(self):
        """Wait for the top-k write handed to the helper thread; re-raise what it raised."""
        if self._cpu_write is not None:
            future, self._cpu_write = self._cpu_write, None
            future.result()

    def _topk(self, scores, lse=None):
        """(indices int32, probabilities float16) of the k most probable tokens, (B, T, k), the
        dtypes the store takes: ``scores`` are log-probabilities, or logits with ``lse`` their
        log-sum-exp per row (the same order; probabilities exp(z - lse))."""
        top, top_idx = scores.topk(self.topk, dim=-1)
        top = top.float() if lse is None else top.float() - lse.unsqueeze(-1)
        return top_idx.to(torch.int32), top.exp().to(torch.float16)

    def _topk_and_write(self, epoch, scores, lse, ids, lengths):
        # the store takes the real tokens' rows on the device, from the host ids' stored lengths
        self.store.write(epoch, ids, lengths, *self._topk(scores, lse))

    @torch.no_grad()
    def write(self, sample, scores, lengths, dummy=False, lse=None):
        """Store the top-k of a training batch's log-probabilities ``scores`` (B, T, V) as epoch
        ``self.epoch``'s priors; with ``lse`` (B, T), ``scores`` are the logits and ``lse`` their
        log-sum-exp. ``lengths`` (B,): the target lengths, on the device. ``dummy``: the trainer's
        dummy batch, which is counted and writes nothing but, under --pskd-store-sync all_gather,
        still joins the step's collective. Called once per training batch (compute_loss)."""
        # The full target row, prefix included: the store is keyed by the dataset's target
        # lengths. Top-k on the device; only the real tokens' (N, k) rows cross to the host.
        if dummy:
            self.dummy_batches += 1
        if self.sync == "shared" or dist_info()[1] == 1:
            if dummy:
                return
            ids = torch.from_numpy(self._host_ids(sample))
            scores = scores.detach()
            if scores.device.type == "cpu" and self.topk_on_helper:
                # On CPU the top-k costs about as much as the loss (~100 ms of a ~800 ms update
                # of the quickstart's model at k = 8, docs/BENCHMARKS.md): the helper thread takes
                # it while this thread runs the backward pass, which holds the scores alive anyway.
                # One in flight at a time, so no batch's log-probs outlive the next step.
                self._wait_cpu_write()
                self._cpu_write = self._helper_thread().submit(
                    self._topk_and_write, self.epoch, scores, lse, ids, lengths)
            else:
                self._topk_and_write(self.epoch, scores, lse, ids, lengths)
            return
        # all_gather: every rank's rows reach every rank; one rank per directory writes them
        ids = idx_rows = p_rows = None  # a dummy batch contributes no rows
        if not dummy:
            ids = self._host_ids(sample)
            num_tokens = int(self.store.lengths[ids].sum())  # the batch's target tokens, known on the host
            idx_rows, p_rows = compact_rows(*self._topk(scores.detach(), lse), lengths, num_tokens)
        all_ids, all_lengths, all_idx, all_p = all_gather_rows(
            ids, lengths, idx_rows, p_rows, self.store.vocab_size, self.topk)
        if self._writes_rows and all_ids.size:
            self.store.write_rows(self.epoch, all_ids, all_lengths, all_idx, all_p)
