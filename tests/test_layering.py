"""The packages import downward only: scripts -> benchmarks -> metrics -> models, datamodules
(docs/ARCHITECTURE.md). An import that runs upward, at module level or inside a function, fails."""
import re

from conftest import ROOT

LAYER = {"scripts": 3, "benchmarks": 2, "metrics": 1, "models": 0, "datamodules": 0}
IMPORT = re.compile(r"^\s*(?:from|import)\s+(scripts|benchmarks|metrics|models|datamodules)\b")


def test_no_import_runs_upward():
    upward = []
    for package, layer in LAYER.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                match = IMPORT.match(line)
                if match and match.group(1) != package and LAYER[match.group(1)] >= layer:
                    upward.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(upward)
