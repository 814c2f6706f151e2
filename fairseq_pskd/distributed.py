"""Data-parallel plumbing of the criterion: collectives on fairseq's data-parallel group, the
per-rank store directory, and the packing of the real tokens' top-k rows for --pskd-store-sync
all_gather (docs/DISTRIBUTED.md).

All collectives run on fairseq's data-parallel group (the trainer's own group; with model
parallelism that is the group of ranks that see different batches). Every one of them is
called by every rank at the same point of training: begin_epoch (all ranks), the first
begin_epoch's store opening, and, with --pskd-store-sync all_gather, every training
forward pass including the trainer's dummy batches. Without torch.distributed the collectives
are the single-process identity (all_gather_rows is only called under data parallelism).
"""
import os
import re

import numpy as np
import torch

from .store import index_dtype


def dp_group():
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from fairseq.distributed import utils as distributed_utils

    return distributed_utils.get_data_parallel_group()


def dist_info():
    """(rank, world size) in the data-parallel group; (0, 1) without torch.distributed."""
    group = dp_group()
    if group is None:
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def barrier():
    group = dp_group()
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.barrier(group=group)


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] without torch.distributed)."""
    group = dp_group()
    if group is None or torch.distributed.get_world_size(group) == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def raise_collectively(error, what):
    """Gather every rank's error (None = fine) and raise the same error on all ranks.

    A rank that raised alone would leave the others waiting in their next collective."""
    raise_if_any(all_gather_object(error), what)


def raise_on_every_rank(error, what):
    """Raise ``error`` (an exception, or None on a rank that is fine): as it is in a single process;
    under data parallelism gathered, so that every rank stops (one rank alone would leave the
    others waiting in their next collective)."""
    if dist_info()[1] == 1:
        if error is not None:
            raise error
        return
    raise_collectively(None if error is None else f"{type(error).__name__}: {error}", what)


def raise_if_any(errors, what):
    """Raise (on every rank that calls it with the same gathered list) if any rank failed."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        detail = "\n".join(f"  rank {r}: {e}" for r, e in failed[:8])
        more = f"\n  ... and {len(failed) - 8} more ranks" if len(failed) > 8 else ""
        raise RuntimeError(f"PS-KD: {what} failed on {len(failed)} rank(s):\n{detail}{more}")


def node_and_local_rank(infos, rank):
    """Node index and local rank of ``rank`` from every rank's {"host", "node", "local_rank"}.

    The launcher's environment wins (torchrun / fairseq_pskd.launch: GROUP_RANK or NODE_RANK
    and LOCAL_RANK; Slurm: SLURM_NODEID) when every rank has it; otherwise ranks are grouped
    by host name: node = order of first appearance, local rank = earlier ranks on the host."""
    if all(i["node"] is not None for i in infos):
        node = infos[rank]["node"]
    else:
        hosts = list(dict.fromkeys(i["host"] for i in infos))
        node = hosts.index(infos[rank]["host"])
    if all(i["local_rank"] is not None for i in infos):
        local = infos[rank]["local_rank"]
    else:
        local = sum(1 for i in infos[:rank] if i["host"] == infos[rank]["host"])
    return node, local


def env_int(*names):
    for name in names:
        v = os.environ.get(name)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                pass
    return None


STORE_DIR_PLACEHOLDERS = ("rank", "node", "local_rank")


def check_store_dir_template(template):
    """Refuse an empty --pskd-store-dir and braces other than {rank}, {node} and {local_rank}
    (a mistyped or formatted placeholder would otherwise be used literally as a directory name)."""
    if not template.strip():
        raise ValueError("--pskd-store-dir is empty: pass a directory, or leave the option out for the "
                         "default SAVE_DIR/pskd_store")
    unknown = [m.group(0) for m in re.finditer(r"\{[^{}]*\}|[{}]", template)
               if m.group(0)[1:-1] not in STORE_DIR_PLACEHOLDERS]
    if unknown:
        raise ValueError(f"--pskd-store-dir {template}: {unknown[0]} is not a placeholder it fills in; it "
                         f"fills in {{rank}}, {{node}} and {{local_rank}} only, written exactly so "
                         f"(e.g. /local/scratch/pskd_{{node}})")


def resolve_store_dir(template, rank, node, local_rank):
    """--pskd-store-dir with {rank}, {node} and {local_rank} filled in (the option itself is
    checked by check_store_dir_template when the criterion is built; the default,
    SAVE_DIR/pskd_store, may hold any braces the save dir has)."""
    return os.path.abspath(os.path.expanduser(
        template.replace("{rank}", str(rank)).replace("{node}", str(node))
        .replace("{local_rank}", str(local_rank))))


def pack_rows(ids, lengths, top_idx, top_p, vocab_size):
    """One flat uint8 tensor on the rows' device: ids int64 (B), lengths int32 (B), then the real
    tokens' top-k rows (N, k), sentence by sentence (``top_idx``/``top_p``, as
    fairseq_pskd.store.compact_rows gives them), as the store keeps them: indices uint16 (sent
    as int16, the same bits) or int32, probabilities float16."""
    dev = top_idx.device
    idx = top_idx.to(torch.int16 if index_dtype(vocab_size).itemsize == 2 else torch.int32)
    parts = [torch.as_tensor(ids).to(torch.int64).reshape(-1), torch.as_tensor(lengths).to(torch.int32).reshape(-1),
             idx.contiguous().reshape(-1), top_p.to(torch.float16).contiguous().reshape(-1)]
    return torch.cat([p.to(dev).view(torch.uint8) for p in parts]), len(ids), idx.size(0)


def unpack_rows(buf, n_sent, n_tok, k, vocab_size):
    """Inverse of pack_rows on a CPU uint8 numpy array: ids, lengths (int64), and views of the
    rows in the store's dtypes: indices (N, k) uint16 or int32, probs (N, k) float16."""
    stored = index_dtype(vocab_size)
    o = 0
    ids = np.frombuffer(buf, dtype="<i8", count=n_sent, offset=o).astype(np.int64)
    o += 8 * n_sent
    lengths = np.frombuffer(buf, dtype="<i4", count=n_sent, offset=o).astype(np.int64)
    o += 4 * n_sent
    idx = np.frombuffer(buf, dtype=stored, count=n_tok * k, offset=o)
    o += stored.itemsize * n_tok * k
    prb = np.frombuffer(buf, dtype="<f2", count=n_tok * k, offset=o)
    return ids, lengths, idx.reshape(n_tok, k), prb.reshape(n_tok, k)


def all_gather_rows(ids, lengths, top_idx, top_p, vocab_size, k):
    """All-gather every rank's rows (a rank may contribute none: top_idx None).

    ``top_idx``/``top_p``: the (N, k) rows of this rank's real tokens (pack_rows). Two
    collectives: the (sentences, tokens) counts, then the packed rows padded to the largest
    rank's size. Returns, on every rank, CPU numpy (ids, lengths, indices (N, k), probs (N, k))
    of all ranks concatenated in rank order, the rows in the store's dtypes (what
    TopKStore.write_rows takes)."""
    group = dp_group()
    backend = str(torch.distributed.get_backend(group))
    if top_idx is not None:
        payload, n_sent, n_tok = pack_rows(ids, lengths, top_idx, top_p, vocab_size)
        dev = payload.device
    else:
        dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend \
            and torch.cuda.is_available() else torch.device("cpu")
        payload, n_sent, n_tok = torch.zeros(0, dtype=torch.uint8, device=dev), 0, 0
    if dev.type == "cuda" and "nccl" not in backend:
        dev = torch.device("cpu")  # gloo: gather on the host
    payload = payload.to(dev)
    world = torch.distributed.get_world_size(group)
    counts = torch.tensor([n_sent, n_tok, payload.numel()], dtype=torch.int64, device=dev)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    torch.distributed.all_gather(all_counts, counts, group=group)
    all_counts = [c.tolist() for c in all_counts]
    width = max(c[2] for c in all_counts)
    padded = torch.zeros(width, dtype=torch.uint8, device=dev)
    padded[:payload.numel()] = payload
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded, group=group)
    parts = [unpack_rows(g[:c[2]].cpu().numpy(), c[0], c[1], k, vocab_size)
             for g, c in zip(gathered, all_counts)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))
