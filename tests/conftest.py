"""Shared fixtures: compose the real configs (conf/) with tiny CPU overrides."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from models.configs import CONF_DIR, compose  # noqa: F401  (CONF_DIR: for the tests)

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")



@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache (classifier, reference statistics) for the whole session, as a user's would be."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def smoke_overrides(tmp_path, shared_cache) -> list[str]:
    """The smoke preset, CSV logging, no progress bar, classifier features only (the Inception
    extractor is exercised by its own tests and the CLI test)."""
    return ["experiment=smoke", "logger=csv", "callbacks.progress_bar=null", "evaluation.final_extractors=[]",
            f"paths.cache_dir={shared_cache}", f"paths.data_dir={tmp_path / 'data'}"]


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory, shared_cache) -> Path:
    """A DDPM trained by the smoke preset (once per session) for evaluation tests."""
    from scripts.train import train

    out = tmp_path_factory.mktemp("smoke_run")
    cfg = compose("train", ["experiment=smoke", "logger=csv", "callbacks.progress_bar=null",
                         "evaluation.final_extractors=[]", f"paths.cache_dir={shared_cache}"], out)
    train(cfg)
    return out / "checkpoints" / "last.ckpt"
