"""Files from someone else never run code: every entry point that loads a checkpoint, a cache entry
or an array file refuses a crafted one, and the code inside it never runs.

The crafted files carry a pickle whose loading would create a marker file (``open(marker, "w")``):
``torch.load(weights_only=False)`` or ``np.load(allow_pickle=True)`` would create it."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from models.configs import compose


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the pickle ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted_checkpoint(path: Path, marker: Path, base: dict | None = None) -> Path:
    """A Lightning-looking checkpoint (a real one's entries, if given) with the payload inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(base or {"state_dict": {}, "global_step": 1}), "callbacks": {"x": Payload(marker)}}, path)
    assert not marker.exists()
    return path



@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code_ran"


def test_the_payload_really_runs_when_loaded_unsafely(tmp_path, marker):
    """The crafted file is a real threat (a test of the refusals below that could not fail is none)."""
    path = crafted_checkpoint(tmp_path / "x.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_training_resume_refuses_a_crafted_checkpoint(tmp_path, marker, smoke_overrides):
    from models.checkpoints import UnsafeFileError
    from scripts.train import train

    ckpt = crafted_checkpoint(tmp_path / "other" / "last.ckpt", marker)
    with pytest.raises(UnsafeFileError, match=r"last.ckpt was refused: loading it would execute code"):
        train(compose("train", [*smoke_overrides, f"ckpt_path={ckpt}"], tmp_path / "run"))
    # the automatic resume from the run dir's own last.ckpt (a requeued job) too
    crafted_checkpoint(tmp_path / "run2" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(UnsafeFileError):
        train(compose("train", smoke_overrides, tmp_path / "run2"))
    assert not marker.exists()


def test_lightnings_own_resume_path_loads_weights_only(tmp_path, marker, smoke_overrides, monkeypatch):
    """With genbench's own check out of the way, Lightning's resume still refuses to run the file."""
    import scripts.train as train_script

    monkeypatch.setattr(train_script, "check_checkpoint", lambda path: path)
    ckpt = crafted_checkpoint(tmp_path / "other" / "last.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_script.train(compose("train", [*smoke_overrides, f"ckpt_path={ckpt}"], tmp_path / "run"))
    assert not marker.exists()


def test_evaluate_and_the_guidance_sweep_refuse_a_crafted_checkpoint(tmp_path, marker, shared_cache):
    from models.checkpoints import UnsafeFileError
    from scripts.evaluate import evaluate
    from scripts.guidance_sweep import guidance_sweep

    ckpt = crafted_checkpoint(tmp_path / "x.ckpt", marker)
    with pytest.raises(UnsafeFileError, match="x.ckpt was refused"):
        evaluate(compose("eval", [f"ckpt_path={ckpt}", f"paths.cache_dir={shared_cache}"], tmp_path / "eval"))
    with pytest.raises(UnsafeFileError, match="x.ckpt was refused"):
        guidance_sweep(compose("guidance_sweep", [f"ckpt_path={ckpt}", f"paths.cache_dir={shared_cache}",
                                                  "scales=[0,1]"], tmp_path / "sweep"))
    assert not marker.exists()


def test_a_crafted_guidance_classifier_is_refused(tmp_path, marker, smoke_checkpoint):
    from models.checkpoints import UnsafeFileError, load_module

    model, _, _ = load_module(smoke_checkpoint)
    ckpt = crafted_checkpoint(tmp_path / "classifier.ckpt", marker)
    with pytest.raises(UnsafeFileError, match="classifier.ckpt was refused"):
        model.guidance_classifier(classifier_ckpt=str(ckpt))
    assert not marker.exists()


def test_a_stored_config_naming_foreign_code_is_refused(tmp_path, smoke_checkpoint):
    """A checkpoint of plain data whose stored run config would instantiate something else
    (``_target_: os.system``, or a path through a genbench module to another object)."""
    from models.checkpoints import UnsafeFileError, load_module
    from scripts.evaluate import evaluate

    real = torch.load(smoke_checkpoint, weights_only=True)
    for where, target in (("model", "os.system"), ("model.net", "models.checkpoints.torch.load"),
                          ("datamodule", "subprocess.Popen")):
        config = {**real["genbench_config"]}
        node = config
        for key in where.split("."):
            node[key] = dict(node[key])
            node = node[key]
        node["_target_"] = target
        path = tmp_path / f"{where}.ckpt"
        torch.save({**real, "genbench_config": config}, path)
        with pytest.raises(UnsafeFileError, match=rf"would instantiate '{target}' \(at {where}\)"):
            load_module(path)
    with pytest.raises(UnsafeFileError):
        evaluate(compose("eval", [f"ckpt_path={tmp_path / 'model.ckpt'}"], tmp_path / "eval"))


def test_a_crafted_classifier_cache_entry_is_refused_and_rebuilt_with_a_warning(tmp_path, marker):
    from datamodules import ImageDataModule
    from metrics.cache_files import CacheWarning
    from metrics.classifier import cache_key, load_or_train_feature_classifier

    dm = ImageDataModule(name="digits", data_dir=str(tmp_path / "data"), image_size=8, batch_size=16)
    dm.setup("fit")
    epochs = 1
    key = cache_key(dm.name, dm.image_size, dm.channels, dm.num_classes, 0, epochs)
    entry = tmp_path / "cache" / "classifiers" / f"{dm.name}-{key}.pt"
    entry.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "test_accuracy": 1.0, "channels": 1, "num_classes": 10, "x": Payload(marker)}, entry)
    with pytest.warns(CacheWarning, match="classifier cache entry .* is invalid .*would execute code"):
        extractor = load_or_train_feature_classifier(dm, tmp_path / "cache", epochs=epochs)
    assert not marker.exists()
    rebuilt = torch.load(entry, weights_only=True)                     # a valid entry replaced it
    assert rebuilt["state_dict"] and rebuilt["test_accuracy"] == extractor.test_accuracy


def test_a_crafted_reference_cache_entry_is_refused_and_rebuilt(tmp_path, marker):
    from datamodules.datasets import load_split
    from metrics.cache_files import CacheWarning
    from metrics.reference import cache_path, load_or_compute_reference, reference_spec
    from test_evaluate import CountingExtractor

    dataset = load_split("digits", "", "train", 8)
    extractor = CountingExtractor()
    path = cache_path(tmp_path, reference_spec("digits", "train", 50, (1, 8, 8), extractor.cache_key()))
    path.parent.mkdir(parents=True)
    np.savez(path, mu=np.zeros(4), sigma=np.eye(4), features=np.array([Payload(marker)], dtype=object),
             spec=np.array("{}"))
    with pytest.warns(CacheWarning, match="invalid .*allow_pickle"):
        stats, computed = load_or_compute_reference(extractor, dataset, "digits", "train", 50, (1, 8, 8), tmp_path)
    assert computed and stats.features.shape[0] == 50
    assert not marker.exists()


def test_npz_sample_sets_and_statistics_with_pickled_arrays_are_refused(tmp_path, marker):
    from metrics.image_sets import ImageSetError, load_npz, npz_statistics

    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=np.array([Payload(marker)], dtype=object), mu=np.array([Payload(marker)], dtype=object),
             sigma=np.eye(1))
    with pytest.raises(ImageSetError, match="without pickles"):
        load_npz(path)
    with pytest.raises(ImageSetError, match="without pickles"):
        npz_statistics(path)
    assert not marker.exists()


def test_genbench_checkpoints_of_every_family_load_weights_only(tmp_path, smoke_overrides):
    """Nothing genbench writes needs a pickle: a checkpoint of each family reads with weights_only=True."""
    from models.checkpoints import load_module
    from scripts.train import train

    from models.registry import families

    for family in families():
        out = tmp_path / family
        train(compose("train", [*smoke_overrides, f"model={family}", "trainer.max_steps=2",
                             "evaluation.num_samples=8", "evaluation.bpd_num_images=0"], out))
        model, _, ckpt = load_module(out / "checkpoints" / "last.ckpt")
        assert model.family == family and ckpt["global_step"] >= 2
