"""Small-scale checks of the seed papers' ablations on the digits DDPM, several seeds each.

    python scripts/ablation.py variance       # Improved DDPM: learned variances (L_hybrid) vs fixed (L_simple)
    python scripts/ablation.py architecture   # ADM Table 1's direction: the ADM UNet options vs Ho et al.'s
    python scripts/ablation.py recipe         # the small-budget diffusion recipe at 0.3 and 1 TFLOP (FLOP budgets)
    python scripts/ablation.py variance --seeds 0 1 2 --num-samples 2000 --repeats 3 --out logs/ablation/v

Each variant is its ablation's preset (``digits_ddpm``; ``digits_matched_ddpm`` for ``recipe``) plus the
overrides below, trained at equal steps per seed (``recipe``: at equal FLOP budgets, models/budget.py);
every checkpoint is scored by scripts/evaluate.py's evaluate() at the ablation's samplers with
``--repeats`` independent sample draws of ``--num-samples`` (classifier features, the digits
training set as reference, as in every digits run), and, for ``variance``, the full variational bound in bits/dim. Writes
<out>/ablation.json and <out>/ablation.md (mean +- std over seeds x draws) and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metrics.intervals import mean_std  # noqa: E402
from metrics.results import atomic_write_text, read_results, write_json  # noqa: E402
from scripts.main_job import compose_config, eval_config, sampler_overrides  # noqa: E402

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
#: the small-budget recipe (issue: diffusion at the main job's budgets): the compute-matched DDPM
#: (width 16, warm-up a tenth of the run) at two budgets, one change at a time from Ho et al.'s recipe
RECIPE_BUDGETS = {"0.3 TFLOP": 3e11, "1 TFLOP": 1e12}
RECIPES = {
    "Ho et al. (eps, uniform), batch 128": [],
    "batch 32": ["datamodule.batch_size=32"],
    "batch 32, v-prediction": ["datamodule.batch_size=32", "model.diffusion.prediction=v"],
    "batch 32, Min-SNR-5": ["datamodule.batch_size=32", "model.diffusion.weighting=min_snr"],
    "batch 32, v + Min-SNR-5": ["datamodule.batch_size=32", "model.diffusion.prediction=v",
                                "model.diffusion.weighting=min_snr"],
    "batch 32, lr 2e-3 cosine": ["datamodule.batch_size=32", "model.optimizer.lr=2e-3", "model.lr_decay=cosine"],
    "batch 32, EMA ramp-up 0.1": ["datamodule.batch_size=32", "model.ema_rampup=0.1", "model.ema_warmup=false"],
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
               "variants": {f"{name} @ {budget}": [*overrides, f"budget.train_flops={flops:g}"]
                            for budget, flops in RECIPE_BUDGETS.items() for name, overrides in RECIPES.items()},
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
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def run_ablation(name: str, out: Path, seeds: list[int], num_samples: int, repeats: int, bpd_images: int,
                 extra: list[str], only: list[str] | None = None) -> dict:
    from scripts.evaluate import evaluate
    from scripts.train import train

    spec = ABLATIONS[name]
    rows = {}
    variants = {v: o for v, o in spec["variants"].items() if not only or v in only}
    unknown = sorted(set(only or []) - set(spec["variants"]))
    if unknown:
        raise ValueError(f"unknown {name} variants {unknown}; known: {sorted(spec['variants'])}")
    for variant, overrides in variants.items():
        slug = "".join(c if c.isalnum() or c in "_-" else "_"
                       for c in variant.replace(" ", "_").replace(".", ""))
        row: dict = {"overrides": overrides, "fid": {}, "num_params": None}
        fids: dict[str, list[float]] = {s: [] for s in spec["samplers"]}
        bpds: list[float] = []
        for seed in seeds:
            run = out / "runs" / f"{slug}_seed{seed}"
            if not finished(run):
                started = time.perf_counter()
                train(compose_config("train", [f"experiment={spec.get('preset', 'digits_ddpm')}", f"seed={seed}",
                                               "logger=csv", "callbacks.progress_bar=null",
                                               *spec.get("train_evaluation", TRAIN_EVALUATION), *overrides, *extra], run))
                print(f"  trained {variant}, seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
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
        cells += [f"{row['fid'][label]['mean']:.3f} +- {row['fid'][label]['std']:.3f}" for label in labels]
        if has_bpd:
            cells.append(f"{row['bpd']['mean']:.4f} +- {row['bpd']['std']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{len(result['seeds'])} seeds x {result['repeats']} sample draws of N = {result['num_samples']} "
                 f"(FID on the digits classifier's features); bits/dim over {result['bpd_images']} test images per seed.")
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
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for training and evaluation (paths.*)")
    args = parser.parse_intermixed_args(argv)
    out = args.out or ROOT / "logs" / "ablation" / args.ablation
    result = run_ablation(args.ablation, out, args.seeds, args.num_samples, args.repeats, args.bpd_images,
                          args.overrides, args.only)
    print(markdown(result))
    print(f"written: {out / 'ablation.json'}, {out / 'ablation.md'}")


if __name__ == "__main__":
    main()
