"""Disk full or read-only output folder when results are written: a clear error, and the
previous results.json intact (never a half-written one)."""
from __future__ import annotations

import errno
import json
import tempfile

import pytest

from models.configs import compose
from metrics import results as results_module
from metrics.results import ResultsWriteError, write_json
from scripts.train import train


def _fail_fsync(code: int, message: str):
    def fsync(fd):
        raise OSError(code, message)
    return fsync


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EROFS, "Read-only file system")])
def test_failed_write_keeps_the_previous_file_and_names_the_fix(tmp_path, monkeypatch, code, message):
    path = tmp_path / "results.json"
    write_json(path, {"metrics": {"fid": 1.0}})
    monkeypatch.setattr(results_module.os, "fsync", _fail_fsync(code, message))
    with pytest.raises(ResultsWriteError, match=f"{message}.*previous file.*intact"):
        write_json(path, {"metrics": {"fid": 2.0}})
    assert json.loads(path.read_text()) == {"metrics": {"fid": 1.0}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_unwritable_folder_is_reported_before_anything_is_written(tmp_path, monkeypatch):
    def mkstemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(ResultsWriteError, match="Permission denied.*writable"):
        write_json(tmp_path / "results.json", {"metrics": {}})


def test_disk_full_at_the_end_of_a_run_fails_loudly_and_keeps_the_earlier_results(tmp_path, smoke_overrides,
                                                                                  monkeypatch):
    cfg = compose("train", smoke_overrides + ["model=gan", "trainer.max_steps=4"], tmp_path)
    train(cfg)
    before = (tmp_path / "results.json").read_text()

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, prefix="", **kwargs):  # the disk fills up just as results.json is written
        if prefix.startswith(".results.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkstemp(*args, prefix=prefix, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    cfg = compose("train", smoke_overrides + ["model=gan", "trainer.max_steps=8", "ckpt_path=null"], tmp_path)
    with pytest.raises(ResultsWriteError, match="No space left on device.*free space"):
        train(cfg)
    assert (tmp_path / "results.json").read_text() == before
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
