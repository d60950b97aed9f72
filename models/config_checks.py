"""Config values checked before any expensive work: each refusal names the key, what it got and
what it expects."""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Mapping

import torch


class ConfigValueError(ValueError):
    """A config value of the wrong type or range."""


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _expected(default: Any) -> str | None:
    """What a value must be, judged from the optimizer argument's default."""
    if isinstance(default, bool):
        return "true or false"
    if _is_number(default):
        return "a number"
    if isinstance(default, tuple) and all(_is_number(d) for d in default):
        return f"a list of {len(default)} numbers"
    return None


def _fits(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if _is_number(default):
        return _is_number(value) and math.isfinite(float(value))
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and len(value) == len(default) and all(_is_number(v) for v in value)
    return True


def optimizer_specs(model_cfg: Mapping, prefix: str = "model") -> dict[str, Mapping]:
    """Every ``_partial_`` torch optimizer in a model config, by its config key (``model.optimizer``)."""
    found = {}
    for key, value in model_cfg.items():
        if isinstance(value, Mapping) and str(value.get("_target_", "")).startswith("torch.optim."):
            found[f"{prefix}.{key}"] = value
    return found


def check_optimizer(key: str, spec: Mapping) -> None:
    """Types against the optimizer's own defaults (``lr`` a number, ``betas`` two numbers, ...),
    then the optimizer built on one dummy parameter, so its own range checks (lr >= 0, ...) run now."""
    from hydra.utils import get_class

    cls = get_class(str(spec["_target_"]))
    params = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in spec.items() if not str(k).startswith("_")}
    for name, value in args.items():
        if name not in params:
            known = ", ".join(p for p in params if p not in ("self", "params"))
            raise ConfigValueError(f"{key}.{name} is not an option of {cls.__name__} (its options: {known})")
        default = params[name].default
        if value is None or default is inspect.Parameter.empty or _fits(value, default):
            continue
        want = _expected(default)
        if want:
            raise ConfigValueError(f"{key}.{name}={value!r} ({type(value).__name__}): {cls.__name__}'s {name} must be "
                                   f"{want}, e.g. {key}.{name}={list(default) if isinstance(default, tuple) else default}")
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **{k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items()})
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigValueError(f"{key}: {cls.__name__} refuses these settings ({err}); fix the value it names") from err


def check_model_optimizers(model_cfg: Mapping) -> None:
    for key, spec in optimizer_specs(model_cfg).items():
        check_optimizer(key, spec)
