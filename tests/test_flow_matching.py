"""Flow matching (models/flow_matching.py) against closed forms on Gaussian data, where the optimal
velocity of the linear path is known, and end to end through scripts/train.py.

Data x_0 ~ N(mu, sigma^2) per dimension, eps ~ N(0, 1), x_t = (1 - t) x_0 + t eps:
x_t ~ N(m_t, s_t^2), m_t = (1 - t) mu, s_t^2 = (1 - t)^2 sigma^2 + t^2, and the optimal velocity
E[eps - x_0 | x_t] = -mu + c_t / s_t^2 (x_t - m_t), c_t = Cov(eps - x_0, x_t) = t - (1 - t) sigma^2.
Its residual variance, the minimum of the loss at t, is sigma^2 / s_t^2 per dimension. The ODE of
this velocity carries N(0, 1) at t = 1 to N(mu, sigma^2) at t = 0 along x_t = m_t + s_t x_1.
"""
import json
import math

import pytest
import torch
from scipy import integrate, stats
from torch import nn

from models.flow_matching import (FlowMatching, divergence_exact, divergence_hutchinson, euler, flow_matching_loss,
                                  heun, ode_log_likelihood)
from models.noise import dequantize

MU, SIGMA = 0.3, 0.5


def optimal_velocity(x, t, mu=MU, sigma=SIGMA):
    tb = t.view(-1, *([1] * (x.dim() - 1)))
    s2 = (1 - tb) ** 2 * sigma ** 2 + tb ** 2
    return -mu + (tb - (1 - tb) * sigma ** 2) / s2 * (x - (1 - tb) * mu)


class GaussianVelocityNet(nn.Module):
    """The optimal velocity as a "network" with the UNet's signature (it sees t x time_scale)."""
    num_classes = None
    null_class = False

    def __init__(self, time_scale: float = 1000.0):
        super().__init__()
        self.time_scale = time_scale
        self.unused = nn.Parameter(torch.zeros(1))   # an optimizer needs one

    def forward(self, x, t, labels=None):
        return optimal_velocity(x, t / self.time_scale)


def test_loss_at_the_optimal_velocity_is_its_analytic_minimum():
    torch.manual_seed(0)
    n, d = 400_000, 2
    x0 = MU + SIGMA * torch.randn(n, d, dtype=torch.float64)
    t = torch.rand(n, dtype=torch.float64)
    loss = flow_matching_loss(optimal_velocity, x0, t, torch.randn(n, d, dtype=torch.float64))
    analytic, _ = integrate.quad(lambda s: SIGMA ** 2 / ((1 - s) ** 2 * SIGMA ** 2 + s ** 2), 0.0, 1.0)
    standard_error = loss.std().item() / math.sqrt(n)
    assert abs(loss.mean().item() - analytic) < 4 * standard_error, (loss.mean().item(), analytic, standard_error)
    # and a worse velocity (the optimum's sign flipped in its x-term) scores worse
    worse = flow_matching_loss(lambda x, s: -optimal_velocity(x, s), x0, t, torch.randn(n, d, dtype=torch.float64))
    assert worse.mean().item() > analytic + 0.1


def test_ode_log_likelihood_of_the_gaussian_flow_is_the_gaussian_density():
    torch.manual_seed(1)
    x = MU + SIGMA * torch.randn(5, 3, 2, 2)
    log_p, calls = ode_log_likelihood(optimal_velocity, x, rtol=1e-7, atol=1e-7, exact=True)
    expected = stats.norm.logpdf(x.double().numpy(), MU, SIGMA).reshape(5, -1).sum(1)
    per_dim = (log_p.numpy() - expected) / x[0].numel()
    assert abs(per_dim).max() < 1e-3, per_dim
    assert calls > 10


def test_the_modules_bits_per_dim_are_the_dequantized_gaussian_density():
    """FlowMatching.log_likelihood: dequantize, scale to [-1, 1], the ODE, the 8-bit bin width."""
    net = GaussianVelocityNet()
    model = FlowMatching(net, torch.optim.Adam, image_shape=(1, 2, 2), likelihood={"rtol": 1e-7, "atol": 1e-7})
    x = torch.randint(0, 256, (4, 1, 2, 2)).float() / 255.0
    got = model.log_likelihood(x, generator=torch.Generator().manual_seed(3)).double()
    y = dequantize(x, torch.Generator().manual_seed(3)).double()
    z = 2 * y - 1
    expected = torch.from_numpy(stats.norm.logpdf(z.numpy(), MU, SIGMA).reshape(4, -1).sum(1))
    expected += 4 * (math.log(2.0) - math.log(256.0))
    assert torch.allclose(got, expected, atol=4 * 1e-3)
    assert model.likelihood_details()["divergence"] == "exact"


@pytest.mark.parametrize("solver, order", [(euler, 1), (heun, 2)])
def test_solver_error_shrinks_at_its_order(solver, order):
    torch.manual_seed(2)
    x1 = torch.randn(64, 4, dtype=torch.float64)
    exact = MU + SIGMA * x1
    errors = [(solver(optimal_velocity, x1, steps) - exact).abs().max().item() for steps in (16, 32, 64)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(abs(math.log2(r) - order) < 0.25 for r in ratios), (errors, ratios)


def test_hutchinson_agrees_with_the_exact_divergence():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(17, 32), nn.Tanh(), nn.Linear(32, 16)).double()

    def velocity(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    x, t = torch.randn(1, 16, dtype=torch.float64), torch.full((1,), 0.4, dtype=torch.float64)
    _, exact = divergence_exact(velocity, x, t)
    probes = (torch.rand(4000, 16, dtype=torch.float64) < 0.5).double() * 2 - 1
    estimates = torch.cat([divergence_hutchinson(velocity, x, t, p[None])[1] for p in probes])
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact[0]) < 4 * standard_error
    # the exact divergence of a linear map is its trace
    a = torch.randn(16, 16, dtype=torch.float64)
    _, div = divergence_exact(lambda z, s: z @ a.T, torch.randn(3, 16, dtype=torch.float64), t.expand(3))
    assert torch.allclose(div, torch.full((3,), torch.trace(a).item(), dtype=torch.float64))


def test_sampling_records_the_network_calls_actually_made():
    model = FlowMatching(GaussianVelocityNet(), torch.optim.Adam, image_shape=(1, 2, 2))
    x = model.sample(6, generator=torch.Generator().manual_seed(0), name="heun", steps=5)
    assert x.shape == (6, 1, 2, 2) and model.sampling_cost(name="heun", steps=5) == {"nfe": 10.0}
    model.sample(6, generator=torch.Generator().manual_seed(0), name="adaptive", rtol=1e-4, atol=1e-4)
    adaptive_nfe = model.sampling_cost(name="adaptive")["nfe"]
    assert adaptive_nfe >= 6 and adaptive_nfe == int(adaptive_nfe)   # RK45: 6 calls per step, plus the first


def test_the_adaptive_sampler_lands_on_the_exact_transport():
    torch.manual_seed(4)
    from models.flow_matching import adaptive

    x1 = torch.randn(8, 3)
    x0, _ = adaptive(optimal_velocity, x1, rtol=1e-7, atol=1e-7)
    assert torch.allclose(x0, MU + SIGMA * x1, atol=1e-5)


def test_guidance_needs_a_null_class():
    with pytest.raises(ValueError, match="null class"):
        FlowMatching(GaussianVelocityNet(), torch.optim.Adam, image_shape=(1, 2, 2), sampler={"guidance_scale": 1.0})


def test_flow_matching_trains_samples_and_reports_ode_bits_per_dim(tmp_path, smoke_overrides):
    """model=flow_matching through scripts/train.py, class-conditional with classifier-free guidance."""
    from models.configs import compose
    from scripts.train import train

    cfg = compose("train", [*smoke_overrides, "model=flow_matching", "model.num_classes=10", "model.label_dropout=0.1",
                         "model.net.base_channels=16", "model.net.norm_groups=16", "model.sampler.steps=4",
                         "evaluation.final_sampler={name:heun,steps:4,guidance_scale:1.0}",
                         "model.likelihood.rtol=1e-3", "model.likelihood.atol=1e-3"], tmp_path)
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "ok" and results["model"] == "flow_matching"
    assert results["metrics"]["nfe"] == 16.0    # Heun-4 = 8 velocity evaluations, two network calls each (CFG)
    assert results["details"]["bpd_kind"] == "ODE" and results["details"]["bpd_divergence"] == "exact"
    assert 0.5 < results["metrics"]["bpd"] < 12 and results["details"]["bpd_stderr"] > 0
    assert results["train_flops"] > 0


def test_the_ddpm_probability_flow_carries_gaussian_data_to_its_density():
    """The DDPM's probability-flow ODE (Song et al. 2021) with the exact eps of Gaussian data,
    E[eps | x_t] = sqrt(1 - a) / (a sigma^2 + 1 - a) (x_t - sqrt(a) mu), gives the density of x_t0."""
    from models.diffusion.gaussian_diffusion import GaussianDiffusion

    process = GaussianDiffusion(num_timesteps=200, schedule="cosine")
    log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(process.alphas_cumprod)])

    def abar_at(timestep):  # the process's interpolation, at the network's (fractional) timestep
        position = timestep.double() + 1.0
        k = position.floor().clamp(max=199).long()
        return (log_abar[k] + (position - k) * (log_abar[k + 1] - log_abar[k])).exp()

    def eps_model(x, timestep):
        a = abar_at(timestep).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (1 - a).sqrt() / (a * SIGMA ** 2 + 1 - a) * (x - a.sqrt() * MU)

    torch.manual_seed(5)
    t0 = 1.0 / 200
    a0 = float(process.alphas_cumprod[0])
    x = math.sqrt(a0) * MU + math.sqrt(a0 * SIGMA ** 2 + 1 - a0) * torch.randn(4, 1, 2, 2, dtype=torch.float64)
    log_p, _ = ode_log_likelihood(process.probability_flow(eps_model), x, 1e-7, 1e-7, exact=True, t0=t0)
    expected = stats.norm.logpdf(x.numpy(), math.sqrt(a0) * MU, math.sqrt(a0 * SIGMA ** 2 + 1 - a0)).reshape(4, -1).sum(1)
    assert abs((log_p.numpy() - expected) / 4).max() < 1e-3


def test_bits_per_dim_standard_error_is_the_standard_error_over_images():
    """Evaluator.bits_per_dim: the mean and std / sqrt(n) over the images (numpy as the reference)."""
    import numpy as np

    from metrics.evaluation import Evaluator

    nats = torch.tensor([-100.0, -120.0, -90.0, -130.0, -110.0], dtype=torch.float64)

    class Known(torch.nn.Module):
        num_classes, num_dims, device = None, 4, torch.device("cpu")

        def log_likelihood(self, x, generator=None):
            return nats[x[:, 0, 0, 0].long()]

    test_set = [(torch.full((1, 2, 2), float(i)), 0) for i in range(5)]
    mean, stderr = Evaluator(bpd_num_images=5, batch_size=2).bits_per_dim(Known(), test_set)
    bpd = -nats.numpy() / (4 * math.log(2.0))
    assert mean == pytest.approx(bpd.mean()) and stderr == pytest.approx(bpd.std(ddof=1) / np.sqrt(5))


@pytest.mark.parametrize("k", [0, 3])
def test_the_ddpm_ode_through_the_decoder_is_bound_terms_plus_ode_density_minus_noising_density(k):
    """likelihood.start=decoder, start_step=k: the bound's L_0 ... L_k + log p_ode(x_k) - log q(x_k | x)
    with x_k ~ q(x_k | x). With the exact eps of Gaussian data the ODE's density of x_k is the
    Gaussian's (scipy), and q(x_k | x) = N(sqrt(a_k) x, 1 - a_k) (scipy); the bound's terms are its
    own (L_k on the same x_k, the others on their own draws, in the module's order)."""
    from functools import partial

    from models.ddpm import DDPM
    from models.diffusion.gaussian_diffusion import GaussianDiffusion

    steps = 200
    process = GaussianDiffusion(num_timesteps=steps, schedule="cosine")
    log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(process.alphas_cumprod)])

    class ExactEps(nn.Module):   # E[eps | x_t] of N(MU, SIGMA^2) data, at the ODE's fractional timesteps
        num_classes, learn_sigma = None, False

        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(()))

        def forward(self, x, timestep):
            position = timestep.double() + 1.0
            k = position.floor().clamp(max=steps - 1).long()
            a = (log_abar[k] + (position - k) * (log_abar[k + 1] - log_abar[k])).exp()
            a = a.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            return (1 - a).sqrt() / (a * SIGMA ** 2 + 1 - a) * (x - a.sqrt() * MU)

    ddpm = DDPM(ExactEps(), process, partial(torch.optim.Adam), image_shape=(1, 2, 2), ema_decay=0.0,
                likelihood={"kind": "ode", "start": "decoder", "start_step": k, "rtol": 1e-7, "atol": 1e-7})
    torch.manual_seed(3)
    x = torch.randint(0, 256, (3, 1, 2, 2)).double() / 255.0
    nats = ddpm.double().log_likelihood(x, torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    eps = torch.randn((3, 1, 2, 2), generator=g, dtype=torch.float64)
    a = process.alphas_cumprod.double()
    x0 = x * 2 - 1
    latent = a[k].sqrt() * x0 + (1 - a[k]).sqrt() * eps
    bound_nats = torch.zeros(3, dtype=torch.float64)
    for i in range(k + 1):
        x_i = latent if i == k else a[i].sqrt() * x0 + (1 - a[i]).sqrt() * torch.randn((3, 1, 2, 2), generator=g, dtype=torch.float64)
        t = torch.full((3,), i, dtype=torch.long)
        bound_nats += process.vb_term_bpd(ddpm.ema.shadow, x0, x_i, t).double() * 4 * math.log(2)
    ak = float(a[k])
    ode = stats.norm.logpdf(latent.numpy(), math.sqrt(ak) * MU, math.sqrt(ak * SIGMA ** 2 + 1 - ak)).reshape(3, -1).sum(1)
    noising = stats.norm.logpdf(latent.numpy(), math.sqrt(ak) * x0.numpy(), math.sqrt(1 - ak)).reshape(3, -1).sum(1)
    expected = -bound_nats.numpy() + ode - noising
    assert abs((nats.numpy() - expected) / 4).max() < 1e-3
    assert ddpm.likelihood_details()["start"].startswith("decoder")


@pytest.mark.parametrize("settings,match", [({"kind": "ode", "start": "sideways"}, "likelihood.start"),
                                            ({"kind": "ode", "start": "dequantized", "start_step": 5}, "start_step"),
                                            ({"kind": "ode", "start": "decoder", "start_step": 10_000}, "start_step")])
def test_bad_ode_likelihood_settings_are_refused_when_the_model_is_built(settings, match):
    import hydra

    from models.configs import compose

    from hydra.errors import InstantiationException

    cfg = compose("train", ["experiment=smoke", "model=ddpm"])
    with pytest.raises((ValueError, InstantiationException), match=match):   # Hydra wraps the model's error
        hydra.utils.instantiate(cfg.model, likelihood=settings)
