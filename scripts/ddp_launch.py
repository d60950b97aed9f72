"""Single-node DDP under Hydra, multirun-safe, through public interfaces only.

With ``strategy=ddp`` on one node, Lightning would start ranks 1..N-1 by re-running
``sys.argv``: inside a Hydra multirun that restarts the whole sweep (``-m`` and the comma lists)
in every child. Instead, genbench starts the job's ranks itself, the way torchrun does: each child
is a single run of *this job* (the job's own overrides, one value each, and the job's output
directory), told its rank by the standard variables (MASTER_ADDR, MASTER_PORT, NODE_RANK,
LOCAL_RANK, WORLD_SIZE). Lightning's cluster environment then sees ``LOCAL_RANK`` and treats the
processes as created externally, so nothing re-runs the sweep. A sweep of N jobs on G GPUs
gives N run directories, not N * G.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

from metrics.distributed import free_port

#: what the launcher exports into its own environment; left behind, the next job of a multirun
#: in this process would believe it is a child rank ("LOCAL_RANK" set) and wait for peers forever
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """(argv, cwd) of the process of ``local_rank`` for the Hydra job running in this process."""
    import __main__
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)
    command += [f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
                f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
                "hydra.output_subdir=null"]  # only rank 0 writes .hydra/
    return command, get_original_cwd()


def needs_own_launch(strategy, devices, num_nodes: int) -> bool:
    """Whether this process must start the job's other ranks: the subprocess-script DDP strategy
    on one node with several devices, not already a rank started by someone else (torchrun,
    SLURM, or genbench itself)."""
    from hydra.core.hydra_config import HydraConfig
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if not HydraConfig.initialized():   # train() called directly (tests): Lightning's own launch
        return False
    name = strategy if isinstance(strategy, str) else ""
    count = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else 1
    return (name.startswith("ddp") and not name.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook"))
            and count > 1 and int(num_nodes) == 1 and "LOCAL_RANK" not in os.environ
            and not SLURMEnvironment.detect() and not TorchElasticEnvironment.detect())


@contextmanager
def job_ranks(strategy, devices, num_nodes: int = 1) -> Iterator[None]:
    """Run one job's fit. Where :func:`needs_own_launch`, start ranks 1..N-1 of this job first and
    wait for them at the end. Afterwards the launcher's variables and process group are gone
    again, so the next job of a multirun in this process launches its own ranks."""
    saved = {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}
    children: list[subprocess.Popen] = []
    try:
        if needs_own_launch(strategy, devices, num_nodes):
            world = int(devices) if isinstance(devices, int) else len(devices)
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0",
                              WORLD_SIZE=str(world), LOCAL_RANK="0")
            for rank in range(1, world):
                command, cwd = hydra_job_command(rank)
                children.append(subprocess.Popen(command, cwd=cwd, env={**os.environ, "LOCAL_RANK": str(rank)}))
        yield
    except BaseException:
        for child in children:   # rank 0 failed: its peers would wait for it forever
            child.kill()
        raise
    finally:
        for child in children:
            if child.wait() != 0:
                print(f"DDP rank process {child.args!r} exited with {child.returncode}", file=sys.stderr)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
