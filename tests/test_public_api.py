"""genbench uses only public APIs of its frameworks: a private (``_``-prefixed) name of Lightning,
Hydra, OmegaConf, torchmetrics or torch breaks silently on the next release."""
from __future__ import annotations

import ast
import importlib
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
#: framework classes whose private methods a subclass must not override (also caught through any
#: other class imported from a framework: see ``framework_bases``)
BASES = (torch.nn.Module, pl.LightningModule, pl.LightningDataModule, pl.Callback, torch.optim.Optimizer)
#: Lightning's loops (``trainer.fit_loop`` and the loops inside it) are its internal state: their
#: attributes (``total_batch_idx``, ``epoch_progress``, ...) change between releases
LOOP_INTERNALS = re.compile(r"(^|\.)(fit|validate|test|predict|epoch|batch)_loop$")


#: Hydra's reserved config keys look private but are its public interface
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in HYDRA_KEYS


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: set[str] = set()                                 # names bound to framework modules/objects
    imported: dict[str, str] = {}                             # name -> the dotted path it is bound to
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FRAMEWORKS:
                    aliases.add((a.asname or a.name).split(".")[0])
                    imported[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                    if any(private(part) for part in a.name.split(".")):
                        found.append(f"{path}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FRAMEWORKS:
            for a in node.names:
                aliases.add(a.asname or a.name)
                imported[a.asname or a.name] = f"{node.module}.{a.name}"
                if private(a.name) or any(private(part) for part in node.module.split(".")):
                    found.append(f"{path}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = framework_bases(node, imported)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(item.name):
                    overridden = [name for name, cls in bases.items() if hasattr(cls, item.name)]
                    if overridden:
                        found.append(f"{path}:{item.lineno}: {node.name} overrides the private {item.name} of "
                                     f"{', '.join(overridden)}")
        if isinstance(node, ast.Attribute) and LOOP_INTERNALS.search(ast.unparse(node.value)):
            found.append(f"{path}:{node.lineno}: reads Lightning loop internals {ast.unparse(node)}")
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = ast.unparse(node.value)
            root = base.split(".")[0].split("(")[0]
            if root in aliases or FRAMEWORK_OBJECTS.search(base) or node.attr == "_trainer":
                found.append(f"{path}:{node.lineno}: {base}.{node.attr}")
        elif isinstance(node, ast.FunctionDef) and private(node.name) and any(hasattr(b, node.name) for b in BASES) \
                and not any(f"private {node.name} of" in f for f in found):
            found.append(f"{path}:{node.lineno}: overrides the framework's private {node.name}")
    return found


def framework_bases(node: ast.ClassDef, imported: dict[str, str]) -> dict[str, type]:
    """The base classes of ``node`` imported from a framework (``tvd.CIFAR10``, ``pl.Callback``, ...),
    resolved to the classes themselves, so that a private method is known to be the framework's."""
    bases = {}
    for base in node.bases:
        text = ast.unparse(base)
        head, _, rest = text.partition(".")
        if head not in imported:
            continue
        dotted = f"{imported[head]}.{rest}" if rest else imported[head]
        module, _, name = dotted.rpartition(".")
        try:
            bases[text] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return bases


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


def test_the_check_sees_private_overrides_of_any_framework_class_and_loop_internals(tmp_path):
    """The two patterns planted as they appeared in genbench: a dataset class of torchvision with its
    private integrity check overridden inside a function, and a read of Lightning's batch counter."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from pathlib import Path\n"
        "def load(root):\n"
        "    import torchvision.datasets as tvd\n"
        "    class _CIFAR10(tvd.CIFAR10):\n"
        "        def _check_integrity(self):\n"
        "            return True\n"
        "        def public(self):\n"
        "            return 1\n"
        "    return _CIFAR10(root)\n"
        "def is_logging_step(trainer):\n"
        "    return trainer.fit_loop.total_batch_idx % 10 == 0\n")
    found = violations(sample)
    assert any("_CIFAR10 overrides the private _check_integrity of tvd.CIFAR10" in f for f in found), found
    assert any("loop internals trainer.fit_loop.total_batch_idx" in f for f in found), found
    assert len(found) == 2, found
