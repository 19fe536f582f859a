"""Starting the DDP processes of a run and stopping them cleanly: how many processes to start, the launcher
that starts them as torchrun --standalone would, and the SIGINT/SIGTERM handling that lets every process finish
its step and save last.pt. train.py uses all three; they are here to keep it about training."""

import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import devices


def processes_to_launch(args):
    """How many local processes to start: --nproc, else every visible GPU (as the tutorial's DataParallel used
    them all) unless one GPU or another device was asked for; 1 when already launched (torchrun, or by us), and
    for --evaluate and --lr-find (which run in one process) unless --nproc says otherwise."""
    if "WORLD_SIZE" in os.environ or args.evaluate:
        return 1
    if args.lr_find and args.nproc is None:
        return 1
    if args.nproc is not None:
        return args.nproc
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus if args.device in ("auto", "cuda") and gpus > 1 else 1


def launch_processes(nproc, argv):
    """Run this script in `nproc` DDP processes through PyTorch's own elastic launcher, as torchrun --standalone
    would. Returns the exit status of the process that failed (its error line is already shown), else 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # each process reports its own error
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, devices.cpu_cores() // nproc)))  # share, not oversubscribe
    rendezvous = dict(rdzv_backend="c10d", rdzv_endpoint="localhost:0", run_id=f"train-{os.getpid()}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, max_restarts=0, **rendezvous)
    try:
        elastic_launch(config, sys.executable)("-u", str(Path(__file__).resolve().parent / "train.py"), *argv)
    except ChildFailedError as e:
        # The status that says what went wrong, whichever process the launcher noticed first: a process's own
        # (2: bad input), then a death by signal (the OOM killer), then 1 (a crash, or a process whose
        # collective broke), last the SIGTERM the launcher sends the others.
        failures = [failure.exitcode for failure in e.failures.values()]
        exitcode = min(failures, key=lambda code: (code == -signal.SIGTERM, code == 1, code < 0))
        return exitcode if exitcode > 0 else 128 - exitcode  # a negative exit code is the signal that ended it
    except SignalException as e:  # Ctrl-C: the processes saved last.pt and stopped
        return 128 + e.sigval
    return 0


class StopRequest:
    """`with StopRequest() as stop:` SIGINT/SIGTERM set stop.signum; the loop finishes its step, saves
    last.pt and exits 130/143."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        # After a stop the process is on its way out: further signals are ignored, so that a second Ctrl-C
        # during shutdown cannot turn the clean exit into a KeyboardInterrupt or a death by signal.
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_IGN if self.signum is not None else handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving last.pt", file=sys.stderr)
        self.signum = signum

    def agreed(self, step, ctx):
        """Whether every process has been asked to stop. Under torchrun, ranks agree every 8 steps."""
        if ctx.world_size == 1:
            return self.signum is not None
        if step % 8 != 7:
            return False
        flag = torch.tensor([0 if self.signum is None else self.signum], device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())
