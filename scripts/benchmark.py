"""Speed and memory figures you can compare, in one process run (targets live here, not in tests).

    python scripts/benchmark.py                        # CPU, digits-scale presets
    python scripts/benchmark.py --device cuda --families ddpm --steps 200
    python scripts/benchmark.py --quick                # fewer repeats (CI-sized)

Measures, side by side:
  - training throughput (images/s) of each family through genbench (Lightning Trainer, the
    real module and datamodule) vs a bare PyTorch loop of the same networks, batch, optimizer,
    loss and data loader; on the CPU the two run interleaved step by step in one process (a
    bare step at the start of every genbench batch), so the drifts of a shared machine hit both
    alike; on a GPU as back-to-back runs (a per-step sync would hide genbench's asynchrony);
  - evaluation: extractor passes per generated image for the full metric set, FID from features
    vs scipy.linalg.sqrtm at 2048 dims (time ratio, values), real-image passes of a second
    evaluation against a cached reference;
  - sampling: seconds per sample and NFE of DDPM ancestral-1000 vs DDIM-{10,20,50,100};
  - peak resident memory (CPU) or peak CUDA memory of each phase.
Writes benchmark.json and benchmark.md into --out. The measurements live in the benchmarks/
package, one job per module; this file only runs them in order.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from benchmarks.configs import ROOT
from models.configs import compose
from benchmarks.evaluation import evaluation_passes, fid_vs_sqrtm, inception_throughput, sampling_costs
from benchmarks.fast_paths import FAST_PATHS, PEAK_BF16_TFLOPS, fast_path_table
from benchmarks.memory import PeakMemory
from benchmarks.report import to_markdown
from benchmarks.training import training_row
from models.fast_paths import keep_freed_cpu_memory
from models.registry import families


#: the quality side of the 20x cheaper sampler: DDIM-50 (eta 0 and 1) against ancestral-1000
SAMPLER_FID_POINTS = [("DDIM-50", {"name": "ddim", "steps": 50, "eta": 0.0}),
                      ("DDIM-50 eta=1", {"name": "ddim", "steps": 50, "eta": 1.0}),
                      ("ancestral-1000", {"name": "ancestral", "steps": None, "eta": 1.0})]


def sampler_fid(run_dir: Path, num_samples: int, cache_dir: Path, out: Path) -> dict:
    """FID of each of SAMPLER_FID_POINTS on one trained DDPM run directory (classifier features),
    and its FID and NFE as ratios to ancestral sampling's."""
    from scripts.evaluate import evaluate
    from scripts.main_job import eval_config, sampler_overrides

    points = []
    for label, sampler in SAMPLER_FID_POINTS:
        r = evaluate(eval_config(run_dir / "checkpoints" / "last.ckpt", out / label.replace(" ", "_"),
                                 [f"evaluation.num_samples={num_samples}", "evaluation.bpd_num_images=0",
                                  "evaluation.grid_size=0", *sampler_overrides(sampler)], [f"paths.cache_dir={cache_dir}"]))
        points.append({"label": label, "nfe": r["metrics"]["nfe"], "fid": r["metrics"]["fid"],
                       "extractor": r["feature_extractor"], "sec_per_sample": r["metrics"]["sec_per_sample"]})
    ancestral = points[-1]
    for p in points:
        p["fid_ratio_to_ancestral"] = p["fid"] / ancestral["fid"]
        p["nfe_ratio_to_ancestral"] = p["nfe"] / ancestral["nfe"]
    return {"run_dir": str(run_dir), "num_samples": num_samples, "points": points}


def run_benchmark(families: list[str], device: torch.device, batch_size: int, batches: int, repeats: int,
                  sample_n: int, cache_dir: Path, fid_dim: int = 2048, fast_paths: list[str] | None = None,
                  fast_family: str = "ddpm", peak_tflops: float | None = None, fast_repeats: int = 3,
                  train_threads: int | None = None, image_size: int | None = None, training_only: bool = False,
                  sampler_fid_run: Path | None = None,
                  sampler_fid_n: int = 1000, sampler_fid_out: Path = ROOT / "logs" / "benchmark",
                  inception: bool = False) -> dict:
    torch.manual_seed(0)
    # digits resized (bilinear) to another resolution, e.g. 32: CIFAR-10's, where the step is the papers' size
    data = (f"datamodule.image_size={image_size}",) if image_size else ()
    defaults = compose("train", [])
    # the bare loop runs under the allocator genbench's default config sets (the setting is process-wide)
    cpu_malloc_cache = device.type == "cpu" and bool(defaults.callbacks.fast_paths.cpu_malloc_cache) \
        and keep_freed_cpu_memory()
    default_threads = torch.get_num_threads()
    if train_threads:
        torch.set_num_threads(train_threads)
    out: dict = {"machine": {"device": str(device), "cpu_threads": default_threads,
                             "train_threads": torch.get_num_threads(), "platform": platform.platform(),
                             "torch": torch.__version__, "cpu_malloc_cache": cpu_malloc_cache,
                             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
                 "settings": {"batch_size": batch_size, "batches": batches, "repeats": repeats,
                              "image_size": image_size or int(defaults.datamodule.image_size),
                              "fast_repeats": fast_repeats}, "training": []}
    interleaved = device.type == "cpu"
    out["settings"]["method"] = "interleaved" if interleaved else "back-to-back"
    for family in families:
        row = training_row(family, device, batch_size, batches, repeats, data)
        out["training"].append(row)
        print(f"train {family}: genbench {row['genbench_img_s']:.0f} img/s, bare {row['bare_img_s']:.0f} img/s, "
              f"ratio {row['ratio']:.3f}", flush=True)
    if fast_paths:
        if peak_tflops is None and device.type == "cuda":
            peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
        out["fast_paths"] = fast_path_table(fast_family, device, batch_size, batches, fast_repeats,
                                            ["default", *[n for n in fast_paths if n != "default"]], peak_tflops,
                                            data)
    if inception:
        out["inception"] = inception_throughput(device)
    torch.set_num_threads(default_threads)
    if training_only:
        return out
    with PeakMemory(device) as mem:
        out["fid_vs_sqrtm"] = fid_vs_sqrtm(fid_dim, 2 * fid_dim)
    out["fid_vs_sqrtm"]["peak_mb"] = mem.peak_mb
    with PeakMemory(device) as mem:
        out["evaluation"] = evaluation_passes(device, cache_dir)
    out["evaluation"]["peak_mb"] = mem.peak_mb
    out["sampling"] = sampling_costs(device, sample_n)
    if sampler_fid_run is not None:
        out["sampler_fid"] = sampler_fid(sampler_fid_run, sampler_fid_n, cache_dir, sampler_fid_out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the training-throughput rows (1 is the steadiest on a "
                        "shared CPU machine); evaluation and sampling use the default")
    p.add_argument("--families", nargs="*", default=list(families()),
                   help="training rows (none: skip them, e.g. --families --training-only --inception)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the digits for the training rows (default: their 8x8; 32 = CIFAR-10's resolution)")
    p.add_argument("--training-only", action="store_true", help="training and fast-path rows only")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-n", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="1 repeat, 10 batches, 16 samples")
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmark")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    p.add_argument("--fid-dim", type=int, default=2048, help="feature dimension of the FID timing")
    p.add_argument("--fast-paths", nargs="*", default=None, choices=list(FAST_PATHS), metavar="NAME",
                   help=f"measure these switches against the default config (none given: all): {list(FAST_PATHS)}")
    p.add_argument("--fast-family", default="ddpm", help="family of the fast-path table")
    p.add_argument("--fast-repeats", type=int, default=3, help="rounds of the fast-path table")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU (H100/H200/A100 known)")
    p.add_argument("--sampler-fid-run", type=Path, default=None,
                   help="a trained DDPM run dir: FID of DDIM-50 (eta 0, 1) vs ancestral-1000 on it")
    p.add_argument("--sampler-fid-n", type=int, default=1000)
    p.add_argument("--inception", action="store_true",
                   help="inception_pool seconds per image at 256 / 32 / 8 images per forward (--threads applies)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batches, args.sample_n = 1, 10, 16
    result = run_benchmark(args.families, torch.device(args.device), args.batch_size, args.batches, args.repeats,
                           args.sample_n, args.cache_dir, args.fid_dim,
                           fast_paths=(list(FAST_PATHS) if args.fast_paths == [] else args.fast_paths),
                           fast_family=args.fast_family, peak_tflops=args.peak_tflops, fast_repeats=args.fast_repeats,
                           train_threads=args.threads, image_size=args.image_size, training_only=args.training_only,
                           sampler_fid_run=args.sampler_fid_run, sampler_fid_n=args.sampler_fid_n,
                           sampler_fid_out=args.out / "sampler_fid", inception=args.inception)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    (args.out / "benchmark.md").write_text(md)
    print(md)
    print(f"written: {args.out / 'benchmark.json'}, {args.out / 'benchmark.md'}")


if __name__ == "__main__":
    main()
