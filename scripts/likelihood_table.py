"""The likelihood table: bits/dim of every trained run under each likelihood estimator its family
offers (``likelihood_variants``: the DDPM's bound and its probability-flow ODE, flow matching's
ODE, RealNVP's dequantized density, the VAE's IWAE bound), on the same test images with the
same noise, mean ± 95% Student-t interval over the seeds.

    python scripts/likelihood_table.py logs/main/<job>/runs --images 16 --jobs 2
    python scripts/likelihood_table.py logs/main/<job>/runs --families ddpm flow_matching

Writes likelihood.json and likelihood.md (next to the runs folder unless --out), and reuses the
rows of an earlier call with the same images.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metrics.intervals import interval_text  # noqa: E402
from metrics.report import collect_local  # noqa: E402
from metrics.results import atomic_write_text, write_json  # noqa: E402


def run_bits_per_dim(ckpt: str, overrides: dict, images: int, batch_size: int = 16) -> dict:
    """Bits/dim of one checkpoint under one estimator, on the first ``images`` test images (the
    evaluator's per-image noise streams: every estimator and run sees the same images and noise)."""
    import hydra

    from metrics.evaluation import Evaluator
    from models.checkpoints import load_module

    started = time.perf_counter()
    module, cfg, _ = load_module(ckpt, "cpu", overrides)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    evaluator = Evaluator(num_samples=1, batch_size=batch_size, bpd_num_images=images, grid_size=0,
                          seed=int(cfg.evaluation.seed))
    bpd, stderr = evaluator.bits_per_dim(module, datamodule.split("test"))
    return {"bpd": bpd, "stderr": stderr, "details": module.likelihood_details(),
            "seconds": time.perf_counter() - started}


def parse_estimator(text: str) -> tuple[str, str, dict]:
    """"FAMILY/LABEL:key=value,key=value" -> (family, label, model overrides)."""
    try:
        head, settings = text.split(":", 1)
        family, label = head.split("/", 1)
        overrides = dict(item.split("=", 1) for item in settings.split(","))
    except ValueError:
        raise SystemExit(f"--estimator {text!r}: write FAMILY/LABEL:key=value[,key=value], e.g. "
                         "'ddpm/ode from timestep 10:likelihood.kind=ode,likelihood.start=decoder,"
                         "likelihood.start_step=10'") from None
    return family, label, overrides


def likelihood_rows(runs: Path, images: int, families: list[str] | None, jobs: int, done: dict,
                    extra: list[tuple[str, str, dict]] = ()) -> dict:
    """{family: {estimator: {seed: result}}} for every finished run under ``runs``; ``done`` holds
    results of an earlier call (same images), which are kept. ``extra``: (family, label, model
    overrides) estimators beside those the family declares."""
    from models.registry import family_class
    from scripts.main_job import run_parallel

    tasks, keys = [], []
    for record in collect_local([runs]):
        family = record.results.get("model") if record.ok else None
        if family is None or (families and family not in families):
            continue
        variants = {**family_class(family).likelihood_variants(),
                    **{label: overrides for fam, label, overrides in extra if fam == family}}
        seeds = done.setdefault(family, {}).setdefault("_seeds", [])
        seeds += [] if record.results["seed"] in seeds else [record.results["seed"]]
        for label, overrides in variants.items():
            key = (family, label, str(record.results["seed"]))
            if done.get(key[0], {}).get(key[1], {}).get(key[2]) is None:
                tasks.append((run_bits_per_dim, str(Path(record.source) / "checkpoints" / "last.ckpt"), overrides,
                              images))
                keys.append(key)
    for (family, label, seed), result in zip(keys, run_parallel(tasks, jobs, keep_going=True)):
        if isinstance(result, Exception):
            print(f"  {family} {label} seed {seed} failed: {result}", flush=True)
            continue
        done.setdefault(family, {}).setdefault(label, {})[seed] = result
        print(f"  {family} {label} seed {seed}: {result['bpd']:.3f} ± {result['stderr']:.3f} bits/dim "
              f"({result['seconds']:.0f} s)", flush=True)
    return done


def markdown(rows: dict, images: int) -> str:
    lines = ["| family | estimator | bits/dim | seeds | s per run |", "|---|---|---|---|---|"]
    for family in sorted(rows):
        estimators = {k: v for k, v in rows[family].items() if k != "_seeds"}
        if not estimators:
            lines.append(f"| {family} | none (no likelihood) | – | {len(rows[family].get('_seeds', []))} | – |")
        for label, by_seed in estimators.items():
            values = [r["bpd"] for r in by_seed.values()]
            seconds = sum(r["seconds"] for r in by_seed.values()) / len(by_seed)
            lines.append(f"| {family} | {label} | {interval_text(values, 3)} | {len(values)} | {seconds:.0f} |")
    lines.append(f"\nBits/dim of the 8-bit test images (the first {images}, the same images and noise for every run "
                 "and estimator); mean ± 95% Student-t interval over the seeds' checkpoints. elbo: the variational "
                 "bound (the VAE's: IWAE, K = 100); dequantized: the flow's exact density of uniformly dequantized "
                 "data; ode: the density of dequantized data from the probability-flow / flow-matching ODE "
                 "(exact divergence, scipy RK45); ode, decoder start: the DDPM's ODE entered through q(x_0 | x) "
                 "and its discretized decoder. Each is a lower bound on the 8-bit log-likelihood: lower bits/dim "
                 "is a tighter bound or a better model.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a folder of run directories (e.g. a main job's runs/)")
    p.add_argument("--images", type=int, default=16, help="test images per run and estimator")
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--jobs", type=int, default=2, help="estimates side by side (1 thread each)")
    p.add_argument("--out", type=Path, default=None, help="folder of likelihood.{json,md} (default: beside runs)")
    p.add_argument("--estimator", action="append", default=[], metavar="FAMILY/LABEL:KEY=VALUE,...",
                   help="another estimator as model overrides, e.g. 'ddpm/ode from timestep 10:likelihood.kind=ode,"
                        "likelihood.start=decoder,likelihood.start_step=10' (repeatable)")
    args = p.parse_args(argv)
    if not args.runs.is_dir():
        raise SystemExit(f"{args.runs} is not a folder of run directories")
    out = args.out or args.runs.parent
    saved = out / "likelihood.json"
    done = {}
    if saved.is_file():
        earlier = json.loads(saved.read_text())
        done = earlier["rows"] if earlier.get("images") == args.images else {}
    extra = [parse_estimator(text) for text in args.estimator]
    rows = likelihood_rows(args.runs, args.images, args.families, args.jobs, done, extra)
    write_json(saved, {"images": args.images, "rows": rows})
    atomic_write_text(out / "likelihood.md", markdown(rows, args.images))
    print(markdown(rows, args.images))
    print(f"written: {saved}, {out / 'likelihood.md'}")


if __name__ == "__main__":
    main()
