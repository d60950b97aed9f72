"""The family registry: every generative family by the name it records in results.json.

A family is a :class:`models.base.GenerativeModule` subclass that sets ``family`` in its body;
defining it registers it. Its model config (conf/model/<name>.yaml) names it by ``_target_``, and
:func:`families` imports every class the model configs name, so a new family is one module plus
one model config. What a family can do (samplers at a given NFE, guidance, class conditioning, its
training losses, its likelihood kind) is declared on its class; the main job, the benchmark, the
compute count and the tests read those declarations, never a family's name.

A family outside conf/ (a user's own package) registers when its module is imported; its config
folder joins Hydra's search path with ``hydra.searchpath=[file:///path/to/conf]``.
"""
from __future__ import annotations

from pathlib import Path

from models.configs import CONF_DIR

_FAMILIES: dict[str, type] = {}


def register(cls: type) -> type:
    """Record ``cls`` under ``cls.family``. Redefining the same class (a module imported again)
    replaces it; a second class claiming a taken name is refused."""
    name = cls.family
    known = _FAMILIES.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"family {name!r} is already {known.__module__}.{known.__qualname__}; "
                         f"{cls.__module__}.{cls.__qualname__} needs another name")
    _FAMILIES[name] = cls
    return cls


def registered_targets() -> set[str]:
    """The ``_target_`` of every family registered so far (nothing is imported to answer)."""
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in _FAMILIES.values()}


def _import_model_configs(conf_dir: Path) -> None:
    """Import the class each conf/model/*.yaml names and register the families among them (also
    when the module was imported before: registering is idempotent, importing is not repeated)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from models.base import GenerativeModule

    for path in sorted((conf_dir / "model").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        cls = get_class(target) if target else None
        if isinstance(cls, type) and issubclass(cls, GenerativeModule) and "family" in vars(cls):
            register(cls)


def families(conf_dir: Path = CONF_DIR) -> dict[str, type]:
    """{name: class} of every registered family: those conf/model names and any other already
    imported, in name order."""
    _import_model_configs(conf_dir)
    return dict(sorted(_FAMILIES.items()))


def family_class(name: str) -> type:
    """The class of family ``name``, or an error that lists the known ones."""
    known = families()
    if name not in known:
        raise ValueError(f"unknown family {name!r}; known: {sorted(known)} (a family registers by defining a "
                         "GenerativeModule subclass with `family = ...` in a module a model config names)")
    return known[name]
