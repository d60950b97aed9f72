"""The SLURM preset: what it would submit, and a sweep run through the launcher end to end with
submitit's debug executor (no cluster is reachable from the tests)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from conftest import ROOT

from models.configs import compose

# Runs scripts/train.py with submitit.AutoExecutor replaced by one that records what the
# launcher asks SLURM for and runs the jobs in this process with the debug executor.
RUNNER = """
import json, sys
from pathlib import Path
import submitit

record = Path(sys.argv.pop(1))
RealExecutor = submitit.AutoExecutor


class RecordingDebugExecutor:
    def __init__(self, folder, cluster=None, **init_params):
        self.calls = {"cluster": cluster, "folder": str(folder), "init": init_params}
        self.inner = RealExecutor(folder=folder, cluster="debug")

    def update_parameters(self, **params):
        self.calls["params"] = params
        record.write_text(json.dumps(self.calls, default=str))
        self.inner.update_parameters(**{k: v for k, v in params.items() if not k.startswith("slurm_")})

    def map_array(self, fn, *args):
        return self.inner.map_array(fn, *args)


submitit.AutoExecutor = RecordingDebugExecutor
sys.argv[0] = "scripts/train.py"
import runpy
runpy.run_path("scripts/train.py", run_name="__main__")
"""


def test_slurm_preset_composes_with_the_cluster_shape():
    cfg = compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                         "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu"], keep_hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min == 1440 and launcher.max_num_timeout == 5


def test_slurm_sweep_through_submitit_runs_each_job_and_would_submit_the_right_job(tmp_path, shared_cache):
    record = tmp_path / "submission.json"
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(record), "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
         "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=90",
         f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}", "experiment=smoke", "model=vae",
         "seed=0,1", "logger=csv", "callbacks.progress_bar=null", "evaluation.final_extractors=[]",
         f"paths.cache_dir={shared_cache}", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "ok" and results["seed"] == int(job)

    calls = json.loads(record.read_text())
    assert calls["cluster"] == "slurm" and calls["init"] == {"slurm_max_num_timeout": 5}
    params = calls["params"]
    assert params["nodes"] == 2 and params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4
    assert params["timeout_min"] == 90 and params["slurm_partition"] == "gpu"
    assert params["slurm_signal_delay_s"] == 120 and params["slurm_setup"] == ["export NCCL_DEBUG=WARN"]

    # the sbatch script submitit would write from those parameters (a stand-in srun satisfies its check)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(stat.S_IRWXU)
    script = subprocess.run(
        [sys.executable, "-c",
         "import json, sys, submitit\n"
         "calls = json.loads(open(sys.argv[1]).read())\n"
         "ex = submitit.AutoExecutor(folder=sys.argv[2], cluster='slurm', **calls['init'])\n"
         "ex.update_parameters(**calls['params'])\n"
         "print(ex._executor._make_submission_file_text('python -u -m submitit.core._submit', 'uid'))\n",
         str(record), str(tmp_path / "submitit")],
        env={**env, "PATH": f"{fake_bin}{os.pathsep}{env['PATH']}"}, capture_output=True, text=True, check=True).stdout
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --time=90", "#SBATCH --signal=USR2@120",
                 "#SBATCH --open-mode=append", "export NCCL_DEBUG=WARN"):
        assert line in script, (line, script)
