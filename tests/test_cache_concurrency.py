"""Shared caches under concurrent jobs: two real processes that start together on an empty cache
build each entry once and both use it; a process killed halfway through writing an entry leaves no
half-written entry, and the next run rebuilds it with a warning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

#: one job asking for both shared entries: the classifier extractor and the reference statistics
#: (its features), after waiting for the common start signal; it reports how often it built each
JOB = r"""
import json, sys, time
from pathlib import Path
import torch
import metrics.classifier as classifier
import metrics.reference as reference
from datamodules import ImageDataModule
from metrics.reference import load_or_compute_reference

cache, go, out = (Path(a) for a in sys.argv[1:4])
trained = []
real_train = classifier.train_feature_classifier
def counting_train(*args, **kwargs):
    trained.append(1)
    time.sleep(1.0)                       # widen the window in which the other job asks for the entry
    return real_train(*args, **kwargs)
classifier.train_feature_classifier = counting_train
torch.set_num_threads(1)
dm = ImageDataModule(name="digits", data_dir=str(cache / "data"), image_size=8)
dm.setup("fit")
while not go.exists():
    time.sleep(0.01)
extractor = classifier.load_or_train_feature_classifier(dm, cache, epochs=2)
stats, computed = load_or_compute_reference(extractor, dm.split("train"), "digits", "train", 400, (1, 8, 8), cache)
out.write_text(json.dumps({"trained": len(trained), "computed": computed, "accuracy": extractor.test_accuracy,
                           "mu": stats.mu.tolist()}))
"""

#: a job whose reference write is killed (SIGKILL) after half of the file is on disk
KILLED_WRITE = r"""
import os, signal, sys
from pathlib import Path
import numpy as np
import metrics.reference as reference
from datamodules.datasets import load_split
from test_evaluate import CountingExtractor

cache = Path(sys.argv[1])
real_savez = np.savez
def half_then_die(f, **arrays):
    import io
    buffer = io.BytesIO()
    real_savez(buffer, **arrays)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = half_then_die
reference.load_or_compute_reference(CountingExtractor(), load_split("digits", "", "train", 8), "digits", "train", 50,
                                    (1, 8, 8), cache)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}


def test_two_processes_on_an_empty_cache_build_each_entry_once_and_share_it(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    outs = [tmp_path / f"job{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", JOB, str(cache), str(go), str(out)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in outs]
    time.sleep(3.0)                                       # both imported and waiting
    go.touch()                                            # start together
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
    jobs = [json.loads(out.read_text()) for out in outs]
    assert sum(job["trained"] for job in jobs) == 1, jobs        # the classifier was trained once ...
    assert sum(job["computed"] for job in jobs) == 1, jobs       # ... and the statistics computed once
    assert jobs[0]["accuracy"] == jobs[1]["accuracy"] and jobs[0]["mu"] == jobs[1]["mu"]   # both use the one entry
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file() and p.parent.name in ("classifiers", "reference"))
    assert len([e for e in entries if e.endswith((".pt", ".npz"))]) == 2, entries
    assert not [e for e in entries if e.endswith(".tmp")], entries   # no temporary file left behind
    for lock in cache.rglob("*.lock"):
        assert lock.read_text() == "", lock                           # both builds finished cleanly


def test_a_writer_killed_halfway_leaves_no_entry_and_the_next_run_rebuilds_with_a_warning(tmp_path):
    import pytest

    from datamodules.datasets import load_split
    from metrics.cache_files import CacheWarning
    from metrics.reference import cache_path, load_or_compute_reference, reference_spec
    from test_evaluate import CountingExtractor

    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(cache)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr       # killed by SIGKILL mid-write
    extractor = CountingExtractor()
    path = cache_path(cache, reference_spec("digits", "train", 50, (1, 8, 8), extractor.cache_key()))
    assert not path.exists()                                      # only a temporary file was half written
    assert list(path.parent.glob(f".{path.name}.*.tmp"))
    with pytest.warns(CacheWarning, match="was interrupted"):
        stats, computed = load_or_compute_reference(extractor, load_split("digits", "", "train", 8), "digits", "train",
                                                    50, (1, 8, 8), cache)
    assert computed and stats.features.shape == (50, 4)
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))      # the dead writer's leftovers are gone
    again, computed = load_or_compute_reference(extractor, load_split("digits", "", "train", 8), "digits", "train",
                                                50, (1, 8, 8), cache)
    assert not computed


#: a main job's request for the noise-aware classifier (scripts/main_job.py), after the start signal
NOISY_CLASSIFIER_JOB = r"""
import sys, time
from pathlib import Path
from scripts.main_job import cached_noisy_classifier

cache, go, out = (Path(a) for a in sys.argv[1:4])
while not go.exists():
    time.sleep(0.01)
print("ENTRY", cached_noisy_classifier(out, [f"paths.cache_dir={cache}", "logger=csv", "trainer.max_steps=3"]))
"""


def test_two_main_jobs_train_the_noise_aware_classifier_once_and_share_it(tmp_path):
    from models.checkpoints import load_module

    cache, go = tmp_path / "cache", tmp_path / "go"
    runs = [tmp_path / f"job{i}" / "classifier" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", NOISY_CLASSIFIER_JOB, str(cache), str(go), str(run)], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for run in runs]
    time.sleep(3.0)
    go.touch()
    entries = []
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
        entries.append(next(line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("ENTRY ")))
    assert entries[0] == entries[1] and Path(entries[0]).parent == cache / "noisy_classifiers"
    # the build trains in <out>/<cache key> (scripts/main_job.py)
    trained = [run for run in runs if any(run.glob("*/checkpoints/last.ckpt"))]
    assert len(trained) == 1, trained                               # one training run, one entry
    module, _, _ = load_module(entries[0])
    assert module.family == "noisy_classifier"
