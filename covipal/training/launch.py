"""Several processes for stages targets, 1 and 2: DeepSpeed's launcher, on GPUs or on the CPU.

``deepspeed.processes: N`` (``ops.targets_processes: N`` for the targets stage) makes a
stage entry point start itself again under DeepSpeed's launcher (:func:`relaunch`)::

    python -m deepspeed.launcher.runner --num_gpus N --master_port P --no_local_rank pipelines/stage1.py ...

- On a GPU host that is one process per GPU, joined with NCCL (``deepspeed --num_gpus N``).
- Without CUDA, DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) takes ``--num_gpus N``
  as N local "devices" and starts N CPU processes; :func:`covipal.training.ds.initialize`
  joins them with gloo. Checked with DeepSpeed 0.19 on a 2-core machine. The launcher's
  ``--bind_cores_to_rank`` needs ``numactl`` (not installed there), so instead each
  process gets ``OMP_NUM_THREADS = cores // N`` unless it is set already.
- ``deepspeed.hostfile`` adds ``--hostfile`` (several hosts: passwordless ssh and pdsh,
  a folder shared by all hosts, ``processes`` per host); not tested here.

Under a launcher already (``LOCAL_RANK`` set: ``deepspeed --hostfile h pipelines/stage1.py``
or ``torchrun --nproc_per_node 2 pipelines/stage1.py`` by hand) nothing is relaunched.
Each process trains on its own share of the batches (:class:`RankBatches`), or writes
its own share of the target shards; only rank 0 writes the other outputs, metrics and
MLflow runs. The process group itself (:func:`join_process_group`, with the environment a
launcher would set for a single process) is joined here too, lazily, by whoever needs it first.
"""

from __future__ import annotations

import atexit
import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def under_launcher() -> bool:
    """Whether a launcher (deepspeed, torchrun) started this process."""
    return "LOCAL_RANK" in os.environ


def needs_launcher(processes: int, hostfile: str | None) -> bool:
    """Whether a stage with these settings must be (re)started under the launcher."""
    return (processes > 1 or hostfile is not None) and not under_launcher()


def launcher_command(script: str | Path, args: list[str], processes: int, hostfile: str | Path | None = None,
                     master_port: int | None = None) -> list[str]:
    """The DeepSpeed launcher command line running ``script args`` in ``processes`` processes per host."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes),
           "--master_port", str(master_port or free_port()), "--no_local_rank"]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    return cmd + [str(script), *args]


def launcher_env(processes: int) -> dict[str, str]:
    """The environment for the launched processes: the CPU accelerator without CUDA, threads per process."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def relaunch(script: str | Path, args: list[str], processes: int, hostfile: str | Path | None = None,
             cwd: str | Path | None = None) -> int:
    """Run ``script args`` under the DeepSpeed launcher and return its exit status."""
    cmd = launcher_command(script, args, processes, hostfile)
    print(f"starting {processes} process(es) per host: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, env=launcher_env(processes), cwd=cwd).returncode


def barrier() -> None:
    """Wait for every process (joining the process group first if needed); nothing with one process."""
    if world_size() == 1:
        return
    import torch

    join_process_group()
    torch.distributed.barrier()


def gather(obj) -> list:
    """``obj`` of every process, in rank order (``[obj]`` with one process); a collective call."""
    if world_size() == 1:
        return [obj]
    import torch

    barrier()  # joins the process group if needed
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class RankBatches:
    """This rank's share of ``batches``: every ``world``-th batch from ``rank`` on.

    Every rank gets the same number of batches (``len(batches) // world``; the remainder
    is skipped), so no rank waits for a gradient all-reduce that never comes.
    """

    def __init__(self, batches: Iterable, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches) // self.world

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.rank, len(self) * self.world, self.world)


class ShardsForRank:
    """:class:`~covipal.training.targets.TargetShards` as ``stage1.train`` reads it, one rank's share per epoch."""

    def __init__(self, shards, rank: int, world: int):
        self.shards, self.rank, self.world = shards, rank, world
        self.settings = shards.settings

    def __len__(self) -> int:
        return len(self.shards)

    def epoch(self, batch_size: int, seed: int, epoch: int) -> RankBatches:
        return RankBatches(self.shards.epoch(batch_size, seed, epoch), self.rank, self.world)


def free_port() -> int:
    """A TCP port free on this host now (the master port of a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """Set the distributed env vars a launcher would, where absent; ``DS_ACCELERATOR=cpu`` without CUDA.

    Returns the variables it set.
    """
    import torch

    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in os.environ:
        defaults["MASTER_PORT"] = str(free_port())
    if not torch.cuda.is_available():
        defaults["DS_ACCELERATOR"] = "cpu"
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    return added


def interpreter_tools_first() -> None:
    """Put this interpreter's ``bin`` folder first on ``PATH`` (once), so that DeepSpeed's JIT
    build of its CPU comm op always runs the same ``ninja``: the virtual environment's (a
    DeepSpeed dependency) and the system's record build commands differently, and every switch
    between them rebuilds the op (about 45 s on 2 cores)."""
    tools = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != tools:
        os.environ["PATH"] = tools + os.pathsep + path if path else tools


def join_process_group() -> None:
    """Join the process group (NCCL on a GPU, gloo on the CPU) if this process has not yet, after
    :func:`single_process_env` and :func:`interpreter_tools_first`; leave it at exit.

    Leaving it explicitly matters: a gloo process that exits with its group still open can
    abort in teardown ("terminate called without an active exception", exit status -6),
    seen once in CI after two launched processes had finished their work.
    """
    import deepspeed
    import torch

    single_process_env()
    interpreter_tools_first()
    if not torch.distributed.is_initialized():

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(leave_process_group)


def leave_process_group() -> None:
    """Destroy the default process group if one is open (registered at exit by :func:`join_process_group`)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
