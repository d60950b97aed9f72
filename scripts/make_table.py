"""Rebuild the benchmark table from finished runs.

    python scripts/make_table.py logs/train/multiruns/2026-11-23_10-00-00           # a sweep dir
    python scripts/make_table.py run_a run_b/results.json --group-by model datamodule.image_size
    python scripts/make_table.py --wandb-project genbench --wandb-group main_<timestamp> --wandb-tags digits

Writes table.md, table.tex (booktabs) and table.csv to --out (default: the first path, or
./table for W&B), prints the Markdown, and lists failed runs. With W&B as the source the table is
also logged as a W&B Table (--no-wandb-table to skip).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from metrics.report import build_table, collect_local, collect_wandb, to_markdown, to_wandb_table, write_table


def make_table(paths=(), wandb_project=None, wandb_entity=None, wandb_group=None, wandb_tags=(),
               group_by=("model",), out=None, log_wandb_table=True, api=None, mixed="split"):
    if wandb_project:
        records = collect_wandb(wandb_project, wandb_entity, wandb_group, wandb_tags, api=api)
        out_dir = Path(out or "table")
    elif paths:
        records = collect_local(paths)
        first = Path(paths[0])
        out_dir = Path(out or (first if first.is_dir() else first.parent))
    else:
        raise ValueError("give run/sweep directories or --wandb-project")
    if not any(r.ok for r in records):
        raise ValueError("no finished run with metrics was found:\n" + "\n".join(f"  {r.source}: {r.problem}" for r in records))
    table = build_table(records, group_by, mixed)
    files = write_table(table, out_dir)
    if wandb_project and log_wandb_table:
        import wandb
        run = wandb.init(project=wandb_project, entity=wandb_entity, group=wandb_group, job_type="make_table")
        run.log({"benchmark_table": to_wandb_table(table)})
        run.finish()
    return table, files


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="results.json files, run dirs or sweep dirs")
    p.add_argument("--wandb-project")
    p.add_argument("--wandb-entity")
    p.add_argument("--wandb-group")
    p.add_argument("--wandb-tags", nargs="*", default=[])
    p.add_argument("--group-by", nargs="+", default=["model"], help="results keys or config keys (dotted)")
    p.add_argument("--mixed", choices=["split", "refuse"], default="split",
                   help="runs of one row that differ in dataset, image size, conditioning, sampler, N, reference "
                        "or extractor: split them into rows (default) or refuse, naming the differing key")
    p.add_argument("--out", help="output folder")
    p.add_argument("--no-wandb-table", action="store_true")
    args = p.parse_args(argv)
    table, files = make_table(args.paths, args.wandb_project, args.wandb_entity, args.wandb_group, args.wandb_tags,
                              args.group_by, args.out, not args.no_wandb_table, mixed=args.mixed)
    print(to_markdown(table))
    print("written:", ", ".join(str(f) for f in files.values()))


if __name__ == "__main__":
    main()
