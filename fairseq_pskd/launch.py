"""Data-parallel fairseq-train on CPU: N processes per node, gloo backend.

    python -m fairseq_pskd.launch --nproc 2 -- DATA --user-dir fairseq_pskd --cpu ... (fairseq-train args)
    # two machines, one process each:
    python -m fairseq_pskd.launch --nproc 1 --nnodes 2 --node-rank 0 --master-addr HOST0 --master-port 29500 -- ...
    python -m fairseq_pskd.launch --nproc 1 --nnodes 2 --node-rank 1 --master-addr HOST0 --master-port 29500 -- ...

fairseq 0.12 cannot do this by itself: its own spawn starts min(cuda.device_count(), world)
processes (none on CPU), under torchrun it sets device_id = rank % cuda.device_count()
(ZeroDivisionError on CPU), and its default DDP wrapper passes device_ids=[device_id], which
torch rejects for a CPU module. This launcher parses the fairseq-train arguments once, fills in
what fairseq's own launchers would (world size, tcp:// init method, backend gloo, no spawn),
starts one process per rank with torch.multiprocessing (spawn) and runs fairseq's own
``distributed_utils.distributed_main(i, fairseq_cli.train.main, cfg, ...)`` in each, so the rest
of training is the stock fairseq code path. In each worker the DDP wrapper fairseq uses is
replaced by a subclass that drops ``device_ids`` for CPU modules (--ddp-backend
pytorch_ddp/c10d, fairseq's default); legacy_ddp / no_c10d need nothing.

Each worker also gets the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK/NODE_RANK, MASTER_ADDR/PORT), which the PS-KD criterion uses for the {node} /
{local_rank} placeholders of --pskd-store-dir. Without OMP_NUM_THREADS, each worker uses
cpu_count // nproc threads.

On GPUs use torchrun or Slurm with fairseq-train directly (see docs/DISTRIBUTED.md); this
launcher is for CPU (it requires --cpu on a machine with CUDA).
"""
import argparse
import logging
import os
import socket
import sys
from typing import List, Optional, Sequence, Tuple

logger = logging.getLogger("fairseq_pskd.launch")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_pskd.launch",
        description="Run fairseq-train data-parallel on CPU (gloo): --nproc processes on this node. "
                    "Everything after '--' is passed to fairseq-train.",
        usage="%(prog)s --nproc N [--nnodes M --node-rank R --master-addr HOST --master-port PORT] "
              "-- <fairseq-train arguments>")
    p.add_argument("--nproc", "--nproc-per-node", dest="nproc", type=int, required=True,
                   help="processes (ranks) on this node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="index of this node, 0..nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1",
                   help="address of node 0, reachable from every node (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=0,
                   help="free TCP port on node 0 (default: pick one; required with --nnodes > 1)")
    return p


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Launcher arguments before the first '--', fairseq-train arguments after it."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def parse_launch_args(argv: Sequence[str]):
    own, train_args = split_argv(argv)
    parser = _build_parser()
    opts, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(f"unrecognized arguments before '--': {' '.join(unknown)} (fairseq-train "
                     f"arguments go after '--')")
    if opts.nproc < 1:
        parser.error("--nproc must be >= 1")
    if opts.nnodes < 1 or not 0 <= opts.node_rank < opts.nnodes:
        parser.error(f"need --nnodes >= 1 and 0 <= --node-rank < --nnodes, got {opts.nnodes} / {opts.node_rank}")
    if opts.nnodes > 1 and opts.master_port <= 0:
        parser.error("--master-port is required with --nnodes > 1 (the same port on every node)")
    if not train_args:
        parser.error("put the fairseq-train arguments after '--', e.g. "
                     "python -m fairseq_pskd.launch --nproc 2 -- DATA --cpu --arch ...")
    return opts, train_args


def build_cfg(opts, train_args: Sequence[str]):
    """Parse the fairseq-train arguments and set the distributed fields for this node."""
    import torch
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import open_dict

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=list(train_args))
    cfg = convert_namespace_to_omegaconf(args)
    if torch.cuda.is_available() and not cfg.common.cpu:
        raise SystemExit("error: fairseq_pskd.launch runs data-parallel training on CPU: pass --cpu. "
                         "For GPUs use torchrun or Slurm with fairseq-train (docs/DISTRIBUTED.md).")
    world = opts.nproc * opts.nnodes
    dt = cfg.distributed_training
    if dt.distributed_world_size not in (1, world):
        raise SystemExit(f"error: --distributed-world-size {dt.distributed_world_size} contradicts "
                         f"--nproc {opts.nproc} x --nnodes {opts.nnodes} = {world}; leave it out")
    port = opts.master_port if opts.master_port > 0 else free_port(opts.master_addr)
    with open_dict(cfg):
        cfg.common.cpu = True
        dt.distributed_world_size = world
        dt.distributed_num_procs = opts.nproc
        dt.nprocs_per_node = opts.nproc
        dt.distributed_init_method = f"tcp://{opts.master_addr}:{port}"
        dt.distributed_port = port
        dt.distributed_backend = "gloo"
        dt.distributed_no_spawn = True  # the processes are ours
        dt.distributed_rank = None  # distributed_main: start_rank + local index
        dt.device_id = 0
    return cfg, port


def allow_cpu_ddp() -> None:
    """fairseq's pytorch_ddp/c10d wrapper passes device_ids=[device_id]; torch refuses that for
    a CPU module. Replace the class it calls by a subclass that drops them for CPU modules."""
    from fairseq.models import distributed_fairseq_model as dfm

    base = dfm.DistributedDataParallel
    if getattr(base, "_pskd_cpu_ddp", False):
        return

    class CPUDistributedDataParallel(base):
        _pskd_cpu_ddp = True

        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)

    dfm.DistributedDataParallel = CPUDistributedDataParallel


def _worker(local_rank: int, cfg, opts, port: int) -> None:
    rank = opts.node_rank * opts.nproc + local_rank
    world = opts.nproc * opts.nnodes
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(opts.nproc), "GROUP_RANK": str(opts.node_rank),
        "NODE_RANK": str(opts.node_rank), "MASTER_ADDR": opts.master_addr, "MASTER_PORT": str(port),
    })
    _setup_logging()
    import torch
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.nproc))
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli.train import main as train_main

    allow_cpu_ddp()
    distributed_utils.distributed_main(local_rank, train_main, cfg,
                                       {"start_rank": opts.node_rank * opts.nproc})


def _setup_logging() -> None:
    # fairseq-train's format (fairseq_cli/train.py); force: importing fairseq may already
    # have configured the root logger with the default format.
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stdout, force=True,
                        level=os.environ.get("LOGLEVEL", "INFO").upper())


def main(argv: Optional[Sequence[str]] = None) -> int:
    _setup_logging()
    opts, train_args = parse_launch_args(sys.argv[1:] if argv is None else argv)
    cfg, port = build_cfg(opts, train_args)
    world = opts.nproc * opts.nnodes
    logger.info("data-parallel CPU training: node %d/%d, ranks %d..%d of %d, gloo via %s",
                opts.node_rank, opts.nnodes, opts.node_rank * opts.nproc,
                opts.node_rank * opts.nproc + opts.nproc - 1, world,
                cfg.distributed_training.distributed_init_method)
    if opts.nproc == 1:
        _worker(0, cfg, opts, port)  # one rank on this node: no extra process
        return 0
    import torch.multiprocessing as mp
    try:
        mp.spawn(_worker, args=(cfg, opts, port), nprocs=opts.nproc, join=True)
    except mp.ProcessRaisedException as e:
        logger.error("a rank failed:\n%s", e)
        return 1
    except mp.ProcessExitedException as e:
        logger.error("a rank died: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    # Run through the importable module so that torch.multiprocessing pickles
    # fairseq_pskd.launch._worker, not __main__._worker.
    from fairseq_pskd.launch import main as _main

    sys.exit(_main())
