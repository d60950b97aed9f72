"""A live overview of a running sweep: jobs done / running / failed of the total, the current
stage, elapsed time and an estimate of the time left, read from the run directories as the jobs
write them (each job still logs to its own file).

The estimate counts a running job by its share of training steps done (its csv/metrics.csv and
.hydra/config.yaml), so it moves during the first jobs too.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from metrics.results import RESULTS_FILE


@dataclass
class SweepStatus:
    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    progress: float = 0.0      # jobs' worth of work finished (running jobs count fractionally)

    @property
    def pending(self) -> int:
        return max(self.total - self.done - self.failed - self.running, 0)


def job_fraction(job_dir: Path) -> float:
    """Share of a running job's training steps done, from the last row of its CSV log."""
    try:
        max_steps = OmegaConf.load(job_dir / ".hydra" / "config.yaml").trainer.max_steps
        with open(job_dir / "csv" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        step = max(int(float(r["step"])) for r in rows if r.get("step"))
        return min(step / float(max_steps), 1.0) if max_steps and max_steps > 0 else 0.0
    except (OSError, KeyError, ValueError, TypeError, AttributeError):
        return 0.0


def sweep_status(runs_dir: Path, total: int) -> SweepStatus:
    status = SweepStatus(total)
    jobs = sorted(p.parent.parent for p in Path(runs_dir).glob("*/.hydra/config.yaml")) if Path(runs_dir).is_dir() else []
    for job in jobs:
        results = job / RESULTS_FILE
        try:
            state = json.loads(results.read_text()).get("status", "ok") if results.is_file() else None
        except (OSError, json.JSONDecodeError):
            state = None   # being written: counted as running
        if state == "ok":
            status.done += 1
            status.progress += 1
        elif state is not None:
            status.failed += 1
            status.progress += 1
        else:
            status.running += 1
            status.progress += job_fraction(job)
    return status


def clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def overview_line(stage: str, status: SweepStatus, stage_elapsed: float, elapsed: float) -> str:
    left = "estimating" if status.progress <= 0 else \
        "~" + clock(stage_elapsed * (status.total - status.progress) / status.progress)
    return (f"[{clock(elapsed)}] {stage}: {status.done}/{status.total} done, {status.running} running, "
            f"{status.failed} failed, {status.pending} waiting | this stage {clock(stage_elapsed)}, {left} left")


def watch(proc: subprocess.Popen, runs_dir: Path, total: int, stage: str, started: float,
          every: float = 2.0, quiet_every: float = 60.0) -> int:
    """Show the sweep's overview until ``proc`` ends; return its exit code. On a terminal one
    line is rewritten in place; in a log (CI) a line is printed when the counts change, or every
    ``quiet_every`` seconds."""
    stage_start, last_printed, last_counts = time.monotonic(), 0.0, None
    tty = sys.stdout.isatty()
    while True:
        code = proc.poll()
        status = sweep_status(runs_dir, total)
        now = time.monotonic()
        line = overview_line(stage, status, now - stage_start, time.perf_counter() - started)
        counts = (status.done, status.running, status.failed)
        if tty:
            print("\r" + line.ljust(110), end="", flush=True)
        elif counts != last_counts or now - last_printed >= quiet_every or code is not None:
            print(line, flush=True)
            last_printed, last_counts = now, counts
        if code is not None:
            if tty:
                print(flush=True)
            return code
        time.sleep(every)
