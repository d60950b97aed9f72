"""Create (or update) the W&B workspace of one sweep: FID / sFID / precision / recall vs step per
family, the precision-recall scatter, the guidance sweep, bits/dim and NFE bars, sample grids and
the benchmark table (metrics/dashboard.py builds the spec; wandb-workspaces saves it).

    python scripts/wandb_dashboard.py --entity me --project genbench --group main_2026-12-04_03-00-20
    python scripts/wandb_dashboard.py --entity me --project genbench --group main --dry-run   # offline: print it
"""
from __future__ import annotations

import argparse
import sys

from metrics.dashboard import DashboardTarget, build_workspace, describe
from scripts.loggers import has_wandb_credentials


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entity", required=True, help="W&B user or team")
    p.add_argument("--project", default="genbench")
    p.add_argument("--group", required=True, help="the sweep's W&B group (logger.wandb.group of its runs)")
    p.add_argument("--name", default=None, help="the workspace's name (default: 'genbench: <group>')")
    p.add_argument("--dry-run", action="store_true", help="print the workspace spec; needs no network")
    args = p.parse_args(argv)
    workspace = build_workspace(DashboardTarget(args.entity, args.project, args.group, args.name))
    print("\n".join(describe(workspace)))
    if args.dry_run:
        return 0
    if not has_wandb_credentials():
        print("error: no W&B credentials: run `wandb login` (or set WANDB_API_KEY) on a machine with internet; "
              "--dry-run prints the spec offline", file=sys.stderr)
        return 1
    workspace.save()
    print(f"saved: {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
