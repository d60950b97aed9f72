"""Reading a checkpoint file safely, and rebuilding a module from it.

Checkpoints may come from someone else (a reviewer evaluates other people's runs), and a pickle can
run any code while it is read. Every checkpoint genbench reads therefore goes through
:func:`read_checkpoint`, which uses ``torch.load(weights_only=True)``: tensors, containers and
primitive values only. genbench's own checkpoints hold nothing else (the run config is a plain dict,
the RNG state plain tensors: models/rng.py), so no allow-list is needed. Lightning's resume path is
given ``weights_only=True`` too (scripts/train.py).
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write`` into a temporary file next to ``path``, fsync, then rename it over ``path``:
    readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # the permissions open() would give, not mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class StreamingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, streaming: ``torch.save`` straight into a temporary file that
    is renamed into place. Lightning's own atomic save first serialises the whole checkpoint into
    memory (a second copy of weights, EMA and optimizer state: the peak memory of a large model
    doubles); this one never holds more than torch.save's buffers, and a crash mid-write leaves
    the previous checkpoint intact all the same."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("StreamingCheckpointIO takes no storage_options")
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        """Memory-mapped and weights-only: restoring a large model reads the tensors it copies from
        the file as needed, instead of first holding the whole checkpoint in memory."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return torch.load(path, map_location="cpu", weights_only=True if weights_only is None else weights_only,
                          mmap=True)


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for cannot be used."""


class UnsafeFileError(CheckpointError):
    """A file whose loading would execute code it carries (a pickle that is not plain data)."""


def safe_torch_load(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``: plain tensors and containers, never code.

    A file that needs more (a pickled class or function: it would run code while loading) raises
    :class:`UnsafeFileError` naming the file and the fix; any other unreadable file raises
    :class:`CheckpointError`. Memory-mapped, so checking a large checkpoint costs no RAM."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler refused a global
        reason = str(err).strip().splitlines()
        detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        detail = detail.split(" was not an allowed global")[0].split(". Please")[0]  # not torch's advice to allow it
        raise UnsafeFileError(
            f"{what} {path} was refused: loading it would execute code stored in the file ({detail}). genbench "
            "loads files with torch.load(weights_only=True), which admits tensors, containers and numbers only. "
            "If the file comes from someone else, ask them for a checkpoint written by genbench's scripts/train.py; "
            "if you made it yourself and trust it, re-save only its tensors (torch.save of a dict of state dicts)"
        ) from err
    except Exception as err:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file ({type(err).__name__}: {err}); delete "
                              "it and use an earlier one (e.g. another file in the same checkpoints/ folder), or "
                              "pass ckpt_path=null to start fresh") from err


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of ``path``, read without executing code; refused with the fix when
    missing, unreadable, unsafe or not a Lightning training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass ckpt_path=null to start fresh "
                              "or point ckpt_path to an existing .ckpt file")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} holds no Lightning state_dict; it is not a training checkpoint")
    return ckpt


def check_checkpoint(path: Path) -> Path:
    """Fail early, with the fix, on a missing, unreadable or unsafe checkpoint (see :func:`read_checkpoint`)."""
    read_checkpoint(path)
    return Path(path)


#: where the classes a stored run config may name live: genbench's own modules and torch's
#: optimizers. A checkpoint's config is data from someone else; instantiating it must not reach
#: anything else (``_target_: os.system`` would run a command).
STORED_TARGET_PREFIXES = ("models.", "datamodules.", "torch.optim.")


def stored_targets(node: Any, where: str = "") -> list[tuple[str, str]]:
    """(config path, ``_target_``) of every object a stored config would instantiate."""
    found = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append((where or "<root>", str(node["_target_"])))
        for key, value in node.items():
            found += stored_targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += stored_targets(value, f"{where}[{i}]")
    return found


def check_stored_targets(path: Path, sections: dict[str, Any]) -> None:
    """Refuse a stored config that would instantiate anything but a genbench class, a torch
    optimizer or a family this process has already registered (a user's own family, imported by
    the user: models/registry.py). The prefix is checked before anything is imported; the located
    object must then be a class defined under that prefix (``models.base.torch.load`` passes the
    prefix but not this)."""
    from hydra.utils import get_object

    from models.registry import registered_targets

    for where, target in stored_targets(sections):
        if target in registered_targets():   # already imported: loading it runs nothing new
            continue
        ok = target.startswith(STORED_TARGET_PREFIXES)
        if ok:
            try:
                obj = get_object(target)
            except Exception:
                obj = None
            ok = isinstance(obj, type) and obj.__module__.startswith(
                tuple(p.rstrip(".") for p in STORED_TARGET_PREFIXES))
        if not ok:
            raise UnsafeFileError(
                f"{path} was refused: its stored run config would instantiate {target!r} (at {where}), which is not a "
                f"genbench class or a torch optimizer (allowed: {', '.join(p + '*' for p in STORED_TARGET_PREFIXES)}, "
                "and families already imported). A checkpoint of genbench's scripts/train.py never names another; "
                "for a family of your own, import its module before loading its checkpoints")


def load_module(ckpt_path: str | Path, device: torch.device | str = "cpu", model_overrides: dict | None = None):
    """(module in eval mode, run config, checkpoint dict) rebuilt from a checkpoint that
    scripts/train.py wrote: the stored run config builds the module, the state dict fills it.
    ``model_overrides`` ({"likelihood.kind": "ode"}) change settings of the stored model config
    that leave its weights as they are (an estimator, a batch size); they are checked with it.
    The stored model and datamodule configs may name genbench classes and torch optimizers only
    (:func:`check_stored_targets`)."""
    import hydra
    from omegaconf import OmegaConf

    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    run_config = ckpt.get("genbench_config")
    if not run_config or not isinstance(run_config, dict):
        raise CheckpointError(f"{path} carries no genbench run config; it was not written by scripts/train.py")
    if model_overrides:
        model = OmegaConf.create(run_config.get("model") or {})
        for key, value in model_overrides.items():
            # a new leaf of an existing section (a setting added since the checkpoint was written)
            where = key.rsplit(".", 1)[0] if "." in key else key
            if OmegaConf.select(model, where, default=KeyError) is KeyError:
                raise ValueError(f"{path}: the stored model config has no {where!r} to override")
            OmegaConf.update(model, key, value)
        run_config = {**run_config, "model": OmegaConf.to_container(model)}
    check_stored_targets(path, {key: run_config.get(key) for key in ("model", "datamodule")})
    cfg = OmegaConf.create(run_config)
    module = hydra.utils.instantiate(cfg.model)
    module.load_state_dict(ckpt["state_dict"])
    module.run_config = run_config
    return module.to(device).eval(), cfg, ckpt
