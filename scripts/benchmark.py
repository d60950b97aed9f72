"""Speed and memory figures you can compare, in one process run (targets live here, not in tests).

    python scripts/benchmark.py                        # CPU, digits-scale presets
    python scripts/benchmark.py --device cuda --families ddpm --steps 200
    python scripts/benchmark.py --quick                # fewer repeats (CI-sized)

Measures, side by side:
  - training throughput (images/s) of each family through genbench (Lightning Trainer, the
    real module and datamodule) vs a bare PyTorch loop of the same networks, batch, optimizer,
    loss and data loader; on the CPU the two run interleaved step by step in one process (a
    bare step at the start of every genbench batch), so the drifts of a shared machine hit both
    alike; on a GPU as back-to-back runs (a per-step sync would hide genbench's asynchrony);
  - evaluation: extractor passes per generated image for the full metric set, FID from features
    vs scipy.linalg.sqrtm at 2048 dims (time ratio, values), real-image passes of a second
    evaluation against a cached reference;
  - sampling: seconds per sample and NFE of DDPM ancestral-1000 vs DDIM-{10,20,50,100};
  - peak resident memory (CPU) or peak CUDA memory of each phase.
Writes benchmark.json and benchmark.md into --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

import scripts  # noqa: F401  (resolvers)
from models.fast_paths import NVML_CHECK_FLAG, keep_freed_cpu_memory

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak memory of a phase: CUDA allocator peak on GPU, else resident set size sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak_mb = self._rss_mb()

            def sample():
                while not self._stop.wait(0.005):
                    self.peak_mb = max(self.peak_mb, self._rss_mb())
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._rss_mb())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- configs

def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build(family: str, device: torch.device, batch_size: int, overrides: tuple[str, ...] = ()):
    cfg = compose_cfg([f"experiment=digits_{family}", f"datamodule.batch_size={batch_size}", "logger=none",
                       *overrides])
    dm = hydra.utils.instantiate(cfg.datamodule)
    dm.setup()
    model = hydra.utils.instantiate(cfg.model).to(device)
    return cfg, dm, model


# ----------------------------------------------------------------------------- training throughput

def bare_step_fn(family: str, model, device):
    """One optimizer step of the family in plain PyTorch: same nets, losses, optimizers, EMA."""
    if family == "ddpm":
        opt = model.optimizer_factory(params=model.net.parameters())

        def step(x):
            loss = model.diffusion.training_loss(model.net, x * 2 - 1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.ema.update(model.net)
        return step, 1
    if family == "gan":
        from models.gan import discriminator_loss, generator_loss
        g_opt = model.g_optimizer_factory(params=model.generator.parameters())
        d_opt = model.d_optimizer_factory(params=model.discriminator.parameters())

        def step(x):
            real = x * 2 - 1
            b = real.shape[0]
            fake = model.generator(torch.randn(b, model.latent_dim, device=device)).detach()
            d_loss = discriminator_loss(model.loss_kind, model.discriminator(real), model.discriminator(fake))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            g_loss = generator_loss(model.loss_kind, model.discriminator(model.generator(torch.randn(b, model.latent_dim, device=device))))
            g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            g_opt.step()
            model.ema.update(model.generator)
        return step, 2   # two optimizer steps per batch (Lightning's global_step counts both)
    opt = model.optimizer_factory(params=model.parameters())
    if family == "vae":
        def loss_fn(x):
            rec, kl, _ = model.elbo_terms(x)
            return (kl - rec).mean() / model.num_dims
    else:
        def loss_fn(x):
            return -model.discrete_log_prob(x).mean()

    def step(x):
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, 1


@contextmanager
def as_plain_pytorch():
    """The bare loop runs as a script that imports only torch would: without the
    PYTORCH_NVML_BASED_CUDA_CHECK=1 that importing Lightning sets (it changes what every
    optimizer step costs; see models.fast_paths.skip_missing_nvml_probe)."""
    flag = os.environ.pop(NVML_CHECK_FLAG, None)
    try:
        yield
    finally:
        if flag is not None:
            os.environ[NVML_CHECK_FLAG] = flag


def bare_batches(dm, device) -> Iterator[torch.Tensor]:
    """What a hand-written loop iterates: the datamodule's training loader, epoch after epoch
    (digits has ~10 batches per epoch), each batch moved to the device."""
    loader = dm.train_dataloader()
    for epoch in itertools.count():
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for x, _ in loader:
            yield x.to(device, non_blocking=True)


def bare_loop(family: str, device, batch_size: int, overrides: tuple[str, ...] = ()) -> Callable[[], None]:
    """One bare step on the next batch, per call (its own networks, optimizer and data order)."""
    _, dm, model = build(family, device, batch_size, overrides)
    model.train()
    step, _ = bare_step_fn(family, model, device)
    batches = bare_batches(dm, device)
    return lambda: step(next(batches))


def bare_throughput(family: str, device, batch_size: int, batches: int, overrides: tuple[str, ...] = ()) -> float:
    next_step = bare_loop(family, device, batch_size, overrides)
    with as_plain_pytorch():
        for _ in range(3):   # warm-up
            next_step()
        stamps = []
        for _ in range(batches):
            _sync(device)
            stamps.append(time.perf_counter())
            next_step()
        _sync(device)
        stamps.append(time.perf_counter())
    return throughput_from_stamps(stamps, batch_size)


def throughput_from_stamps(stamps: list[float], batch_size: int) -> float:
    """Images/s from the MEDIAN step time (intervals between consecutive step starts): on a shared
    machine a neighbour's burst stalls a few steps; the median step ignores them, a mean does not."""
    return batch_size / statistics.median(np.diff(stamps))


class _Timer(pl.Callback):
    """Stamps the start of every batch after the warm-up and the end of the last, inside the loop
    (so each interval holds the whole per-step cost of the loop; set-up and tear-down are out)."""

    def __init__(self, warmup: int, device):
        self.warmup, self.device, self.stamps, self.seen, self.batch_size = warmup, device, [], 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen >= self.warmup:
            _sync(self.device)
            self.stamps.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        self.batch_size = batch[0].shape[0]

    def on_train_end(self, trainer, pl_module):
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def throughput(self) -> float:
        return throughput_from_stamps(self.stamps, self.batch_size)


class _InterleavedBareStep(pl.Callback):
    """At the start of every genbench batch, one bare step (``bare_loop``), timed. The genbench
    batch is then everything from the end of that bare step to the start of the next one:
    Lightning's whole loop (data fetch, hooks, training_step, bookkeeping)."""

    def __init__(self, next_bare_step: Callable[[], None], warmup: int):
        self.next_bare_step, self.warmup = next_bare_step, warmup
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with as_plain_pytorch():
            self.starts.append(time.perf_counter())
            self.next_bare_step()
            self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def step_times(self) -> tuple[np.ndarray, np.ndarray]:
        """(bare, genbench) seconds of each step pair after the warm-up."""
        starts, ends = np.array(self.starts), np.array(self.ends)
        return (ends - starts[:-1])[self.warmup:], (starts[1:] - ends)[self.warmup:]


def fit_genbench(family: str, device, batch_size: int, batches: int, overrides: tuple[str, ...],
                 timers: list[pl.Callback]) -> None:
    """The real module, datamodule, fast-path callback and precision of the composed config."""
    cfg, dm, model = build(family, device, batch_size, overrides)
    steps_per_batch = model.max_optimizer_steps_per_batch   # Lightning's global_step counts both GAN optimizers
    fast = hydra.utils.instantiate(cfg.callbacks.fast_paths)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=batches * steps_per_batch, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[*timers, fast], precision=cfg.trainer.precision,
                         log_every_n_steps=cfg.trainer.log_every_n_steps)
    trainer.fit(model, datamodule=dm)


def genbench_throughput(family: str, device, batch_size: int, batches: int, overrides: tuple[str, ...] = (),
                        warmup: int = 3) -> float:
    timer = _Timer(warmup, device)
    fit_genbench(family, device, batch_size, batches + warmup, overrides, [timer])
    return timer.throughput()


def interleaved_throughput(family: str, device, batch_size: int, batches: int, overrides: tuple[str, ...] = (),
                           warmup: int = 3, bare_overrides: tuple[str, ...] | None = None) -> dict:
    """genbench and the bare loop step by step in one process (CPU): images/s of each from its
    median step, and the median over steps of the per-pair ratio bare time / genbench time. The
    bare loop takes ``bare_overrides`` (default: ``overrides``), e.g. only the data ones when it is
    the common clock of a fast-path table."""
    bare_overrides = overrides if bare_overrides is None else bare_overrides
    paired = _InterleavedBareStep(bare_loop(family, device, batch_size, bare_overrides), warmup)
    fit_genbench(family, device, batch_size, batches + warmup, overrides, [paired])
    bare, ours = paired.step_times()
    return {"bare_img_s": batch_size / float(np.median(bare)), "genbench_img_s": batch_size / float(np.median(ours)),
            "ratio": float(np.median(bare / ours))}


# ----------------------------------------------------------------------------- fast paths

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


def switch_overrides(family: str, name: str) -> tuple[str, ...]:
    """``FAST_PATHS[name]`` for ``family``: the GAN's optimizers are ``g_optimizer`` (which its
    ``d_optimizer`` interpolates), the other families' ``optimizer``."""
    optimizer = "model.g_optimizer." if family == "gan" else "model.optimizer."
    return tuple(o.replace("model.optimizer.", optimizer) for o in FAST_PATHS[name])


def applicable_switches(family: str, names: list[str]) -> list[str]:
    """The switches whose keys ``family``'s config has (the VAE and the flow keep no EMA)."""
    from omegaconf import OmegaConf
    cfg, missing = compose_cfg([f"experiment=digits_{family}"]), object()
    return [name for name in names
            if all(OmegaConf.select(cfg, o.split("=", 1)[0], default=missing) is not missing
                   for o in switch_overrides(family, name))]


#: switches of process-wide state that no later measurement could undo: each repeat of these, and
#: of the default they are compared with, runs in a fresh interpreter
FRESH_PROCESS = {"glibc malloc defaults (cpu_malloc_cache=false)"}
#: dense bf16 tensor-core peaks (TFLOP/s) for the MFU
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def training_flops_per_image(family: str, device, batch_size: int, overrides: tuple[str, ...] = ()) -> float:
    """Model FLOPs of one training step per image (forward + backward, counted by
    torch.utils.flop_counter on the real step; optimizer and EMA excluded, as MFU counts them)."""
    from torch.utils.flop_counter import FlopCounterMode
    _, dm, model = build(family, device, batch_size, overrides)
    x = next(iter(dm.train_dataloader()))[0].to(device)
    step, _ = bare_step_fn(family, model, device)
    with FlopCounterMode(display=False) as counter:
        step(x)
    return counter.get_total_flops() / batch_size


def _throughput_in_child(threads: int, args: tuple, kwargs: dict) -> float:
    torch.set_num_threads(threads)
    return genbench_throughput(*args, **kwargs)


def fresh_process_throughput(*args, **kwargs) -> float:
    """:func:`genbench_throughput` in a newly spawned interpreter (default allocator, no compiled
    kernels, nothing left over from earlier measurements), with this process's thread count."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_throughput_in_child, torch.get_num_threads(), args, kwargs).result()


def fast_path_table(family: str, device, batch_size: int, batches: int, repeats: int, names: list[str],
                    peak_tflops: float | None, data: tuple[str, ...] = ()) -> list[dict]:
    """Each switch against the default config, ``repeats`` rounds (a drift of the machine hits
    every switch of a round alike); ``vs_default`` is the median over rounds of speed(switch) /
    speed(default). On the CPU each run is interleaved step by step with the default bare loop,
    the common clock: speed(switch) / speed(default) = ratio(switch) / ratio(default), which cancels
    what the machine does between the two runs (back-to-back runs here scatter by +-10%). Switches
    of process-wide state (FRESH_PROCESS) would change the bare loop beside them too: they and a
    default of their own run back to back in fresh interpreters, as every row does on a GPU."""
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
                pair = interleaved_throughput(*args, bare_overrides=data, **kwargs)
                img_s[name].append(pair["genbench_img_s"])
                speed[name].append(pair["ratio"])
            else:
                img_s[name].append(genbench_throughput(*args, **kwargs))
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


# ----------------------------------------------------------------------------- evaluation

def fid_vs_sqrtm(dim: int = 2048, n: int = 4096) -> dict:
    from scipy import linalg
    from metrics.feature_metrics import frechet_distance, mean_cov
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, dim)) @ (rng.normal(size=(dim, dim)) / np.sqrt(dim))
    b = a[: n // 2] * 1.1 + 0.05
    mu1, s1 = mean_cov(torch.from_numpy(a))
    mu2, s2 = mean_cov(torch.from_numpy(b))
    t0 = time.perf_counter()
    ours = float(frechet_distance(mu1, s1, mu2, s2))
    t_ours = time.perf_counter() - t0
    m1, m2, c1, c2 = mu1.numpy(), mu2.numpy(), s1.numpy(), s2.numpy()
    t0 = time.perf_counter()
    covmean = linalg.sqrtm(c1 @ c2)
    ref = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean.real))
    t_ref = time.perf_counter() - t0
    return {"dim": dim, "fid_ours": ours, "fid_scipy_sqrtm": ref, "rel_diff": abs(ours - ref) / abs(ref),
            "seconds_ours": t_ours, "seconds_sqrtm": t_ref, "speedup": t_ref / t_ours}


def evaluation_passes(device, cache_dir: Path) -> dict:
    """Extractor calls per generated image for the full metric set, and real-image passes of a first
    and a second (cached) evaluation."""
    import shutil
    import tempfile

    # a cold reference cache (the first evaluation builds it) sharing the trained classifier
    shared = Path(cache_dir)
    cache_dir = Path(tempfile.mkdtemp(prefix="benchmark-cache-"))
    (shared / "classifiers").mkdir(parents=True, exist_ok=True)
    (cache_dir / "classifiers").symlink_to((shared / "classifiers").resolve())
    try:
        return _evaluation_passes(device, cache_dir)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _evaluation_passes(device, cache_dir: Path) -> dict:
    from metrics.evaluation import Evaluator
    from metrics.features import build_feature_metrics
    from metrics.reference import REAL_IMAGE_PASSES

    cfg, dm, model = build("gan", device, 128)
    counts = {"calls": 0, "images": 0}
    results = {}
    for attempt in ("first", "second"):
        before = REAL_IMAGE_PASSES["count"]
        fm = build_feature_metrics("classifier", dm, str(cache_dir), "train", None, "auto", device)
        results[f"real_image_passes_{attempt}"] = REAL_IMAGE_PASSES["count"] - before
    forward = fm.extractor.forward

    def counting(images):
        counts["calls"] += 1
        counts["images"] += images.shape[0]
        return forward(images)
    fm.extractor.forward = counting
    ev = Evaluator(num_samples=512, batch_size=128, bpd_num_images=0, grid_size=0)
    result = ev.evaluate(model, None, {}, [fm])
    results.update({"generated_images": 512, "extractor_images": counts["images"],
                    "extractor_passes_per_image": counts["images"] / 512,
                    "metrics_fed": sorted(k for k in result.metrics if k not in ("nfe", "sec_per_sample"))})
    return results


def sampling_costs(device, num_samples: int) -> list[dict]:
    _, _, model = build("ddpm", device, 128)
    model.eval()
    rows = []
    for label, kw in [("ancestral-1000", {"name": "ancestral", "steps": None}), ("DDIM-100", {"name": "ddim", "steps": 100, "eta": 0.0}),
                      ("DDIM-50", {"name": "ddim", "steps": 50, "eta": 0.0}), ("DDIM-20", {"name": "ddim", "steps": 20, "eta": 0.0}),
                      ("DDIM-10", {"name": "ddim", "steps": 10, "eta": 0.0})]:
        with PeakMemory(device) as mem:
            _sync(device)
            t0 = time.perf_counter()
            model.sample(num_samples, torch.Generator(device).manual_seed(0), **kw)
            _sync(device)
            seconds = time.perf_counter() - t0
        rows.append({"sampler": label, "nfe": model.sampling_cost(**kw)["nfe"], "sec_per_sample": seconds / num_samples,
                     "peak_mb": mem.peak_mb})
    return rows


def sampler_fid(run_dir: Path, num_samples: int, cache_dir: Path, out: Path) -> dict:
    """FID of DDIM-50 (eta 0 and 1) against ancestral-1000 on one trained DDPM run directory: the
    quality side of the 20x cheaper sampler (classifier features, test-split reference)."""
    from scripts.main_job import fid_vs_nfe
    samplers = [("DDIM-50", {"name": "ddim", "steps": 50, "eta": 0.0}),
                ("DDIM-50 eta=1", {"name": "ddim", "steps": 50, "eta": 1.0}),
                ("ancestral-1000", {"name": "ancestral", "steps": None, "eta": 1.0})]
    points = fid_vs_nfe(run_dir, out, num_samples, [f"paths.cache_dir={cache_dir}"], samplers)
    ancestral = points[-1]["fid"]
    for p in points:
        p["fid_ratio_to_ancestral"] = p["fid"] / ancestral
        p["nfe_ratio_to_ancestral"] = p["nfe"] / points[-1]["nfe"]
    return {"run_dir": str(run_dir), "num_samples": num_samples, "points": points}


# ----------------------------------------------------------------------------- main

def run_benchmark(families: list[str], device: torch.device, batch_size: int, batches: int, repeats: int,
                  sample_n: int, cache_dir: Path, fid_dim: int = 2048, fast_paths: list[str] | None = None,
                  fast_family: str = "ddpm", peak_tflops: float | None = None, fast_repeats: int = 3,
                  train_threads: int | None = None, image_size: int | None = None, training_only: bool = False,
                  sampler_fid_run: Path | None = None,
                  sampler_fid_n: int = 1000, sampler_fid_out: Path = ROOT / "logs" / "benchmark") -> dict:
    torch.manual_seed(0)
    # digits resized (bilinear) to another resolution, e.g. 32: CIFAR-10's, where the step is the papers' size
    data = (f"datamodule.image_size={image_size}",) if image_size else ()
    defaults = compose_cfg([])
    # the bare loop runs under the allocator genbench's default config sets (the setting is process-wide)
    cpu_malloc_cache = device.type == "cpu" and bool(defaults.callbacks.fast_paths.cpu_malloc_cache) \
        and keep_freed_cpu_memory()
    default_threads = torch.get_num_threads()
    if train_threads:
        torch.set_num_threads(train_threads)
    out: dict = {"machine": {"device": str(device), "cpu_threads": default_threads,
                             "train_threads": torch.get_num_threads(), "platform": platform.platform(),
                             "torch": torch.__version__, "cpu_malloc_cache": cpu_malloc_cache,
                             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
                 "settings": {"batch_size": batch_size, "batches": batches, "repeats": repeats,
                              "image_size": image_size or int(defaults.datamodule.image_size),
                              "fast_repeats": fast_repeats}, "training": []}
    interleaved = device.type == "cpu"
    out["settings"]["method"] = "interleaved" if interleaved else "back-to-back"
    for family in families:
        if interleaved:
            pairs = [interleaved_throughput(family, device, batch_size, batches, data) for _ in range(repeats)]
            bare = [p["bare_img_s"] for p in pairs]
            ours = [p["genbench_img_s"] for p in pairs]
            ratios = [p["ratio"] for p in pairs]   # each the median over that run's step pairs
            # peak memory: each loop alone (interleaved, they share one process)
            with PeakMemory(device) as m_bare:
                bare_throughput(family, device, batch_size, min(batches, 10), data)
            with PeakMemory(device) as m_ours:
                genbench_throughput(family, device, batch_size, min(batches, 10), data)
        else:
            bare, ours = [], []
            for _ in range(repeats):   # back to back, so drifts hit both sides alike
                with PeakMemory(device) as m_bare:
                    bare.append(bare_throughput(family, device, batch_size, batches, data))
                with PeakMemory(device) as m_ours:
                    ours.append(genbench_throughput(family, device, batch_size, batches, data))
            ratios = [o / b for o, b in zip(ours, bare)]
        row = {"family": family, "bare_img_s": statistics.median(bare), "genbench_img_s": statistics.median(ours),
               "ratio": statistics.median(ratios), "ratio_of_medians": statistics.median(ours) / statistics.median(bare),
               "pair_ratios": ratios, "bare_all": bare, "genbench_all": ours,
               "bare_peak_mb": m_bare.peak_mb, "genbench_peak_mb": m_ours.peak_mb}
        out["training"].append(row)
        print(f"train {family}: genbench {row['genbench_img_s']:.0f} img/s, bare {row['bare_img_s']:.0f} img/s, "
              f"ratio {row['ratio']:.3f}", flush=True)
    if fast_paths:
        if peak_tflops is None and device.type == "cuda":
            peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
        out["fast_paths"] = fast_path_table(fast_family, device, batch_size, batches, fast_repeats,
                                            ["default", *[n for n in fast_paths if n != "default"]], peak_tflops,
                                            data)
    torch.set_num_threads(default_threads)
    if training_only:
        return out
    with PeakMemory(device) as mem:
        out["fid_vs_sqrtm"] = fid_vs_sqrtm(fid_dim, 2 * fid_dim)
    out["fid_vs_sqrtm"]["peak_mb"] = mem.peak_mb
    with PeakMemory(device) as mem:
        out["evaluation"] = evaluation_passes(device, cache_dir)
    out["evaluation"]["peak_mb"] = mem.peak_mb
    out["sampling"] = sampling_costs(device, sample_n)
    if sampler_fid_run is not None:
        out["sampler_fid"] = sampler_fid(sampler_fid_run, sampler_fid_n, cache_dir, sampler_fid_out)
    return out


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['device']} ({m['gpu'] or platform.processor() or 'cpu'}), {m['cpu_threads']} threads "
             f"({m.get('train_threads', m['cpu_threads'])} for the training rows), torch {m['torch']}"
             + ("; both loops with glibc malloc keeping freed memory (cpu_malloc_cache)" if m.get("cpu_malloc_cache") else ""),
             f"Training rows: digits at {r['settings'].get('image_size', 8)}x{r['settings'].get('image_size', 8)}, "
             f"batch {r['settings']['batch_size']}, median step of {r['settings']['batches']} batches, "
             f"{r['settings']['repeats']} repeats ("
             + ("genbench and bare interleaved step by step; ratio: median over runs of the median per-step ratio"
                if r["settings"].get("method") == "interleaved" else "genbench and bare back to back") + ")",
             "", "| family | genbench img/s | bare img/s | ratio | peak MB (genbench / bare) |",
             "|---|---|---|---|---|"]
    for t in r["training"]:
        lines.append(f"| {t['family']} | {t['genbench_img_s']:.0f} | {t['bare_img_s']:.0f} | {t['ratio']:.3f} | "
                     f"{t['genbench_peak_mb']:.0f} / {t['bare_peak_mb']:.0f} |")
    if r.get("fast_paths"):
        head, *rows = r["fast_paths"]
        peak = f", peak {head['peak_tflops']:.0f} TFLOP/s" if head["peak_tflops"] else ""
        lines += ["", f"Fast paths ({head['family']}, {head['gflop_per_image']:.3f} GFLOP per training image{peak}; "
                  "vs default: median over rounds of speed(switch) / speed(default), each run "
                  + ("interleaved with the default bare loop" if rows[0].get("method") == "interleaved" else "back to back")
                  + "; † back to back in fresh processes):", "",
                  "| switch | img/s | vs default | model TFLOP/s | MFU |", "|---|---|---|---|---|"]
        for row in rows:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
            mark = " †" if row["fast_path"] in FRESH_PROCESS and rows[0].get("method") == "interleaved" else ""
            lines.append(f"| {row['fast_path']}{mark} | {row['img_s']:.0f} | {row['vs_default']:.3f} | "
                         f"{row['model_tflop_s']:.4f} | {mfu} |")
    if "fid_vs_sqrtm" not in r:   # --training-only
        return "\n".join(lines) + "\n"
    f = r["fid_vs_sqrtm"]
    e = r["evaluation"]
    lines += ["", f"FID at {f['dim']} dims: {f['seconds_ours']:.2f} s (eigenvalue form) vs {f['seconds_sqrtm']:.2f} s "
              f"(scipy sqrtm) = {f['speedup']:.1f}x faster, relative difference {f['rel_diff']:.1e}",
              f"Evaluation: {e['extractor_passes_per_image']:.2f} extractor passes per generated image feed "
              f"{', '.join(e['metrics_fed'])}; real-image passes: first evaluation {e['real_image_passes_first']}, "
              f"second (cached) {e['real_image_passes_second']}",
              "", "| DDPM sampler | NFE | s/sample | peak MB |", "|---|---|---|---|"]
    for s in r["sampling"]:
        lines.append(f"| {s['sampler']} | {s['nfe']:.0f} | {s['sec_per_sample']:.4f} | {s['peak_mb']:.0f} |")
    if r.get("sampler_fid"):
        sf = r["sampler_fid"]
        lines += ["", f"Sampler quality ({sf['num_samples']} samples, {sf['run_dir']}):", "",
                  "| sampler | NFE | FID | FID / ancestral-1000 |", "|---|---|---|---|"]
        for p in sf["points"]:
            lines.append(f"| {p['label']} | {p['nfe']:.0f} | {p['fid']:.2f} [{p['extractor']}] | "
                         f"{p['fid_ratio_to_ancestral']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the training-throughput rows (1 is the steadiest on a "
                        "shared CPU machine); evaluation and sampling use the default")
    p.add_argument("--families", nargs="+", default=["gan", "vae", "realnvp", "ddpm"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the digits for the training rows (default: their 8x8; 32 = CIFAR-10's resolution)")
    p.add_argument("--training-only", action="store_true", help="training and fast-path rows only")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sample-n", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="1 repeat, 10 batches, 16 samples")
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmark")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    p.add_argument("--fid-dim", type=int, default=2048, help="feature dimension of the FID timing")
    p.add_argument("--fast-paths", nargs="*", default=None, choices=list(FAST_PATHS), metavar="NAME",
                   help=f"measure these switches against the default config (none given: all): {list(FAST_PATHS)}")
    p.add_argument("--fast-family", default="ddpm", help="family of the fast-path table")
    p.add_argument("--fast-repeats", type=int, default=3, help="rounds of the fast-path table")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU (H100/H200/A100 known)")
    p.add_argument("--sampler-fid-run", type=Path, default=None,
                   help="a trained DDPM run dir: FID of DDIM-50 (eta 0, 1) vs ancestral-1000 on it")
    p.add_argument("--sampler-fid-n", type=int, default=1000)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batches, args.sample_n = 1, 10, 16
    result = run_benchmark(args.families, torch.device(args.device), args.batch_size, args.batches, args.repeats,
                           args.sample_n, args.cache_dir, args.fid_dim,
                           fast_paths=(list(FAST_PATHS) if args.fast_paths == [] else args.fast_paths),
                           fast_family=args.fast_family, peak_tflops=args.peak_tflops, fast_repeats=args.fast_repeats,
                           train_threads=args.threads, image_size=args.image_size, training_only=args.training_only,
                           sampler_fid_run=args.sampler_fid_run, sampler_fid_n=args.sampler_fid_n,
                           sampler_fid_out=args.out / "sampler_fid")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    (args.out / "benchmark.md").write_text(md)
    print(md)
    print(f"written: {args.out / 'benchmark.json'}, {args.out / 'benchmark.md'}")


if __name__ == "__main__":
    main()
