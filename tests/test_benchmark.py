"""scripts/benchmark.py runs and writes comparable figures (no timing assertions: targets live in
the benchmark output, not in tests)."""
import json

from scripts.benchmark import main


def test_benchmark_writes_json_and_markdown(tmp_path, shared_cache):
    main(["--quick", "--families", "gan", "--fid-dim", "128", "--sample-n", "4", "--out", str(tmp_path),
          "--cache-dir", str(shared_cache), "--fast-paths", "fused Adam", "--fast-repeats", "1", "--batches", "4"])
    result = json.loads((tmp_path / "benchmark.json").read_text())
    (row,) = result["training"]
    assert row["family"] == "gan" and row["genbench_img_s"] > 0 and row["bare_img_s"] > 0
    assert result["fid_vs_sqrtm"]["rel_diff"] < 1e-6
    assert result["evaluation"]["extractor_passes_per_image"] == 1.0
    assert result["evaluation"]["real_image_passes_first"] > 0      # a cold reference cache ...
    assert result["evaluation"]["real_image_passes_second"] == 0    # ... then none
    head, default, fused = result["fast_paths"]
    assert head["gflop_per_image"] > 0 and default["vs_default"] == 1.0 and fused["img_s"] > 0
    assert [s["nfe"] for s in result["sampling"]] == [1000, 100, 50, 20, 10]
    assert "| gan |" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_training_only_at_another_size_with_the_allocator_row(tmp_path):
    """--image-size reaches both loops; --training-only stops after the training tables; the
    allocator switch and its default are measured in fresh interpreters."""
    main(["--families", "gan", "--image-size", "16", "--training-only", "--repeats", "1", "--batches", "3",
          "--fast-paths", "glibc malloc defaults (cpu_malloc_cache=false)", "--fast-family", "gan",
          "--fast-repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["settings"]["image_size"] == 16 and "fid_vs_sqrtm" not in result and "sampling" not in result
    head, default, malloc_row = result["fast_paths"]
    assert malloc_row["overrides"] == ["callbacks.fast_paths.cpu_malloc_cache=false"]
    assert len(malloc_row["default_fresh_process"]) == 1 and malloc_row["img_s"] > 0
    md = (tmp_path / "benchmark.md").read_text()
    assert "digits at 16x16" in md and "FID at" not in md
