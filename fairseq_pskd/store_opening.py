"""How the ranks of one training run open its top-k store (docs/DISTRIBUTED.md).

One process per store directory creates (or opens) it and holds its lock for the run; the other
ranks open it without the lock, after the holder has it (they never open a store their run does
not hold). With --pskd-store-sync shared every rank uses one directory and writes the sentences
it trains; with all_gather one rank per distinct directory writes every rank's rows. Probe files
then check that the ranks that should share a directory do, and that different writers do not.
Every step is collective: an error on one rank is raised on all of them.
"""
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from .distributed import (
    all_gather_object,
    barrier,
    dist_info,
    env_int,
    node_and_local_rank,
    raise_collectively,
    raise_if_any,
    resolve_store_dir,
)
from .store import StoreLockedError, TopKStore

logger = logging.getLogger(__name__)


@dataclass
class RunStore:
    store: TopKStore
    directory: str
    writes_rows: bool  # this rank writes rows to its store
    updates_header: bool  # this rank creates the store, holds its lock and ends its epochs


def open_run_store(template, lengths, topk, vocab, sync, save_dir, dictionary=None):
    """Open this rank's store; ``template`` is --pskd-store-dir, which may hold {rank}, {node}
    and {local_rank}; ``dictionary`` the target symbols in order (the store must have been built
    for them). Collective under data parallelism (every rank calls it once)."""
    rank, world = dist_info()
    # the lock holder's description, shown to a second run that finds the store in use
    holder = f"save dir {save_dir}" + (f", rank {rank} of {world}" if world > 1 else "")
    if world == 1:
        store_dir = resolve_store_dir(template, 0, 0, 0)
        store = TopKStore.open_or_create(store_dir, lengths, topk, vocab, owner=holder,
                                         dictionary=dictionary)
        return RunStore(store, store_dir, writes_rows=True, updates_header=True)

    infos = all_gather_object({
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node": env_int("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"),
        "local_rank": env_int("LOCAL_RANK"),
        "nonce": uuid.uuid4().hex,
    })
    nonce = infos[0]["nonce"]
    dirs = [resolve_store_dir(template, r, *node_and_local_rank(infos, r)) for r in range(world)]
    store_dir = dirs[rank]
    if sync == "shared":
        other = next((r for r in range(world) if dirs[r] != dirs[0]), None)
        if other is not None:  # the same on every rank: all raise
            raise ValueError(
                f"--pskd-store-sync shared needs one store directory for all ranks, but "
                f"--pskd-store-dir {template} gives rank 0 {dirs[0]} and rank {other} "
                f"{dirs[other]}; per-node or per-rank directories need --pskd-store-sync all_gather")
        # rank 0 creates; every rank writes the rows of the sentences it trains
        owner = [0] * world
        writes_rows = True
    else:
        # one writer (the lowest rank) per distinct directory on a host; it writes every row
        key = [(infos[r]["host"], os.path.realpath(dirs[r])) for r in range(world)]
        owner = [key.index(key[r]) for r in range(world)]
        writes_rows = owner[rank] == rank
    updates_header = owner[rank] == rank
    creators = sorted(set(owner))

    store = None
    try:
        # creators one after the other (two "different" directories that are one directory
        # after all must not race in create), then the other ranks open
        error = None
        for c in creators:
            if c == rank:
                try:
                    store = TopKStore.open_or_create(store_dir, lengths, topk, vocab, owner=holder,
                                                     dictionary=dictionary)
                except StoreLockedError as e:
                    mine = [r for r in creators if e.holder and (infos[r]["host"], infos[r]["pid"])
                            == (e.holder.get("host"), e.holder.get("pid"))]
                    error = f"{type(e).__name__}: {e}" if not mine else _two_writers(mine[0], rank, infos, store_dir)
                except Exception as e:  # reported on every rank below
                    error = f"{type(e).__name__}: {e}"
            barrier()
        # the other ranks open only a store their run holds
        raise_collectively(error, "opening the PS-KD store")
        if owner[rank] != rank:
            try:
                store = TopKStore.open(store_dir, lengths, topk, vocab, readonly=not writes_rows,
                                       lock=False, dictionary=dictionary)
            except Exception as e:
                error = (f"{type(e).__name__}: {e} (rank {rank} on {infos[rank]['host']} cannot "
                         f"open the store rank {owner[rank]} created at {dirs[owner[rank]]}; "
                         + ("with --pskd-store-sync shared the directory must be on a filesystem "
                            "shared by all nodes; without one use --pskd-store-sync all_gather "
                            "and a node-local --pskd-store-dir)" if sync == "shared"
                            else "is the directory readable?)"))
        raise_collectively(error, "opening the PS-KD store")

        # Check that the ranks that should share a directory do, and that different writers do
        # not: each creator drops a probe file named after this run and itself.
        def probe(c):
            return os.path.join(store_dir, f".pskd-probe-{nonce}-{c}")

        error = None
        if owner[rank] == rank:
            try:
                os.close(os.open(probe(rank), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except OSError as e:
                error = f"cannot create {probe(rank)}: {e}"
        barrier()
        if error is None:
            if not os.path.exists(probe(owner[rank])):
                error = (f"rank {rank} on {infos[rank]['host']} sees a different {store_dir} "
                         f"than rank {owner[rank]} on {infos[owner[rank]]['host']}: "
                         + ("with --pskd-store-sync shared the store directory must be shared by "
                            "all nodes (a shared filesystem); otherwise use --pskd-store-sync "
                            "all_gather with a node-local --pskd-store-dir" if sync == "shared"
                            else "ranks on one host must see the same directory"))
            other = [c for c in creators if c != owner[rank] and os.path.exists(probe(c))]
            if other:
                error = _two_writers(owner[rank], other[0], infos, store_dir)
        errors = all_gather_object(error)
        if owner[rank] == rank:
            try:
                os.unlink(probe(rank))
            except OSError:
                pass
        raise_if_any(errors, "checking the PS-KD store directories")
        logger.info("PS-KD store (%s sync): %s; this rank %s", sync, store_dir,
                    "writes the rows it trains" if sync == "shared"
                    else ("writes every rank's rows" if writes_rows else
                          f"reads the rows rank {owner[rank]} writes"))
    except BaseException:
        if store is not None:  # a rank that opened it: release the lock before stopping
            store.close()
        raise
    return RunStore(store, store_dir, writes_rows, updates_header)


def _two_writers(a, b, infos, store_dir):
    return (f"ranks {a} and {b} (hosts {infos[a]['host']}, {infos[b]['host']}) would both write "
            f"{store_dir}: with --pskd-store-sync all_gather every node needs its own directory, "
            f"e.g. --pskd-store-dir /local/scratch/pskd_{{node}} (on a filesystem shared by all "
            f"nodes use --pskd-store-sync shared)")
