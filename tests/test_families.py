"""GAN, VAE, RealNVP (and the presets of all four) against their papers' definitions."""
import contextlib
import copy
import json
import math
import os
import subprocess
import sys

import hydra
import pytest
import torch

from conftest import CONF_DIR, ROOT

from models.configs import compose
from models.components.gan_nets import DCGANDiscriminator, DCGANGenerator, SNGANDiscriminator, SNGANGenerator
from models.components.realnvp_flow import RealNVPFlow

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_instantiates(preset, tmp_path):
    cfg = compose("train", [f"experiment={preset}", "logger=csv"], tmp_path)
    # the ImageNet-scale presets (up to 554M parameters) are built on the meta device: shapes only
    with torch.device("meta") if preset.startswith(("adm_", "iddpm_")) else contextlib.nullcontext():
        model = hydra.utils.instantiate(cfg.model)
    dm = hydra.utils.instantiate(cfg.datamodule)
    assert model.image_shape == dm.image_shape
    assert model.num_params > 0
    if preset == "ddpm_cifar10_ho2020":
        # Ho et al. 2020: 35.7M parameters
        assert sum(p.numel() for p in model.net.parameters()) == pytest.approx(35.7e6, abs=0.1e6)
        assert model.diffusion.betas[0] == pytest.approx(1e-4) and model.diffusion.betas[-1] == pytest.approx(0.02)
        assert cfg.trainer.gradient_clip_val == 1.0 and model.ema.decay == 0.9999 and model.warmup_steps == 5000
        assert cfg.trainer.max_steps == 800000 and cfg.datamodule.batch_size == 128 and cfg.datamodule.random_flip
    if preset == "realnvp_cifar10":
        # Dinh et al. 2017, Sec. 3.7 and 4.1: batch and weight normalisation in s and t, L2 5e-5 on the
        # weight-normalisation scales only, Adam 1e-3, batch 64, alpha 0.05
        groups = model.configure_optimizers()["optimizer"].param_groups
        scales = [name for name, _ in model.named_parameters() if name.endswith("parametrizations.weight.original0")]
        assert scales and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.flow.modules())
        assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(len(scales), 5e-5),
                                                                          (len(list(model.parameters())) - len(scales), 0.0)]
        assert groups[0]["initial_lr"] == 1e-3 and cfg.datamodule.batch_size == 64 and model.alpha == 0.05
    if preset in ("dcgan_cifar10", "sngan_cifar10"):
        assert model.ema.decay == 0.0     # neither paper averages the generator's weights


@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes_for_every_supported_size(size, channels):
    g, d = DCGANGenerator(channels, size, latent_dim=20, base_channels=8), DCGANDiscriminator(channels, size, 8)
    with torch.no_grad():
        x = g(torch.randn(3, 20))
    assert x.shape == (3, channels, size, size) and float(x.abs().max()) <= 1.0
    assert d(x).shape == (3,)
    assert DCGANDiscriminator(channels, size, 8, spectral=True)(x).shape == (3,)


def test_sngan_standard_cnn_shapes():
    g, d = SNGANGenerator(3, 32, 128), SNGANDiscriminator(3, 32)
    x = g(torch.randn(2, 128))
    assert x.shape == (2, 3, 32, 32) and d(x).shape == (2,)


@pytest.mark.parametrize("model,size,match", [("gan", 12, "must be one of"), ("vae", 28, "must be one of"),
                                              ("realnvp", 5, "divisible by 2")])
def test_unsupported_image_size_is_refused_before_training(model, size, match, tmp_path, smoke_overrides):
    from scripts.train import train
    cfg = compose("train", smoke_overrides + [f"model={model}", f"datamodule.image_size={size}"], tmp_path)
    with pytest.raises(Exception, match=match):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_vae_bernoulli_on_grey_level_data_is_refused(tmp_path, smoke_overrides):
    from scripts.train import train
    cfg = compose("train", smoke_overrides + ["model=vae", "model.likelihood=bernoulli",
                                           "model.decoder.params_per_pixel=1"], tmp_path)
    with pytest.raises(ValueError, match="bernoulli needs binary images"):
        train(cfg)
    assert not list((tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").exists() else True


# ----------------------------------------------------------------------------- RealNVP

def _random_flow(channels=1, size=4, norm="weight"):
    torch.manual_seed(0)
    flow = RealNVPFlow(channels, size, num_scales=2, num_blocks=1, features=8, norm=norm).double()
    for m in flow.modules():  # the output convs start at zero (identity); randomise them
        if isinstance(m, torch.nn.Conv2d) and float(m.weight.abs().sum()) == 0:
            torch.nn.init.normal_(m.weight, 0, 0.2)
    return flow.eval()


@pytest.mark.parametrize("norm", ["weight", "batch", "weight_batch"])
def test_realnvp_inverse_of_forward_is_identity(norm):
    flow = _random_flow(3, 8, norm)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    z, _ = flow(x)
    assert z.shape == (5, 3 * 8 * 8)
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-5, rtol=0)


def test_realnvp_log_det_equals_autograd_jacobian():
    flow = _random_flow(1, 4)
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.reshape(1, 1, 4, 4))[0][0], x.flatten())
    _, logdet = flow(x)
    assert float(logdet[0]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-8)


def test_realnvp_bpd_of_untrained_model_is_near_the_preprocessing_value():
    """An identity flow (fresh: zero-initialised couplings) gives log p from the prior and the
    logit pre-processing only; check it against a direct computation."""
    cfg = compose("train", ["model=realnvp"])
    model = hydra.utils.instantiate(cfg.model).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64).mul(255).round() / 255
    gen = torch.Generator().manual_seed(0)
    got = model.log_likelihood(x, gen)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = (x * 255 + u) / 256
    p = 0.05 + 0.9 * y
    v = torch.log(p / (1 - p))
    log_pv = torch.distributions.Normal(0.0, 1.0).log_prob(v).flatten(1).sum(1)
    log_det = (math.log(0.9) - torch.log(p * (1 - p))).flatten(1).sum(1)
    torch.testing.assert_close(got, log_pv + log_det - 64 * math.log(256), rtol=1e-10, atol=1e-8)


# ----------------------------------------------------------------------------- VAE

@pytest.fixture(scope="module")
def trained_vae():
    """A VAE trained a little on digits, so posterior and prior differ (the bound is not trivial)."""
    cfg = compose("train", ["model=vae"])
    model = hydra.utils.instantiate(cfg.model)
    from datamodules import ImageDataModule
    dm = ImageDataModule()
    dm.setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    loader = dm.train_dataloader()
    batches = (x for epoch in range(100) if loader.sampler.set_epoch(epoch) is None for x, _ in loader)
    for _, x in zip(range(150), batches):
        rec, kl, _ = model.elbo_terms(x)
        loss = (kl - rec).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), torch.stack([dm.split("test")[i][0] for i in range(16)])


def test_iwae_with_one_sample_is_the_elbo(trained_vae):
    model, x = trained_vae
    eps = torch.randn(16, 1, model.latent_dim, generator=torch.Generator().manual_seed(3))
    iwae1 = model.log_likelihood(x, torch.Generator().manual_seed(3), num_samples=1)
    # the single-sample ELBO with the same z: log p(x|z) + log p(z) - log q(z|x)
    from models.vae import gaussian_log_prob
    mean, log_var = model.encoder(x * 2 - 1)
    z = mean + torch.exp(0.5 * log_var) * eps[:, 0]
    elbo1 = model.decoder_log_prob(x, model.decoder(z)) + gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) \
        - gaussian_log_prob(z, mean, log_var)
    torch.testing.assert_close(iwae1, elbo1.detach(), rtol=1e-5, atol=1e-4)
    # and in expectation it is the analytic-KL ELBO
    many = torch.stack([model.log_likelihood(x, torch.Generator().manual_seed(s), num_samples=1) for s in range(300)])
    with torch.no_grad():
        recs = torch.stack([model.elbo_terms(x)[0] for _ in range(300)])
        _, kl, _ = model.elbo_terms(x)
    analytic = recs.mean(0) - kl
    assert float((many.mean(0) - analytic).abs().max()) < 4 * float(many.std(0).max()) / math.sqrt(300) + 0.05


def test_iwae_bound_tightens_as_k_grows(trained_vae):
    model, _ = trained_vae
    from datamodules import ImageDataModule
    dm = ImageDataModule()
    # 200 images: the gaps (~1.6 and ~0.5 nats per image) are far above the Monte-Carlo noise (~0.1)
    x = torch.stack([dm.split("test")[i][0] for i in range(200)])
    bounds = [float(model.log_likelihood(x, torch.Generator().manual_seed(0), num_samples=k).mean())
              for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2]


# ----------------------------------------------------------------------------- every family end to end

@pytest.mark.slow   # 75 s; tests/test_train.py's ddp_cpu multirun also trains the four main-job families
def test_multirun_smoke_of_every_family(tmp_path, shared_cache):
    """`python scripts/train.py -m model=<every registered family> experiment=smoke` as users run it."""
    from models.registry import families

    env = {**os.environ, "WANDB_MODE": "offline", "GENBENCH_CACHE": str(shared_cache)}
    proc = subprocess.run([sys.executable, "scripts/train.py", "-m", f"model={','.join(families())}", "experiment=smoke",
                           "logger=csv", "callbacks.progress_bar=null", f"hydra.sweep.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = {}
    for job in sorted(tmp_path.glob("[0-9]*")):
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "ok" and results["train_steps"] == 30
        for value in results["metrics"].values():
            assert math.isfinite(value)
        seen[results["model"]] = results
    assert set(seen) == set(families())
    for results in seen.values():   # bits/dim exactly where the family has a likelihood
        assert ("bpd" in results["metrics"]) == (results["likelihood_kind"] is not None), results["model"]
    for results in seen.values():
        assert {"fid", "precision", "recall", "inception_pool/fid"} <= set(results["metrics"])


def test_gan_ema_generator_samples_with_batch_norm_statistics_of_its_own_weights():
    """The EMA generator's running statistics are the live generator's (copied at each update);
    before sampling they are re-estimated from the EMA weights' own activations on fixed latents,
    once per EMA update."""
    import pytorch_lightning as pl
    from models.gan import BN_REFRESH_SEED

    cfg = compose("train", ["experiment=digits_gan", "datamodule.batch_size=32"])
    pl.seed_everything(0)
    model = hydra.utils.instantiate(cfg.model)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=20,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=hydra.utils.instantiate(cfg.datamodule))
    live = [m for m in model.generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ema = [m for m in model.ema.shadow.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a.running_mean, b.running_mean) for a, b in zip(live, ema))   # copied so far
    # independent estimate of the first layer's statistics: one train-mode pass over all the latents
    seen = []
    probe = copy.deepcopy(model.ema.shadow).train()
    first = next(m for m in probe.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    z = torch.randn(model.bn_refresh_samples, model.latent_dim, generator=torch.Generator().manual_seed(BN_REFRESH_SEED))
    with torch.no_grad():
        probe(z)
    model.sample(8)
    torch.testing.assert_close(ema[0].running_mean, seen[0].mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ema[0].running_var, seen[0].var((0, 2, 3)), rtol=5e-2, atol=1e-5)
    assert all(not torch.allclose(a.running_mean, b.running_mean) for a, b in zip(live, ema))
    refreshed = [m.running_mean.clone() for m in ema]
    for m in ema:
        m.running_mean.add_(1.0)
    model.sample(8)                       # same EMA weights: no second estimate
    assert all(torch.equal(m.running_mean, r + 1.0) for m, r in zip(ema, refreshed))
    model.ema.update(model.generator)     # new weights: estimated again
    model.sample(8)
    assert not torch.equal(ema[0].running_mean, refreshed[0] + 1.0)


def test_realnvp_l2_on_weight_norm_scales_needs_weight_norm(tmp_path):
    cfg = compose("train", ["experiment=digits_realnvp", "model.flow.norm=batch"], tmp_path)
    model = hydra.utils.instantiate(cfg.model)
    with pytest.raises(ValueError, match="scale_l2 penalises weight-normalisation scales"):
        model.configure_optimizers()
