"""Exact resume: a run killed with SIGKILL at a (seeded) random step and restarted in its run directory
ends where the uninterrupted run of the same seed ends (weights, optimizer state, results)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"step(\d+)\.ckpt$")


def _command(run_dir: Path, model: str, cache: Path) -> list[str]:
    return [sys.executable, "scripts/train.py", "experiment=smoke", f"model={model}", "logger=csv",
            "callbacks.progress_bar=null", "evaluation.final_extractors=[]", f"paths.cache_dir={cache}",
            "trainer.max_steps=60", "trainer.deterministic=true", "num_threads=1",
            "callbacks.model_checkpoint.every_n_train_steps=5", f"hydra.run.dir={run_dir}"]


def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in (run_dir / "checkpoints").glob("step*.ckpt") if (m := STEP.search(p.name)))


def _final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt


# the DDPM case (about 3 minutes on 2 cores) runs with `make test-all`; the GAN case (manual
# optimisation, two optimizers, EMA, batch-norm refresh) covers exact resume in `make test`
@pytest.mark.parametrize("model", [pytest.param("ddpm", marks=pytest.mark.slow), "gan"])
def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(model, tmp_path, shared_cache):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(whole, model, shared_cache), cwd=ROOT, env=_env(), check=True, capture_output=True)

    rng = random.Random(f"{model}-kill")          # seeded: a failure names a step that reproduces it
    kill_after = rng.randint(10, 40)              # a checkpoint at or after this step, then a short delay
    proc = subprocess.Popen(_command(killed, model, shared_cache), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not any(s >= kill_after for s in _checkpoint_steps(killed)):
            time.sleep(0.01)
        time.sleep(rng.random() * 0.1)  # lands a few steps further on
        assert proc.poll() is None, "the run finished before it could be killed; lower kill_after"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    interrupted_at = max(_checkpoint_steps(killed))
    assert interrupted_at < 60 and not (killed / "results.json").exists()
    resumed = subprocess.run(_command(killed, model, shared_cache), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout

    a, b = _final_state(whole), _final_state(killed)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # weights and EMA weights, bit for bit
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (key, interrupted_at)
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values()):
            for name in sa:
                assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), name
    ra = json.loads((whole / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    assert rb["status"] == "ok" and rb["train_steps"] == ra["train_steps"]
    assert rb["metrics"].keys() == ra["metrics"].keys()
    for name, value in ra["metrics"].items():
        if "sec" in name:  # wall-clock timings, not results
            continue
        assert rb["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
