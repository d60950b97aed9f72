"""Small-scale checks of the seed papers' ablations on the digits DDPM, several seeds each.

    python scripts/ablation.py variance       # Improved DDPM: learned variances (L_hybrid) vs fixed (L_simple)
    python scripts/ablation.py architecture   # ADM Table 1's direction: the ADM UNet options vs Ho et al.'s
    python scripts/ablation.py recipe --jobs 2  # the small-budget diffusion recipe at equal FLOP budgets
    python scripts/ablation.py variance --seeds 0 1 2 --num-samples 2000 --repeats 3 --out logs/ablation/v

Each variant is its ablation's preset (``digits_ddpm``; ``digits_matched_ddpm`` for ``recipe``) plus the
overrides below, trained at equal steps per seed (``recipe``: at equal FLOP budgets, models/budget.py);
every checkpoint is scored by scripts/evaluate.py's evaluate() at the ablation's samplers with
``--repeats`` independent sample draws of ``--num-samples`` (classifier features, the digits
training set as reference, as in every digits run), and, for ``variance``, the full variational bound in bits/dim. Writes
<out>/ablation.json and <out>/ablation.md (mean ± 95% t-interval over seeds x draws) and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metrics.intervals import mean_std, t_half_width  # noqa: E402
from metrics.results import atomic_write_text, read_results, write_json  # noqa: E402
from models.configs import compose  # noqa: E402
from scripts.main_job import eval_config, sampler_overrides  # noqa: E402

LEARNED_VARIANCE = ["model.net.learn_sigma=true", "model.diffusion.variance=learned_range",
                    "model.diffusion.loss=hybrid"]
#: ADM's UNet options at digits scale: scale-shift norm, BigGAN up/down blocks, multi-head attention at
#: both resolutions; base width 30 (norm groups 30, heads of 15 channels) keeps the parameter count
#: within 5% of the Ho et al. configuration's (0.74M vs 0.70M)
ADM_UNET = ["model.net.use_scale_shift_norm=true", "model.net.resblock_updown=true",
            "model.net.attention_resolutions=[8,4]", "model.net.num_head_channels=15",
            "model.net.base_channels=30", "model.net.norm_groups=30"]
ANCESTRAL = {"name": "ancestral", "eta": 1.0}
#: the runs' own evaluation: once at the end, small (the ablation scores every checkpoint itself); ancestral
#: sampling, which every variant supports (DDIM with eta > 0 refuses learned variances)
TRAIN_EVALUATION = ["evaluation.every_n_steps=0", "evaluation.num_samples=256", "evaluation.bpd_num_images=0",
                    "evaluation.sampler={name:ancestral,steps:50}", "evaluation.final_sampler={name:ancestral,steps:50}"]
#: the small-budget recipe: the compute-matched DDPM (digits_matched_ddpm's UNet of width 16, warm-up
#: a tenth of the run) from Ho et al.'s recipe (linear betas, eps, uniform weighting, dropout 0.1,
#: batch 128), one change at a time, at equal FLOP budgets; then the chosen recipe (the preset's)
#: across budgets, against digits_ddpm's Ho et al. recipe at its 7.45 TFLOP (the efficiency target)
HO_RECIPE = {"datamodule.batch_size": 128, "model.diffusion.schedule": "linear", "model.diffusion.prediction": "eps",
             "model.diffusion.weighting": "uniform", "model.net.dropout": 0.1, "model.optimizer.lr": 1e-3,
             "model.lr_decay": "constant", "model.ema_rampup": None, "model.ema_warmup": True}


def recipe(**changes) -> list[str]:
    """Ho et al.'s recipe with ``changes`` (keys with "__" for "."), as overrides."""
    settings = {**HO_RECIPE, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [f"{k}={'null' if v is None else v}" for k, v in settings.items()]


B32 = {"datamodule__batch_size": 32}
COSINE = {**B32, "model__diffusion__schedule": "cosine"}
#: the recipe digits_matched_ddpm (and the main job) uses: batch 32, cosine betas, no dropout
CHOSEN = {**COSINE, "model__net__dropout": 0.0}
RECIPES_1TFLOP = {
    "Ho et al. (linear betas, eps, uniform, dropout 0.1), batch 128": recipe(),
    "batch 32": recipe(**B32),
    "batch 32, v-prediction": recipe(**B32, model__diffusion__prediction="v"),
    "batch 32, Min-SNR-5": recipe(**B32, model__diffusion__weighting="min_snr"),
    "batch 32, dropout 0": recipe(**B32, model__net__dropout=0.0),
    "batch 32, lr 2e-3 cosine decay": recipe(**B32, model__optimizer__lr=2e-3, model__lr_decay="cosine"),
    "batch 32, EMA ramp-up 0.1": recipe(**B32, model__ema_rampup=0.1, model__ema_warmup=False),
    "batch 32, cosine betas": recipe(**COSINE),
    "batch 32, cosine betas, v-prediction": recipe(**COSINE, model__diffusion__prediction="v"),
    "batch 32, cosine betas, Min-SNR-5": recipe(**COSINE, model__diffusion__weighting="min_snr"),
    "batch 32, cosine betas, dropout 0 (the preset)": recipe(**CHOSEN),
}
RECIPE_VARIANTS = {
    **{f"{name} @ 1 TFLOP": [*overrides, "budget.train_flops=1e12"] for name, overrides in RECIPES_1TFLOP.items()},
    "the preset's recipe @ 0.3 TFLOP": [*recipe(**CHOSEN), "budget.train_flops=3e11"],
    "the preset's recipe @ 2.5 TFLOP": [*recipe(**CHOSEN), "budget.train_flops=2.5e12"],
    # the efficiency target's reference: digits_ddpm as it is (Ho et al.'s recipe, width 32, 600 steps)
    "digits_ddpm, Ho et al., width 32 @ 7.45 TFLOP": ["experiment=digits_ddpm", "model.diffusion.schedule=linear",
                                                       "model.net.dropout=0.1", "budget=none"],
    "digits_ddpm, cosine betas, dropout 0 (the preset) @ 7.45 TFLOP": ["experiment=digits_ddpm", "budget=none"],
}
DDIM_50 = {"name": "ddim", "steps": 50, "eta": 1.0}
ABLATIONS = {
    # Nichol & Dhariwal 2021, Sec. 3.1 / 4: learned Sigma with L_hybrid improves the bound and keeps
    # sample quality with few respaced steps (their Fig. 8: 25-50 steps)
    "variance": {"variants": {"fixed variance, L_simple": [], "learned variance, L_hybrid": LEARNED_VARIANCE},
                 "samplers": {"ancestral-25": {**ANCESTRAL, "steps": 25}, "ancestral-50": {**ANCESTRAL, "steps": 50}},
                 "bpd": True},
    # Dhariwal & Nichol 2021, Table 1: each of these changes lowers FID
    "architecture": {"variants": {"Ho et al. 2020 UNet": [], "ADM UNet options": ADM_UNET,
                                  # one switch at a time, to see which of them moves FID here
                                  "Ho + scale-shift norm": ["model.net.use_scale_shift_norm=true"],
                                  "ADM with attention at 4x4 only": [*ADM_UNET, "model.net.attention_resolutions=[4]"]},
                     "samplers": {"DDIM-50 eta=1": {"name": "ddim", "steps": 50, "eta": 1.0},
                                  "ancestral-50": {**ANCESTRAL, "steps": 50}},
                     "bpd": False},
    # Salimans & Ho 2022 (v), Hang et al. 2023 (Min-SNR-gamma), batch size, lr and schedule, EDM's EMA
    # ramp-up (Karras et al. 2022), each at two FLOP budgets
    "recipe": {"preset": "digits_matched_ddpm",
               "variants": RECIPE_VARIANTS,
               "samplers": {"DDIM-50 eta=1": DDIM_50},
               "train_evaluation": ["evaluation.every_n_steps=0", "evaluation.num_samples=64",
                                    "evaluation.bpd_num_images=0", "evaluation.grid_size=64"],
               "bpd": False},
}


def finished(run: Path) -> bool:
    """A run trained to its end (an interrupted one has a last.ckpt too, but no results.json "ok")."""
    try:
        return read_results(run / "results.json").get("status") == "ok"
    except (OSError, ValueError):
        return False


def spread(values: list[float]) -> dict:
    """Mean, standard deviation and 95% Student-t half-width over the seeds x draws (the "±" of
    every genbench table: metrics/intervals.py)."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "ci95": t_half_width(std, len(values)), "n": len(values), "values": values}


def slug_of(variant: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in variant.replace(" ", "_").replace(".", ""))


def train_variant(preset: str, seed: int, overrides: list[str], run: Path, label: str) -> float:
    """Train one (variant, seed) run into ``run``; the seconds it took."""
    from scripts.train import train

    started = time.perf_counter()
    # a variant may name its own preset ("experiment=..." among its overrides)
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), preset)
    overrides = [o for o in overrides if not o.startswith("experiment=")]
    train(compose("train", [f"experiment={preset}", f"seed={seed}", "logger=csv", "callbacks.progress_bar=null",
                                   *overrides], run))
    seconds = time.perf_counter() - started
    print(f"  trained {label}, seed {seed}: {seconds:.0f} s", flush=True)
    return seconds


def run_ablation(name: str, out: Path, seeds: list[int], num_samples: int, repeats: int, bpd_images: int,
                 extra: list[str], only: list[str] | None = None, jobs: int = 1) -> dict:
    """Train every (variant, seed) not yet finished, ``jobs`` at a time (single-threaded workers
    side by side), then score each checkpoint."""
    from scripts.evaluate import evaluate
    from scripts.main_job import run_parallel

    spec = ABLATIONS[name]
    rows = {}
    variants = {v: o for v, o in spec["variants"].items() if not only or v in only}
    unknown = sorted(set(only or []) - set(spec["variants"]))
    if unknown:
        raise ValueError(f"unknown {name} variants {unknown}; known: {sorted(spec['variants'])}")
    training = [(train_variant, spec.get("preset", "digits_ddpm"), seed,
                 [*spec.get("train_evaluation", TRAIN_EVALUATION), *overrides, *extra],
                 out / "runs" / f"{slug_of(variant)}_seed{seed}", variant)
                for variant, overrides in variants.items() for seed in seeds
                if not finished(out / "runs" / f"{slug_of(variant)}_seed{seed}")]
    run_parallel(training, jobs)
    for variant, overrides in variants.items():
        slug = slug_of(variant)
        row: dict = {"overrides": overrides, "fid": {}, "num_params": None}
        fids: dict[str, list[float]] = {s: [] for s in spec["samplers"]}
        bpds: list[float] = []
        for seed in seeds:
            run = out / "runs" / f"{slug}_seed{seed}"
            for i, (label, sampler) in enumerate(spec["samplers"].items()):
                with_bpd = spec["bpd"] and i == 0
                r = evaluate(eval_config(run / "checkpoints" / "last.ckpt", out / "evals" / f"{slug}_seed{seed}" / label,
                                         [f"evaluation.num_samples={num_samples}", f"evaluation.repeats={repeats}",
                                          f"evaluation.bpd_num_images={bpd_images if with_bpd else 0}",
                                          "evaluation.grid_size=0", *sampler_overrides(sampler)], extra))
                per_set = r["details"].get("repeats", {}).get("per_set")
                fids[label] += [m["fid"] for m in per_set] if per_set else [r["metrics"]["fid"]]
                if with_bpd:
                    bpds.append(r["metrics"]["bpd"])
                row["num_params"] = r.get("num_params")
                print(f"  {variant}, seed {seed}, {label}: FID {r['metrics']['fid']:.3f}"
                      + (f", bpd {r['metrics']['bpd']:.4f}" if with_bpd else ""), flush=True)
        row["fid"] = {label: spread(v) for label, v in fids.items()}
        if bpds:
            row["bpd"] = spread(bpds)
        rows[variant] = row
    result = {"ablation": name, "seeds": seeds, "num_samples": num_samples, "repeats": repeats,
              "bpd_images": bpd_images if spec["bpd"] else 0, "variants": rows}
    write_json(out / "ablation.json", result)
    atomic_write_text(out / "ablation.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    first = next(iter(result["variants"].values()))
    labels = list(first["fid"])
    has_bpd = "bpd" in first
    head = ["variant", "params"] + [f"FID {label}" for label in labels] + (["bits/dim"] if has_bpd else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, row in result["variants"].items():
        cells = [variant, f"{row['num_params'] / 1e6:.2f}M" if row["num_params"] else "?"]
        cells += [f"{row['fid'][label]['mean']:.2f} ± {row['fid'][label]['ci95']:.2f}" for label in labels]
        if has_bpd:
            cells.append(f"{row['bpd']['mean']:.4f} ± {row['bpd']['ci95']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nMean ± 95% Student-t interval over {len(result['seeds'])} seeds x {result['repeats']} sample draws "
                 f"of N = {result['num_samples']} (FID on the digits classifier's features, the training digits as "
                 f"reference); bits/dim over {result['bpd_images']} test images per seed. Draws of one checkpoint share "
                 "its seed, so the interval is narrower than one over seeds alone would be.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", choices=sorted(ABLATIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="independent sample draws per checkpoint")
    parser.add_argument("--bpd-images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants (their names above)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side (1 thread each)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for training and evaluation (paths.*)")
    args = parser.parse_intermixed_args(argv)
    out = args.out or ROOT / "logs" / "ablation" / args.ablation
    result = run_ablation(args.ablation, out, args.seeds, args.num_samples, args.repeats, args.bpd_images,
                          args.overrides, args.only, args.jobs)
    print(markdown(result))
    print(f"written: {out / 'ablation.json'}, {out / 'ablation.md'}")


if __name__ == "__main__":
    main()
