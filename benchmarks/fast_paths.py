"""Each speed switch against the default config (same maths, models/fast_paths.py), with the
model FLOPs of a training step and, on a GPU, the MFU."""
from __future__ import annotations

import functools
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor

import torch
from omegaconf import OmegaConf

from benchmarks import training
from benchmarks.configs import build, family_overrides
from models.configs import compose
from models.compute import training_flops_per_image as count_training_flops

#: each switch flipped against the default config (name, overrides)
FAST_PATHS = {
    "default": (),
    "dataloader (in_memory=false)": ("datamodule.in_memory=false",),
    "per-tensor EMA (ema_foreach=false)": ("model.ema_foreach=false",),
    "foreach Adam": ("model.optimizer.foreach=true",),
    "fused Adam": ("model.optimizer.fused=true",),
    "bf16 autocast": ("trainer.precision=bf16-mixed",),
    "fp16 autocast": ("trainer.precision=16-mixed",),
    "channels_last": ("callbacks.fast_paths.channels_last=true",),
    "torch.compile": ("callbacks.fast_paths.compile=true",),
    "glibc malloc defaults (cpu_malloc_cache=false)": ("callbacks.fast_paths.cpu_malloc_cache=false",),
    "Lightning's NVML probe (skip_missing_nvml=false)": ("callbacks.fast_paths.skip_missing_nvml=false",),
}
#: switches of process-wide state that no later measurement could undo: each repeat of these, and
#: of the default they are compared with, runs in a fresh interpreter
FRESH_PROCESS = {"glibc malloc defaults (cpu_malloc_cache=false)"}
#: dense bf16 tensor-core peaks (TFLOP/s) for the MFU
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@functools.lru_cache(maxsize=None)
def family_config(family: str, overrides: tuple[str, ...] = ()):
    return compose("train", [*family_overrides(family), *overrides])


def optimizer_keys(family: str, overrides: tuple[str, ...] = ()) -> list[str]:
    """The model config's own optimizers: keys named ``*optimizer`` that hold a ``_target_`` (the
    GAN's ``g_optimizer``; its ``d_optimizer`` interpolates it, so one override reaches both)."""
    model = OmegaConf.to_container(family_config(family, overrides).model, resolve=False)
    return [k for k, v in model.items() if k.endswith("optimizer") and isinstance(v, dict) and "_target_" in v]


def switch_overrides(family: str, name: str, overrides: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``FAST_PATHS[name]`` for ``family``: an optimizer switch goes to each of its optimizers."""
    out = []
    for o in FAST_PATHS[name]:
        out += [o.replace("model.optimizer.", f"model.{k}.") for k in optimizer_keys(family, overrides)] \
            if o.startswith("model.optimizer.") else [o]
    return tuple(out)


def applicable_switches(family: str, names: list[str], overrides: tuple[str, ...] = ()) -> list[str]:
    """The switches whose keys ``family``'s config has (the VAE and the flow keep no EMA)."""
    cfg, missing = family_config(family, overrides), object()
    return [name for name in names
            if all(OmegaConf.select(cfg, o.split("=", 1)[0], default=missing) is not missing
                   for o in switch_overrides(family, name, overrides))]


def training_flops_per_image(family: str, device, batch_size: int, overrides: tuple[str, ...] = ()) -> float:
    """Model FLOPs of one training step per image: the count every run records
    (models.compute.training_flops_per_image), on the family's composed config."""
    _, dm, model = build(family, device, batch_size, overrides)
    return count_training_flops(model, next(iter(dm.train_dataloader()))[0].to(device))


def _throughput_in_child(threads: int, args: tuple, kwargs: dict) -> float:
    torch.set_num_threads(threads)
    return training.genbench_throughput(*args, **kwargs)


def fresh_process_throughput(*args, **kwargs) -> float:
    """genbench's throughput in a newly spawned interpreter (default allocator, no compiled
    kernels, nothing left over from earlier measurements), with this process's thread count."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_throughput_in_child, torch.get_num_threads(), args, kwargs).result()


def fast_path_table(family: str, device, batch_size: int, batches: int, repeats: int, names: list[str],
                    peak_tflops: float | None, data: tuple[str, ...] = ()) -> list[dict]:
    """Each switch against the default config, ``repeats`` rounds (a drift of the machine hits
    every switch of a round alike); ``vs_default`` is the median over rounds of speed(switch) /
    speed(default). On the CPU each run is interleaved step by step with the default bare loop,
    the common clock: speed(switch) / speed(default) = ratio(switch) / ratio(default), which cancels
    what the machine does between the two runs. Switches of process-wide state (FRESH_PROCESS)
    would change the bare loop beside them too: they and a default of their own run back to back
    in fresh interpreters, as every row does on a GPU."""
    applicable = applicable_switches(family, names)
    if skipped := [name for name in names if name not in applicable]:
        print(f"fast paths without a meaning for {family}, skipped: {skipped}", flush=True)
    names = applicable
    flops = training_flops_per_image(family, device, batch_size, data)
    interleaved = device.type == "cpu"
    img_s: dict[str, list[float]] = {name: [] for name in names}
    speed: dict[str, list[float]] = {name: [] for name in names}   # ratio to the bare clock, or img/s
    fresh_default: dict[str, list[float]] = {name: [] for name in names if name in FRESH_PROCESS}
    for _ in range(repeats):
        for name in names:
            # compile: its first steps compile; give it more warm-up
            args = (family, device, batch_size, batches, (*data, *switch_overrides(family, name)))
            kwargs = {"warmup": 10 if "compile" in name else 3}
            if name in FRESH_PROCESS:
                fresh_default[name].append(fresh_process_throughput(family, device, batch_size, batches, data, **kwargs))
                img_s[name].append(fresh_process_throughput(*args, **kwargs))
                speed[name].append(img_s[name][-1])
            elif interleaved:
                pair = training.interleaved_throughput(*args, bare_overrides=data, **kwargs)
                img_s[name].append(pair["genbench_img_s"])
                speed[name].append(pair["ratio"])
            else:
                img_s[name].append(training.genbench_throughput(*args, **kwargs))
                speed[name].append(img_s[name][-1])
    rows = []
    for name in names:
        fresh = name in FRESH_PROCESS
        median_img_s = statistics.median(img_s[name])
        tflops = flops * median_img_s / 1e12
        default = fresh_default[name] if fresh else speed[names[0]]
        row = {"fast_path": name, "overrides": list(switch_overrides(family, name)), "img_s": median_img_s, "all": img_s[name],
               "method": "back-to-back, fresh processes" if fresh or not interleaved else "interleaved",
               "vs_default": statistics.median(a / b for a, b in zip(speed[name], default)),
               "model_tflop_s": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}
        if interleaved and not fresh:
            row["ratio_to_bare"] = speed[name]
        if fresh:
            row["default_fresh_process"] = default
        rows.append(row)
        print(f"fast path {name}: {median_img_s:.0f} img/s, {row['vs_default']:.3f} x default", flush=True)
    return [{"family": family, "gflop_per_image": flops / 1e9, "peak_tflops": peak_tflops}] + rows
