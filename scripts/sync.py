"""Upload every offline W&B run of a sweep at once (from a machine with internet), e.g. after a
SLURM sweep on compute nodes without it.

    python scripts/sync.py logs/main/2026-12-04_03-00-20          # every run dir below it
    python scripts/sync.py multirun/ --dry-run                     # list what would be synced
    python scripts/sync.py logs/ --include-synced -p genbench-rerun

Runs already uploaded (wandb sync marks them) are skipped unless --include-synced.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def offline_runs(roots: list[Path], include_synced: bool = False) -> list[Path]:
    """The ``wandb/offline-run-*`` folders under ``roots``, oldest first; without ``include_synced``
    only those that `wandb sync` has not marked as uploaded (<run>/run-<id>.wandb.synced)."""
    runs = sorted({p for root in roots for p in Path(root).rglob("offline-run-*")
                   if p.is_dir() and p.parent.name == "wandb"}, key=lambda p: p.name)
    return [r for r in runs if include_synced or not any(r.glob("*.wandb.synced"))]


def sync_command(runs: list[Path], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "wandb", "sync", *extra, *map(str, runs)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path, help="sweep or run directories")
    p.add_argument("--dry-run", action="store_true", help="list the runs, upload nothing")
    p.add_argument("--include-synced", action="store_true")
    p.add_argument("-p", "--project", help="override the W&B project of every run")
    p.add_argument("-e", "--entity", help="override the W&B entity of every run")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.roots if not r.exists()]
    if missing:
        print(f"error: no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = offline_runs(args.roots, args.include_synced)
    print(f"{len(runs)} offline run(s) to sync under {', '.join(map(str, args.roots))}")
    for run in runs:
        print(f"  {run}")
    if args.dry_run or not runs:
        return 0
    extra = [*(["-p", args.project] if args.project else []), *(["-e", args.entity] if args.entity else []),
             *(["--include-synced"] if args.include_synced else [])]
    return subprocess.call(sync_command(runs, extra))


if __name__ == "__main__":
    sys.exit(main())
