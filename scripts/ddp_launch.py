"""Lightning's DDP re-launch under Hydra, made multirun-safe.

With ``strategy=ddp`` on one node, Lightning starts ranks 1..N-1 by re-running the script. Its
Hydra support re-uses ``sys.argv`` and ``hydra.run.dir``: inside a multirun that restarts the
whole sweep (``-m`` and the comma lists) in every child, and writes to the single-run folder
instead of the job's. The command below starts each child as a single run of *this job*: the
job's own overrides (one value each) and the job's output directory, so a sweep of N jobs on
G GPUs gives N run directories, not N * G.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

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


def install() -> None:
    """Make Lightning's subprocess launcher use :func:`hydra_job_command` (idempotent)."""
    from lightning_fabric.strategies.launchers import subprocess_script as fabric_launcher
    from pytorch_lightning.strategies.launchers import subprocess_script as pl_launcher

    fabric_launcher._hydra_subprocess_cmd = hydra_job_command
    pl_launcher._hydra_subprocess_cmd = hydra_job_command


@contextmanager
def job_environment() -> Iterator[None]:
    """Run one job's fit; afterwards the launcher's variables and process group are gone again,
    so the next job of a multirun in this process launches its own ranks."""
    saved = {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
