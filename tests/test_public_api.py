"""genbench uses only public APIs of its frameworks: a private (``_``-prefixed) name of Lightning,
Hydra, OmegaConf, torchmetrics or torch breaks silently on the next release."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "datamodules", "metrics", "scripts", "benchmarks", "tests")
FRAMEWORKS = ("torch", "torchvision", "pytorch_lightning", "lightning", "lightning_fabric", "hydra", "omegaconf",
              "torchmetrics")
#: expressions that hold framework objects, whatever the variable is called
FRAMEWORK_OBJECTS = re.compile(r"(trainer|optimizer|strategy|_loop|launcher|precision_plugin|lightning_module)$")
#: framework classes whose private methods a subclass must not override
BASES = (torch.nn.Module, pl.LightningModule, pl.LightningDataModule, pl.Callback, torch.optim.Optimizer)


#: Hydra's reserved config keys look private but are its public interface
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in HYDRA_KEYS


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: set[str] = set()                                 # names bound to framework modules/objects
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FRAMEWORKS:
                    aliases.add((a.asname or a.name).split(".")[0])
                    if any(private(part) for part in a.name.split(".")):
                        found.append(f"{path}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FRAMEWORKS:
            for a in node.names:
                aliases.add(a.asname or a.name)
                if private(a.name) or any(private(part) for part in node.module.split(".")):
                    found.append(f"{path}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = ast.unparse(node.value)
            root = base.split(".")[0].split("(")[0]
            if root in aliases or FRAMEWORK_OBJECTS.search(base) or node.attr == "_trainer":
                found.append(f"{path}:{node.lineno}: {base}.{node.attr}")
        elif isinstance(node, ast.FunctionDef) and private(node.name) and any(hasattr(b, node.name) for b in BASES):
            found.append(f"{path}:{node.lineno}: overrides the framework's private {node.name}")
    return found


def test_no_private_framework_api_anywhere():
    files = [f for pkg in PACKAGES if (ROOT / pkg).is_dir() for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 30
    found = [v for f in files for v in violations(f)]
    assert found == [], "private framework APIs in use:\n" + "\n".join(found)


def test_the_check_sees_each_kind_of_private_use(tmp_path):
    """The scanner itself: each pattern it must catch is caught (a check that cannot fail is no check)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nimport pytorch_lightning as pl\nfrom lightning_fabric.strategies.launchers import subprocess_script\n"
        "from torch.utils._pytree import tree_map\n"
        "torch._foreach_lerp_([], [], 0.5)\n"
        "def f(self, trainer, optimizer):\n    optimizer._on_before_step()\n    self._trainer\n    subprocess_script._hydra_subprocess_cmd\n"
        "class M(torch.nn.Module):\n    def _load_from_state_dict(self, *a):\n        pass\n    def _mine(self):\n        self._x = 1\n")
    kinds = violations(sample)
    assert len(kinds) == 6, kinds
