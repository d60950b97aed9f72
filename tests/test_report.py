"""make_table: the table maths on hand-made results.json files, broken runs, W&B == local."""
import json
import math
from types import SimpleNamespace

import pytest

from metrics.report import build_table, collect_local, mean_std, to_csv, to_latex, to_markdown
from scripts.make_table import make_table


def _results(model, seed, fid, precision, bpd=None, kind=None, extra_fid=None):
    metrics = {"fid": fid, "precision": precision, "recall": 0.5, "nfe": 1.0 if model != "ddpm" else 50.0}
    if bpd is not None:
        metrics["bpd"] = bpd
    if extra_fid is not None:
        metrics["inception_pool/fid"] = extra_fid
    return {"model": model, "dataset": "digits", "seed": seed, "num_params": 1000, "train_steps": 10,
            "feature_extractor": "classifier", "num_samples": 256, "sampler": {}, "likelihood_kind": kind,
            "metrics": metrics, "status": "ok", "config": {"datamodule": {"image_size": 8}}}


@pytest.fixture
def sweep(tmp_path):
    runs = [_results("gan", 0, 30.0, 0.6, extra_fid=100.0), _results("gan", 1, 34.0, 0.7), _results("gan", 2, 32.0, 0.8),
            _results("ddpm", 0, 10.0, 0.9, 4.0, "elbo", extra_fid=50.0), _results("ddpm", 1, 14.0, 0.5, 5.0, "elbo"),
            _results("realnvp", 0, 60.0, 0.4, 3.0, "dequantized")]
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    broken = tmp_path / "6"
    (broken / ".hydra").mkdir(parents=True)
    (broken / ".hydra" / "config.yaml").write_text("seed: 3\n")               # job died before results.json
    failed = tmp_path / "7"
    failed.mkdir()
    (failed / "results.json").write_text(json.dumps({**_results("vae", 0, 1.0, 1.0), "status": "failed",
                                                     "error": "FloatingPointError: non-finite training loss"}))
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "results.json").write_text('{"model": "vae", "metr')    # half-written by hand
    return tmp_path, runs


def test_mean_and_sample_std():
    assert mean_std([30.0, 34.0, 32.0]) == (32.0, 2.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_table_maths_best_marking_and_failed_runs(sweep):
    root, _ = sweep
    records = collect_local([root])
    table = build_table(records)
    rows = {row["model"]: row for row in table.rows}
    assert set(rows) == {"gan", "ddpm", "realnvp"}                          # failed runs are not averaged in
    assert rows["gan"]["fid"].mean == 32.0 and rows["gan"]["fid"].std == 2.0 and rows["gan"]["fid"].n == 3
    assert rows["ddpm"]["fid"].mean == 12.0 and rows["ddpm"]["fid"].std == pytest.approx(math.sqrt(8))
    assert rows["ddpm"]["fid"].best and not rows["gan"]["fid"].best        # lower FID is better
    assert rows["ddpm"]["precision"].mean == pytest.approx(0.7)
    assert rows["gan"]["precision"].best                                    # higher precision is better (0.7 = 0.7)
    assert rows["realnvp"]["bpd"].best and rows["realnvp"]["bpd_kind"] == "dequantized" and rows["ddpm"]["bpd_kind"] == "bound"
    assert "bpd" not in rows["gan"]
    # the extra extractor is its own column, never mixed with the primary one
    assert rows["gan"]["inception_pool/fid"].mean == 100.0 and rows["gan"]["inception_pool/fid"].n == 1
    problems = sorted(r.problem for r in table.failed)
    assert len(problems) == 3
    assert any("no results.json" in p for p in problems) and any("non-finite training loss" in p for p in problems)
    assert any("unreadable" in p for p in problems)
    # 95% Student-t intervals over seeds, against scipy's own interval
    from scipy import stats
    low, high = stats.t.interval(0.95, 1, loc=12.0, scale=math.sqrt(8) / math.sqrt(2))
    assert rows["ddpm"]["fid"].half_width == pytest.approx((high - low) / 2)            # 25.41 for 2 seeds
    low, high = stats.t.interval(0.95, 2, loc=32.0, scale=2.0 / math.sqrt(3))
    assert rows["gan"]["fid"].half_width == pytest.approx((high - low) / 2)
    assert rows["realnvp"]["fid"].half_width == 0.0                                      # one seed: no interval
    md = to_markdown(table)
    assert "**12.00 ± 25.41**" in md and "FID [classifier]" in md and "FID [inception_pool]" in md
    assert "Failed or incomplete runs" in md and "non-finite training loss" in md
    assert "3.000 (dequantized)" in md and "num samples 256" in table.caption and "Student t" in table.caption
    tex = to_latex(table)
    assert r"\toprule" in tex and r"\textbf{12.00 $\pm$ 25.41}" in tex
    csv_text = to_csv(table)
    assert "fid_mean,fid_std,fid_ci95,fid_best" in csv_text and "FAILED" in csv_text


def test_group_by_a_config_key(sweep):
    root, _ = sweep
    table = build_table(collect_local([root]), group_by=["model", "datamodule.image_size"])
    assert all(row["datamodule.image_size"] == 8 for row in table.rows)


def test_mixed_primary_extractors_are_refused(tmp_path):
    for i, ext in enumerate(["classifier", "inception_pool"]):
        r = _results("gan", i, 1.0, 1.0)
        r["feature_extractor"] = ext
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    with pytest.raises(ValueError, match="not comparable"):
        build_table(collect_local(sorted(tmp_path.glob("*.json"))))


class FakeApi:
    """Recorded W&B run objects: what wandb.Api().runs returns (path, state, summary, config)."""

    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def test_wandb_source_gives_the_same_table_as_local(sweep, tmp_path):
    root, runs = sweep
    recorded = [SimpleNamespace(path=["me", "genbench", f"id{i}"], state="finished",
                                summary={k: v for k, v in r.items() if k != "config"}, config=r["config"])
                for i, r in enumerate(runs)]
    recorded.append(SimpleNamespace(path=["me", "genbench", "crashed"], state="crashed", summary={}, config={}))
    api = FakeApi(recorded)
    wandb_table, _ = make_table(wandb_project="genbench", wandb_entity="me", wandb_group="main", wandb_tags=["digits"],
                                out=tmp_path / "w", log_wandb_table=False, api=api)
    assert api.calls == [("me/genbench", {"group": "main", "tags": {"$in": ["digits"]}})]
    local_table = build_table([r for r in collect_local([root]) if r.ok])
    strip = lambda md: md.split("\n\nFailed")[0].strip()
    assert strip(to_markdown(wandb_table)) == strip(to_markdown(local_table))
    assert [r.source for r in wandb_table.failed] == ["me/genbench/crashed"]
    assert (tmp_path / "w" / "table.tex").is_file() and (tmp_path / "w" / "table.csv").is_file()


def test_cli_writes_three_formats(sweep, capsys):
    from scripts.make_table import main
    root, _ = sweep
    main([str(root)])
    out = capsys.readouterr().out
    assert "| model |" in out and "Failed or incomplete runs" in out
    for ext in ("md", "tex", "csv"):
        assert (root / f"table.{ext}").is_file()


def _write_runs(root, runs):
    for i, r in enumerate(runs):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "results.json").write_text(json.dumps(r))
    return collect_local([root])


def test_runs_that_differ_in_what_a_number_means_get_separate_rows(tmp_path):
    """Two datasets, two N, two samplers: never averaged into one cell. Each differing setting
    becomes a row key (a column); the settings every row shares go to the caption."""
    ddim = {"name": "ddim", "steps": 50, "eta": 1.0}
    runs = [{**_results("ddpm", s, 10.0 + s, 0.9), "sampler": ddim} for s in range(2)]
    runs += [{**_results("ddpm", 0, 20.0, 0.9), "sampler": {"name": "ancestral", "steps": None, "eta": 1.0}}]
    runs += [{**_results("ddpm", 0, 30.0, 0.9), "sampler": ddim, "num_samples": 1000}]
    runs += [{**_results("ddpm", 0, 40.0, 0.9), "sampler": ddim, "dataset": "mnist"}]
    table = build_table(_write_runs(tmp_path, runs))
    assert table.group_by == ["model", "dataset", "sampler", "num_samples"]
    cells = {(r["dataset"], r["sampler"], r["num_samples"]): r["fid"] for r in table.rows}
    assert cells[("digits", "ddim-50 eta=1", "256")].n == 2 and cells[("digits", "ddim-50 eta=1", "256")].mean == 10.5
    assert cells[("digits", "ancestral eta=1", "256")].mean == 20.0
    assert cells[("digits", "ddim-50 eta=1", "1000")].mean == 30.0 and cells[("mnist", "ddim-50 eta=1", "256")].mean == 40.0
    assert "image size 8" in table.caption and "unconditional" in table.caption


def test_a_deliberately_mixed_row_is_refused_naming_the_key(tmp_path):
    from metrics.report import IncomparableRunsError

    runs = [_results("gan", 0, 30.0, 0.6), {**_results("gan", 1, 34.0, 0.7), "num_samples": 1000}]
    records = _write_runs(tmp_path, runs)
    with pytest.raises(IncomparableRunsError, match=r"differ in num_samples: \['1000', '256'\]"):
        build_table(records, mixed="refuse")
    with pytest.raises(IncomparableRunsError, match="differ in num_samples"):
        make_table([str(tmp_path)], mixed="refuse")
    assert len(build_table(records).rows) == 2          # the default splits them
