"""Fast paths change speed, not results: each switch against the default on the same batch."""
from __future__ import annotations

import os
import sys

import hydra
import pytest
import torch

from models.configs import compose
from models.components.ema import EMA
from models.fast_paths import FastPaths
from models.registry import families


def _one_step(overrides: list[str], fast: FastPaths | None = None):
    cfg = compose("train", ["experiment=digits_ddpm", *overrides])
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model)
    if fast is not None:
        fast.on_fit_start(None, model)
    opt = hydra.utils.instantiate(cfg.model.optimizer)(params=model.net.parameters())
    x = torch.rand(16, 1, 8, 8).mul(255).round().div(255)
    torch.manual_seed(1)
    loss = model.diffusion.training_loss(model.net, x * 2 - 1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.ema.update(model.net)
    return loss.detach(), {k: v.detach().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("switch", ["channels_last", "fused", "foreach", "ema_loop"])
def test_switch_leaves_the_step_unchanged(switch):
    ref_loss, ref_state = _one_step([])
    overrides, fast = [], None
    if switch == "channels_last":
        fast = FastPaths(channels_last=True)
    elif switch == "fused":
        overrides = ["model.optimizer.fused=true"]
    elif switch == "foreach":
        overrides = ["model.optimizer.foreach=true"]
    else:
        overrides = ["model.ema_foreach=false"]
    loss, state = _one_step(overrides, fast)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_channels_last_converts_the_convolutions():
    cfg = compose("train", ["experiment=digits_ddpm"])
    model = hydra.utils.instantiate(cfg.model)
    FastPaths(channels_last=True).on_fit_start(None, model)
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


def test_foreach_and_loop_ema_agree():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    a, b = EMA(net, 0.9, warmup=True), EMA(net, 0.9, warmup=True, foreach=False)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        a.update(net)
        b.update(net)
    for pa, pb in zip(a.shadow.parameters(), b.shadow.parameters()):
        torch.testing.assert_close(pa, pb)
    assert int(a.num_updates) == int(b.num_updates) == 3


@pytest.mark.slow
def test_compiled_network_gives_the_eager_outputs():
    cfg = compose("train", ["experiment=digits_ddpm"])
    model = hydra.utils.instantiate(cfg.model).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    eager = model.net(x, t)
    FastPaths(compile=True).on_fit_start(None, model)
    torch.testing.assert_close(model.net(x, t), eager, rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == set(hydra.utils.instantiate(cfg.model).state_dict())  # same checkpoint keys


def test_fast_paths_keeps_cpu_memory_only_on_the_cpu(monkeypatch):
    import models.fast_paths as fast_paths
    calls = []
    monkeypatch.setattr(fast_paths, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    model = torch.nn.Linear(2, 2)
    model.device = torch.device("cpu")
    FastPaths().on_fit_start(None, model)
    FastPaths(cpu_malloc_cache=False).on_fit_start(None, model)
    model.device = torch.device("meta")
    FastPaths().on_fit_start(None, model)
    assert calls == [1]


@pytest.mark.parametrize("family", list(families()))
def test_no_host_sync_between_logging_steps(family, monkeypatch, tmp_path):
    """The hot loop never copies a tensor to the host outside logging steps (on a GPU each copy
    waits for all queued work): not the NaN check, not the logged losses, not the progress bar."""
    import pytorch_lightning as pl

    cfg = compose("train", [f"experiment=digits_{family}", "datamodule.batch_size=16", "logger=csv"], tmp_path)
    model, dm = hydra.utils.instantiate(cfg.model), hydra.utils.instantiate(cfg.datamodule)
    state = {"hot": False, "batch": -1}
    syncs: list[tuple[int, str]] = []

    class Watch(pl.Callback):  # hot: from the start of a non-logging batch to the start of the next
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["hot"], state["batch"] = not pl_module.is_logging_step(), batch_idx

        def on_train_end(self, trainer, pl_module):
            state["hot"] = False

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            # torch's own host-side bookkeeping (Adam's CPU step counters) is no device sync; the
            # calls that count come from Lightning and genbench
            caller = sys._getframe(1).f_code.co_filename
            if state["hot"] and f"{os.sep}torch{os.sep}" not in caller:
                syncs.append((state["batch"], f"{_name} from {caller}:{sys._getframe(1).f_lineno}"))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    callbacks = [Watch()] + [hydra.utils.instantiate(cfg.callbacks[k]) for k in ("progress_bar", "lr_monitor", "fast_paths")]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=25 * len({t.optimizer for t in model.loss_terms()}),
                         log_every_n_steps=10, logger=hydra.utils.instantiate(cfg.logger.csv),
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=callbacks, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.batches_started == 25
    assert syncs == []
    assert set(model.progress_scalars)   # the progress bar got its host copies at the logging steps


def test_nan_check_reports_a_transient_nan_at_its_step(monkeypatch):
    """A loss that is NaN at one step and finite again before the next logging step is still
    caught by the queued check, and the message names the step it happened at."""
    from models.base import GenerativeModule

    module = GenerativeModule((1, 8, 8))
    step = {"now": 0}
    monkeypatch.setattr(GenerativeModule, "global_step", property(lambda self: step["now"]))
    monkeypatch.setattr(module, "is_logging_step", lambda: False)
    for step["now"], value in enumerate([0.5, 0.4, float("nan"), 0.3, 0.2]):
        module.check_finite_loss(torch.tensor(value))
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 2 "):
        module.raise_on_nonfinite_loss()
    module.check_finite_loss(torch.tensor(0.1))   # the queue was emptied by the check
    module.raise_on_nonfinite_loss()


def test_skip_missing_nvml_drops_lightnings_flag_only_where_nvml_is_missing(monkeypatch):
    import models.fast_paths as fast_paths
    model = torch.nn.Linear(2, 2)
    model.device = torch.device("meta")
    monkeypatch.setenv(fast_paths.NVML_CHECK_FLAG, "1")
    monkeypatch.setattr(fast_paths, "nvml_loadable", lambda library=fast_paths.NVML_LIBRARY: True)
    FastPaths().on_fit_start(None, model)                      # NVML there: the flag keeps its purpose
    assert os.environ[fast_paths.NVML_CHECK_FLAG] == "1"
    monkeypatch.setattr(fast_paths, "nvml_loadable", lambda library=fast_paths.NVML_LIBRARY: False)
    FastPaths(skip_missing_nvml=False).on_fit_start(None, model)
    assert os.environ[fast_paths.NVML_CHECK_FLAG] == "1"
    fast = FastPaths()
    fast.on_fit_start(None, model)
    assert fast_paths.NVML_CHECK_FLAG not in os.environ
    fast.teardown(None, model, "fit")                          # the process is left as it was found
    assert os.environ[fast_paths.NVML_CHECK_FLAG] == "1"


def _cuda_build_without_nvml() -> bool:
    from models.fast_paths import nvml_loadable
    return torch.backends.cuda.is_built() and not nvml_loadable()


@pytest.mark.skipif(not _cuda_build_without_nvml(), reason="a CUDA build of torch on a machine without a GPU driver")
def test_without_nvml_lightnings_flag_only_adds_a_failing_dlopen_to_every_optimizer_step(monkeypatch):
    """Why skip_missing_nvml exists: with the flag, each optimizer step tries to load NVML (and
    fails); without it, the same CUDA-availability answer comes with no load attempt."""
    import ctypes
    from models.fast_paths import NVML_CHECK_FLAG, NVML_LIBRARY
    real_cdll, opened = ctypes.CDLL, []
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: opened.append(name) or real_cdll(name, *a, **k))
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    optimizer = torch.optim.Adam([param])
    monkeypatch.setenv(NVML_CHECK_FLAG, "1")
    answer_with_flag = torch.cuda.is_available()
    optimizer.step()
    optimizer.step()
    assert opened.count(NVML_LIBRARY) >= 3   # is_available() once, then at least once per step
    opened.clear()
    monkeypatch.delenv(NVML_CHECK_FLAG)
    assert torch.cuda.is_available() == answer_with_flag
    optimizer.step()
    assert opened == []
