"""The science behind the numbers, each against an independent reference: likelihoods that sum to
one, the GAN losses and critic schedule by hand, KID against torchmetrics, the DDPM bound against
its closed form, and every paper preset against its paper."""
from __future__ import annotations

import math

import hydra
import numpy as np
import pytest
import torch
from scipy import stats

from models.configs import compose
from models.components.likelihoods import discretized_gaussian_log_likelihood, discretized_logistic_log_likelihood
from models.gan import discriminator_loss, generator_loss

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0           # the 8-bit grid on [-1, 1]


@pytest.mark.parametrize("likelihood", [discretized_logistic_log_likelihood, discretized_gaussian_log_likelihood])
@pytest.mark.parametrize("mean, log_scale", [(0.1, -2.0), (-0.95, -4.5), (0.99, -1.0), (0.0, 1.0), (0.37, -6.0)])
def test_discretized_decoders_sum_to_one_over_the_256_levels(likelihood, mean, log_scale):
    ll = likelihood(LEVELS, torch.full_like(LEVELS, mean), torch.full_like(LEVELS, log_scale))
    # 1e-5: where a bin's CDF difference would underflow float32, the logistic uses PixelCNN++'s
    # density-times-width form, exact to a few 1e-6 of mass in total
    assert float(ll.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    # an interior bin is the CDF difference of the continuous distribution (scipy)
    k = int(torch.argmin((LEVELS - mean).abs().clamp(min=0) + (LEVELS.abs() > 0.99) * 10))
    dist = stats.logistic(mean, math.exp(log_scale)) if likelihood is discretized_logistic_log_likelihood \
        else stats.norm(mean, math.exp(log_scale))
    ref = dist.cdf(float(LEVELS[k]) + 1 / 255) - dist.cdf(float(LEVELS[k]) - 1 / 255)
    assert float(ll[k].exp()) == pytest.approx(ref, rel=1e-4, abs=1e-12)


def test_gan_losses_equal_hand_computed_values():
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([-1.0, 0.5])
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # Goodfellow et al. Eq. 1: -log D(x) - log(1 - D(G(z))), D = sigmoid(logit)
    expected = (-math.log(sigmoid(2.0)) - math.log(sigmoid(-0.5))) / 2 \
        + (-math.log(1 - sigmoid(-1.0)) - math.log(1 - sigmoid(0.5))) / 2
    assert float(discriminator_loss("nonsaturating", real, fake)) == pytest.approx(expected, rel=1e-6)
    # non-saturating generator: -log D(G(z))
    assert float(generator_loss("nonsaturating", fake)) == pytest.approx(
        (-math.log(sigmoid(-1.0)) - math.log(sigmoid(0.5))) / 2, rel=1e-6)
    # hinge (Lim & Ye; Miyato et al.): E relu(1 - D(x)) + E relu(1 + D(G(z))); G: -E D(G(z))
    assert float(discriminator_loss("hinge", real, fake)) == pytest.approx((0 + 1.5) / 2 + (0 + 1.5) / 2)
    assert float(generator_loss("hinge", fake)) == pytest.approx(0.25)


@pytest.mark.parametrize("n_critic", [1, 2, 3])
def test_n_critic_discriminator_steps_per_generator_step(n_critic, tmp_path):
    """With n_critic = k the generator steps after every k-th discriminator step: over 6 batches,
    6 D updates and 6 / k G updates (counted in the optimizers' own step counters)."""
    import pytorch_lightning as pl

    cfg = compose("train", ["experiment=digits_gan", "datamodule.batch_size=32", f"model.n_critic={n_critic}"], tmp_path)
    model = hydra.utils.instantiate(cfg.model)
    batches = 6
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         max_steps=batches + batches // n_critic, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=hydra.utils.instantiate(cfg.datamodule))
    g_opt, d_opt = (o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers)
    steps = [int(next(iter(opt.state.values()))["step"]) for opt in (d_opt, g_opt)]
    assert steps == [batches, batches // n_critic]
    assert int(model.ema.num_updates) == batches // n_critic


def test_kid_equals_torchmetrics_on_the_same_subsets():
    """With the subset = every sample there is one subset, so torchmetrics' random subsets and ours
    coincide: the unbiased polynomial-kernel MMD^2 must agree."""
    from torchmetrics.image.kid import KernelInceptionDistance as TorchmetricsKID

    from metrics.feature_metrics import kernel_inception_distance

    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(200, 16))).float()
    fake = torch.from_numpy(rng.normal(0.2, 1.1, size=(200, 16))).float()
    reference = TorchmetricsKID(feature=torch.nn.Identity(), subsets=1, subset_size=200)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    ours, _ = kernel_inception_distance(real, fake, num_subsets=1, subset_size=200)
    assert ours == pytest.approx(float(reference.compute()[0]), rel=1e-4)


# ----------------------------------------------------------------------------- the DDPM bound

def _gaussian_oracle(diffusion, mu: float, s: float):
    """eps-prediction E[eps | x_t] for data x0 ~ N(mu, s^2): linear in x_t."""
    abar = diffusion.alphas_cumprod

    def model(x, t):
        a = abar[t].to(x).reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return model


def _closed_form_bpd(diffusion, x0: float, mu: float, s: float) -> float:
    """Ho et al. Eq. 5 for one pixel x0 and the Gaussian oracle, every term in closed form: with
    x^_0(x_t) = A x_t + B, mean_p - mean_q = c1 (x^_0 - x0) is Gaussian in eps, so each KL term is
    exact; L_0's expectation over x_1 by 96-point Gauss-Hermite quadrature."""
    abar = diffusion.alphas_cumprod.numpy()
    c1 = diffusion.posterior_mean_coef1.numpy()
    logvar_p = diffusion.model_log_variance.numpy()
    logvar_q = diffusion.posterior_log_variance_clipped.numpy()
    A = (1 - (1 - abar) / (abar * s ** 2 + 1 - abar)) / np.sqrt(abar)                # x^_0 = A x_t + B
    B = (1 - abar) * np.sqrt(abar) * mu / (abar * s ** 2 + 1 - abar) / np.sqrt(abar)
    diff2 = c1 ** 2 * (((1 - A * np.sqrt(abar)) * x0 - B) ** 2 + A ** 2 * (1 - abar))
    kl = 0.5 * (-1 + logvar_p - logvar_q + np.exp(logvar_q - logvar_p) + diff2 * np.exp(-logvar_p))
    total = kl[1:].sum()
    # L_0: -E log P(x0 | N(x^_0(x_1), sigma_1^2)) over x_1 = sqrt(abar_0) x0 + sqrt(1 - abar_0) eps
    nodes, weights = np.polynomial.hermite_e.hermegauss(96)
    x1 = np.sqrt(abar[0]) * x0 + np.sqrt(1 - abar[0]) * nodes
    mean0, std0 = A[0] * x1 + B[0], np.exp(0.5 * logvar_p[0])
    mass = stats.norm.cdf(x0 + 1 / 255, mean0, std0) - stats.norm.cdf(x0 - 1 / 255, mean0, std0)
    # far quadrature nodes (weights below 1e-80) can underflow the bin mass: they add nothing
    total += -(weights * np.log(np.maximum(mass, 1e-300))).sum() / weights.sum()
    # L_T: KL(q(x_T | x0) || N(0, 1))
    m_T, v_T = np.sqrt(abar[-1]) * x0, 1 - abar[-1]
    total += 0.5 * (-1 - np.log(v_T) + v_T + m_T ** 2)
    return float(total / math.log(2))


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_ddpm_bound_on_gaussian_data_equals_its_closed_form(variance, monkeypatch):
    """GaussianDiffusion.bpd (the loop the evaluation calls) against the closed form to 1e-3
    bits/dim. Its noise draws are replaced by Gauss-Hermite nodes, one per image of the batch, so
    the weighted mean over the batch is the exact expectation of every term (a Monte Carlo
    estimate would need ~10^8 draws for that accuracy)."""
    from models.diffusion import GaussianDiffusion, gaussian_diffusion

    diffusion = GaussianDiffusion(1000, variance=variance, clip_denoised=False).double()
    mu, s, x0 = 0.1, 0.3, float(LEVELS[166])
    nodes, weights = np.polynomial.hermite_e.hermegauss(96)
    monkeypatch.setattr(gaussian_diffusion, "randn",
                        lambda noise, n, shape, device: torch.from_numpy(nodes).reshape(n, *shape))
    batch = torch.full((len(nodes), 1, 1, 1), x0, dtype=torch.float64)
    per_node = diffusion.bpd(_gaussian_oracle(diffusion, mu, s), batch).numpy()
    expectation = float((weights * per_node).sum() / weights.sum())
    assert expectation == pytest.approx(_closed_form_bpd(diffusion, x0, mu, s), abs=1e-3)


def test_ddpm_bound_monte_carlo_is_unbiased_around_the_closed_form():
    """With its real noise the estimate scatters around the closed form within its standard error."""
    from models.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion(1000, clip_denoised=False).double()
    mu, s, x0 = 0.1, 0.3, float(LEVELS[166])
    torch.manual_seed(0)
    per_image = diffusion.bpd(_gaussian_oracle(diffusion, mu, s), torch.full((20000, 1, 1, 1), x0, dtype=torch.float64))
    error = float(per_image.mean()) - _closed_form_bpd(diffusion, x0, mu, s)
    assert abs(error) < 4 * float(per_image.std()) / math.sqrt(per_image.numel())


# ----------------------------------------------------------------------------- presets vs papers

def _preset(name, tmp_path):
    cfg = compose("train", [f"experiment={name}", "logger=csv"], tmp_path)
    return cfg, hydra.utils.instantiate(cfg.model)


def test_dcgan_preset_is_radford_et_al(tmp_path):
    """Radford et al. 2016, Sec. 4: Adam lr 0.0002, beta1 0.5, batch 128, weights N(0, 0.02),
    LeakyReLU slope 0.2 in D, BatchNorm in G and D, a 100-d z; no weight averaging."""
    cfg, model = _preset("dcgan_cifar10", tmp_path)
    g_opt, d_opt = model.configure_optimizers()
    for opt in (g_opt, d_opt):
        assert opt.defaults["lr"] == 2e-4 and tuple(opt.defaults["betas"]) == (0.5, 0.999)
    assert cfg.datamodule.batch_size == 128 and model.latent_dim == 100 and model.loss_kind == "nonsaturating"
    assert model.ema.decay == 0.0
    slopes = {m.negative_slope for m in model.discriminator.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2}
    for net in (model.generator, model.discriminator):
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        weights = torch.cat([m.weight.flatten() for m in net.modules()
                             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))])
        assert float(weights.std()) == pytest.approx(0.02, rel=0.05) and abs(float(weights.mean())) < 1e-3


def test_sngan_preset_is_miyato_et_al_standard_cnn_hinge(tmp_path):
    """Miyato et al. 2018, Table 3 and Sec. 4 (standard CNN, hinge): Adam lr 2e-4, betas (0.5, 0.999),
    one D step per G step, batch 64, z of 128, spectral norm on every D layer, LeakyReLU 0.1,
    100k generator updates; no weight averaging."""
    cfg, model = _preset("sngan_cifar10", tmp_path)
    for opt in model.configure_optimizers():
        assert opt.defaults["lr"] == 2e-4 and tuple(opt.defaults["betas"]) == (0.5, 0.999)
    assert model.loss_kind == "hinge" and model.n_critic == 1 and cfg.datamodule.batch_size == 64
    assert model.latent_dim == 128 and cfg.trainer.max_steps == 2 * 100_000 and model.ema.decay == 0.0
    layers = [m for m in model.discriminator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 8 and all(hasattr(m, "parametrizations") for m in layers)
    assert {m.negative_slope for m in model.discriminator.modules() if isinstance(m, torch.nn.LeakyReLU)} == {0.1}


def test_vae_preset_is_what_its_source_note_says(tmp_path):
    """The CIFAR-10 VAE has no canonical paper configuration (its note says so): Kingma & Welling's
    objective with a discretized logistic decoder, the IWAE bound with K = 100 (Burda et al.) for
    bits/dim, a 128-d latent, Adam 2e-4, batch 128, KL warm-up over 10k steps."""
    cfg, model = _preset("vae_cifar10", tmp_path)
    assert model.likelihood == "discretized_logistic" and model.iw_samples == 100 and model.latent_dim == 128
    assert model.configure_optimizers()["optimizer"].defaults["lr"] == 2e-4 and cfg.datamodule.batch_size == 128
    assert model.kl_warmup_steps == 10_000


def test_training_compute_is_counted_on_a_copy_and_scales_with_images(tmp_path):
    """FLOPs per training image equal torch's FlopCounterMode on a whole batch divided by its size
    (the count is linear), counting leaves the run untouched (weights, BN statistics, random
    stream), and the budget is FLOPs per image x images trained."""
    import copy

    import pytorch_lightning as pl
    from torch.utils.flop_counter import FlopCounterMode

    from metrics.compute import ComputeTracker
    from models.compute import training_flops_per_image

    cfg = compose("train", ["experiment=digits_gan", "datamodule.batch_size=32"], tmp_path)
    model = hydra.utils.instantiate(cfg.model)
    dm = hydra.utils.instantiate(cfg.datamodule)
    dm.setup()
    images = next(iter(dm.train_dataloader()))[0]
    before, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    per_image = training_flops_per_image(model, images)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    probe = copy.deepcopy(model)
    with FlopCounterMode(display=False) as whole:
        probe.discriminator_step_loss(images).backward()
        probe.generator_step_loss(images.shape[0]).backward()
    assert per_image == pytest.approx(whole.get_total_flops() / images.shape[0], rel=1e-6)
    tracker = ComputeTracker()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=10,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[tracker],
                         default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    record = tracker.record()
    assert record["train_images"] == 5 * 32 and record["train_flops"] == pytest.approx(per_image * 160, rel=1e-6)
    assert ComputeTracker().record(tmp_path) == pytest.approx(record)     # what a spawned run's parent reads


def test_the_main_jobs_presets_train_every_family_on_the_same_budget(tmp_path):
    """conf/experiment/digits_matched_*, unconditional and with conditioning=class, state one
    FLOP budget and nothing else about their length: planned from the real model's FLOPs per image
    (counted on a real batch), each spends it to within one batch."""
    from models.budget import plan_budget
    from models.compute import training_flops_per_image
    from scripts.main_job import PARTS, main_job_families, part_overrides

    main_budget = compose("train", ["budget=main"], tmp_path).budget
    BUDGET_FLOPS = main_budget.train_flops
    for part, spec in PARTS.items():
        for family in main_job_families():
            cfg = compose("train", part_overrides(spec, family), tmp_path)
            assert cfg.budget == main_budget, (part, family)
            model, dm = hydra.utils.instantiate(cfg.model), hydra.utils.instantiate(cfg.datamodule)
            dm.setup()
            images, labels = next(iter(dm.train_dataloader()))
            per_image = training_flops_per_image(model, images, labels)
            plan = plan_budget(BUDGET_FLOPS, per_image, cfg.datamodule.batch_size)
            spent = plan.batches * plan.flops_per_batch
            assert BUDGET_FLOPS <= spent < BUDGET_FLOPS + plan.flops_per_batch, (part, family, plan)
