"""Speed switches that leave the maths alone, applied to any family when training starts.

    callbacks.fast_paths.channels_last=true   # NHWC weights: convolutions take the tensor-core layout
    callbacks.fast_paths.compile=true         # torch.compile each network (Module.compile: in place,
                                              # checkpoints keep their keys)
    callbacks.fast_paths.cpu_malloc_cache=false  # on by default: see keep_freed_cpu_memory
    callbacks.fast_paths.skip_missing_nvml=false # on by default: see skip_missing_nvml_probe
Mixed precision is Lightning's own switch (trainer.precision=bf16-mixed / 16-mixed), fused Adam
the optimizer's (model.optimizer.fused=true), the on-device data path the datamodule's
(datamodule.in_memory=true); scripts/benchmark.py --fast-paths measures each.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

#: mallopt parameters of glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: the largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX = 4 MiB * sizeof(long))
MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_cpu_memory(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory in the process instead of giving it back to the kernel.

    Why: by default glibc serves blocks above a threshold (128 KiB, adjusted at run time) with
    mmap, returns them with munmap when freed, and trims the top of the heap above
    M_TRIM_THRESHOLD. A CPU training step frees its activations and allocates them again in the
    next step, so every step page-faults its working memory back in (hundreds to thousands of
    minor faults per digits step, depending on where the blocks land; the benchmark's
    fast-path table measures the cost). With both thresholds raised, freed
    blocks are reused (what jemalloc and tcmalloc do; PyTorch's CPU performance guide recommends
    them for this reason). Blocks above ``mmap_threshold`` (at most 32 MiB) are still mmapped.

    Process-wide and, for the run-time threshold adjustment, irreversible. glibc only (a no-op
    elsewhere). Returns whether it was applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        return False
    if mmap_threshold > MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold {mmap_threshold} exceeds glibc's maximum {MAX_MMAP_THRESHOLD}")
    # mallopt returns 1 on success, 0 on error
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


#: lightning_fabric sets it to "1" when imported: torch.cuda.is_available() then asks NVML first
NVML_CHECK_FLAG = "PYTORCH_NVML_BASED_CUDA_CHECK"
NVML_LIBRARY = "libnvidia-ml.so.1"


@functools.lru_cache(maxsize=None)
def nvml_loadable(library: str = NVML_LIBRARY) -> bool:
    """Whether the NVIDIA management library can be loaded (it ships with the GPU driver)."""
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def skip_missing_nvml_probe() -> bool:
    """Drop Lightning's ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` where NVML does not exist.

    Why: every optimizer step of torch >= 2.13 asks ``torch.cuda.is_available()`` (the CUDA-graph
    health check of ``Optimizer.step``). With the flag set, a CUDA build of torch first tries to
    ``dlopen`` libnvidia-ml, and without a driver that fails and falls back to the CUDA runtime
    count, which is what the check returns without the flag, so the flag only adds the failed
    ``dlopen`` in every optimizer step (the benchmark's fast-path table measures its cost).
    Where NVML loads, the flag keeps its purpose (a fork-safe check) and is left alone.
    Returns whether the flag was dropped (``FastPaths`` puts it back at teardown).
    """
    if os.environ.get(NVML_CHECK_FLAG) != "1" or nvml_loadable():
        return False
    del os.environ[NVML_CHECK_FLAG]
    return True


class FastPaths(pl.Callback):
    """Args:
        channels_last: convert the module's parameters to channels-last memory format (convolutions
            then run NHWC whatever the input layout, which is what tensor cores want).
        compile: torch.compile the family's trained networks (``GenerativeModule.networks``).
        compile_mode: torch.compile mode (None, "reduce-overhead", "max-autotune").
        cpu_malloc_cache: when training on the CPU, :func:`keep_freed_cpu_memory` (the
            activations are then host memory; on a GPU the CUDA caching allocator does this).
        skip_missing_nvml: :func:`skip_missing_nvml_probe` while fitting (restored at teardown).
    """

    def __init__(self, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None,
                 cpu_malloc_cache: bool = True, skip_missing_nvml: bool = True):
        self.channels_last, self.compile, self.compile_mode = channels_last, compile, compile_mode
        self.cpu_malloc_cache, self.skip_missing_nvml = cpu_malloc_cache, skip_missing_nvml
        self._nvml_flag_dropped = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.cpu_malloc_cache and pl_module.device.type == "cpu" and keep_freed_cpu_memory():
            log.info("CPU malloc: freed memory stays in the process (no per-step page faults)")
        if self.skip_missing_nvml and skip_missing_nvml_probe():
            self._nvml_flag_dropped = True
            log.info("no NVML library: optimizer steps check CUDA without a failing dlopen of %s", NVML_LIBRARY)
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile:
            names = getattr(pl_module, "networks", lambda: [])()
            for name in names:
                getattr(pl_module, name).compile(mode=self.compile_mode)
            log.info("torch.compile: %s (mode=%s); the first steps include compilation", ", ".join(names),
                     self.compile_mode)

    def teardown(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if self._nvml_flag_dropped:
            os.environ[NVML_CHECK_FLAG] = "1"   # the only value skip_missing_nvml_probe drops
            self._nvml_flag_dropped = False
