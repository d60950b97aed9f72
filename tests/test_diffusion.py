"""The Gaussian diffusion process against closed forms and the papers' values."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from models.components.likelihoods import discretized_gaussian_log_likelihood
from models.diffusion.gaussian_diffusion import GaussianDiffusion, cosine_betas, linear_betas, normal_kl


def test_linear_betas_are_ho2020_values():
    betas = linear_betas(1000)
    assert betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    # abar_T is tiny: the forward process ends at (almost) pure noise (Ho et al. Sec. 4)
    assert np.prod(1 - betas) < 5e-5


def test_cosine_betas_follow_nichol_dhariwal_eq17():
    T, s = 1000, 0.008
    betas = cosine_betas(T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    abar = np.cumprod(1 - betas)
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    np.testing.assert_allclose(abar[:-20], expected[:-20], rtol=1e-9)  # the tail is clipped at 0.999
    assert betas.max() <= 0.999


def test_q_sample_matches_closed_form():
    d = GaussianDiffusion(1000)
    x0, noise = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 500, 999])
    abar = np.cumprod(1 - linear_betas(1000))
    expected = torch.stack([math.sqrt(abar[i]) * x0[k] + math.sqrt(1 - abar[i]) * noise[k] for k, i in enumerate(t.tolist())])
    torch.testing.assert_close(d.q_sample(x0, t, noise), expected)


def test_q_sample_marginal_statistics():
    d, t = GaussianDiffusion(1000), 300
    x0 = torch.full((20000, 1, 1, 1), 0.7, dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((20000,), t), torch.randn_like(x0))
    abar = d.alphas_cumprod[t]
    assert float(xt.mean()) == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
    assert float(xt.std()) == pytest.approx(math.sqrt(1 - abar), abs=0.02)


def test_posterior_is_bayes_rule_of_the_forward_process():
    """q(x_{t-1}|x_t,x_0) from Eq. 7 equals the Gaussian conditional computed by hand."""
    d, t = GaussianDiffusion(1000), 250
    x0, xt = torch.tensor([[[[0.3]]]], dtype=torch.float64), torch.tensor([[[[-0.4]]]], dtype=torch.float64)
    abar_prev, beta = float(d.alphas_cumprod[t - 1]), float(d.betas[t])
    # prior x_{t-1} ~ N(sqrt(abar_prev) x0, 1-abar_prev); likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
    prec = 1 / (1 - abar_prev) + (1 - beta) / beta
    mean = (math.sqrt(abar_prev) * 0.3 / (1 - abar_prev) + math.sqrt(1 - beta) * -0.4 / beta) / prec
    got_mean, got_logvar = d.q_posterior(x0, xt, torch.tensor([t]))
    assert float(got_mean) == pytest.approx(mean, rel=1e-9)
    assert float(got_logvar.exp()) == pytest.approx(1 / prec, rel=1e-9)


def test_normal_kl_matches_torch_distributions():
    m1, m2, lv1, lv2 = torch.randn(4, 10).double().unbind()
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)


def test_discretized_gaussian_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    for mean, log_scale in [(0.1, -2.0), (-0.9, -4.0), (0.99, -1.0)]:
        ll = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert float(ll.exp().sum()) == pytest.approx(1.0, abs=1e-6)
        # interior bin equals the CDF difference from scipy
        k = int(torch.argmin((levels - mean).abs()))
        ref = stats.norm.cdf(levels[k] + 1 / 255, mean, math.exp(log_scale)) - stats.norm.cdf(levels[k] - 1 / 255, mean, math.exp(log_scale))
        assert float(ll[k].exp()) == pytest.approx(ref, rel=1e-6)


def test_respace_keeps_the_cumulative_schedule():
    d = GaussianDiffusion(1000)
    r = d.respace(50)
    assert r.num_timesteps == 50 and r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map], rtol=1e-12)
    assert d.respace(1000) is d


class GaussianDataOracle(torch.nn.Module):
    """The exact eps-predictor for data x0 ~ N(mu, s^2): E[eps | x_t] (so samplers must recover N(mu, s^2))."""

    def __init__(self, diffusion, mu=0.3, s=0.2):
        super().__init__()
        self.abar = torch.as_tensor(diffusion.alphas_cumprod)
        self.mu, self.s = mu, s

    def forward(self, x, t):
        abar = self.abar[t].to(x).reshape(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x - abar.sqrt() * self.mu) / (abar * self.s ** 2 + 1 - abar)


def _sample_moments(x):
    return float(x.mean()), float(x.std())


def test_ddim_eta1_all_steps_matches_ancestral_statistically():
    """With sigma_t = the DDPM posterior std (eta=1, all 1000 steps) DDIM is DDPM's ancestral
    sampler (Song et al. 2021 Sec. 4.1); both must also recover the data distribution."""
    d = GaussianDiffusion(1000, variance="fixedsmall", clip_denoised=False)
    oracle = GaussianDataOracle(d)
    torch.manual_seed(0)
    anc = d.ancestral_sample(oracle, 4000, (1, 1, 1), torch.device("cpu"))
    ddim = d.ddim_sample(oracle, 4000, (1, 1, 1), torch.device("cpu"), eta=1.0)
    for x in (anc, ddim):
        m, s = _sample_moments(x)
        assert m == pytest.approx(0.3, abs=0.015) and s == pytest.approx(0.2, abs=0.015)
    ks = stats.ks_2samp(anc.flatten().numpy(), ddim.flatten().numpy())
    assert ks.pvalue > 0.01
    # and each DDIM eta=1 step has exactly the ancestral step's mean
    x, t = torch.randn(8, 1, 1, 1), torch.full((8,), 400)
    out = d.p_mean_variance(oracle, x, t)
    eps = d.predict_eps(x, t, out["pred_x0"])
    abar, abar_prev = d._gather(d.alphas_cumprod, t, x), d._gather(d.alphas_cumprod_prev, t, x)
    sigma2 = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    ddim_mean = abar_prev.sqrt() * out["pred_x0"] + (1 - abar_prev - sigma2).sqrt() * eps
    torch.testing.assert_close(ddim_mean, out["mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma2.log(), out["log_variance"], rtol=1e-5, atol=1e-6)


def test_deterministic_ddim_converges_to_the_data_distribution():
    """eta=0 integrates the probability-flow ODE: exact at 1000 steps, with a variance shortfall that
    shrinks as the number of respaced steps grows (Euler discretization error)."""
    d = GaussianDiffusion(1000, clip_denoised=False)
    oracle = GaussianDataOracle(d)
    stds = {}
    for steps in (20, 50, 200, 1000):
        torch.manual_seed(0)
        x = d.respace(steps).ddim_sample(oracle, 4000, (1, 1, 1), torch.device("cpu"), eta=0.0)
        m, stds[steps] = _sample_moments(x)
        assert m == pytest.approx(0.3, abs=0.015)
    assert stds[1000] == pytest.approx(0.2, abs=0.006)
    assert stds[20] < stds[50] < stds[200] < stds[1000] + 0.003


def test_bound_of_a_perfect_gaussian_model_is_close_to_the_true_entropy():
    """For x0 on the 8-bit grid drawn from N(0, 0.2^2), the bound (bits/dim) with the exact oracle
    is >= the discrete entropy (it is a bound) and within a bit of it (the gap is mostly L_0 with the
    narrow fixed decoder variance); a wrong model (mean shifted) gets a clearly worse bound."""
    d = GaussianDiffusion(1000, variance="fixedsmall", clip_denoised=False)
    oracle = GaussianDataOracle(d, mu=0.0, s=0.2)
    torch.manual_seed(1)
    x0 = (torch.randn(512, 1, 1, 1) * 0.2).mul(127.5).round().div(127.5).clamp(-1, 1)
    bpd = float(d.bpd(oracle, x0).mean())
    # discrete entropy of the quantized Gaussian (bin width 2/255), in bits
    levels = np.arange(256) / 127.5 - 1
    p = stats.norm.cdf(levels + 1 / 255, 0, 0.2) - stats.norm.cdf(levels - 1 / 255, 0, 0.2)
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    assert entropy - 0.05 < bpd < entropy + 1.0
    torch.manual_seed(1)
    wrong = float(d.bpd(GaussianDataOracle(d, mu=0.3, s=0.2), x0).mean())
    assert wrong > bpd + 0.5


def test_training_and_sampling_steps_build_no_tensor_from_host_data(monkeypatch):
    """The schedule lives on the device (buffers): no step may build a tensor from numpy or Python
    data (on a GPU each would be a pageable host-to-device copy and a stream sync)."""
    d = GaussianDiffusion(1000)
    process = d.respace(10)   # built once per step count, before the loop (not in it)
    model = lambda x, t: torch.zeros_like(x)   # noqa: E731
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    calls = []
    for name in ("from_numpy", "as_tensor", "tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    d.training_loss(model, x0)
    process.ddim_sample(model, 4, (1, 8, 8), torch.device("cpu"), eta=1.0)
    process.ancestral_sample(model, 4, (1, 8, 8), torch.device("cpu"))
    d.respace(10)
    assert calls == []


def test_schedule_moves_with_its_owner_and_is_not_saved():
    d = GaussianDiffusion(100)
    owner = torch.nn.Module()
    owner.diffusion = d
    assert owner.state_dict() == {}                       # rebuilt from the config, never saved
    moved = owner.to(torch.float64)                       # .to() reaches the buffers
    assert moved.diffusion.betas.dtype == torch.float64 and d.respace(10).betas.device == d.betas.device


def _exact_ode_endpoint(d: GaussianDiffusion, oracle, x_T: torch.Tensor) -> torch.Tensor:
    """For Gaussian data N(mu, s^2) the probability-flow ODE is affine: x_t = alpha_t mu +
    sqrt(alpha_t^2 s^2 + sigma_t^2) z with z fixed by x_T; the samplers end with the exact posterior
    mean E[x_0 | x_{t_0}] at the first timestep."""
    abar = d.alphas_cumprod.double()
    spread = lambda i: (abar[i] * oracle.s ** 2 + 1 - abar[i]).sqrt()  # noqa: E731
    z = (x_T.double() - abar[-1].sqrt() * oracle.mu) / spread(-1)
    x_0 = abar[0].sqrt() * oracle.mu + spread(0) * z
    return oracle.mu + abar[0].sqrt() * oracle.s ** 2 / spread(0) ** 2 * (x_0 - abar[0].sqrt() * oracle.mu)


def test_dpm_solver_pp_is_second_order_and_beats_ddim_at_equal_nfe():
    """DPM-Solver++(2M) on logSNR-uniform steps (what sampler.name=dpm_solver_pp runs) against the
    exact ODE solution of Gaussian data: more accurate than DDIM (eta 0, its time-uniform steps) at
    the same network evaluations, and its error falls about 4x per doubling of the steps (order 2)
    where DDIM's falls about 2x (order 1); with 2 steps it is DDIM (first order, then the final x_0)."""
    d = GaussianDiffusion(1000, clip_denoised=False)
    oracle = GaussianDataOracle(d)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the samplers' x_T: their only draw)
    x_T = torch.randn((256, 1, 1, 1), generator=seed())
    target = _exact_ode_endpoint(d, oracle, x_T)

    def error(sampler: str, steps: int, spacing: str) -> float:
        process = d.respace(steps, spacing)
        assert len(process.betas) == steps
        kwargs = {"eta": 0.0} if sampler == "ddim" else {}
        x = getattr(process, f"{sampler}_sample")(oracle, 256, (1, 1, 1), torch.device("cpu"), noise=seed(), **kwargs)
        return float((x.double() - target).abs().max())

    ddim = {k: error("ddim", k, "uniform") for k in (10, 20, 30, 60)}
    dpm = {k: error("dpm_solver_pp", k, "logsnr") for k in (10, 20, 30, 60)}
    for k in ddim:
        assert dpm[k] < ddim[k] / 4, (k, dpm, ddim)
    assert dpm[30] / dpm[60] > 3.0 and 1.5 < ddim[30] / ddim[60] < 2.5, (dpm, ddim)
    two = d.respace(2)
    torch.testing.assert_close(two.dpm_solver_pp_sample(oracle, 256, (1, 1, 1), torch.device("cpu"), noise=seed()),
                               two.ddim_sample(oracle, 256, (1, 1, 1), torch.device("cpu"), noise=seed(), eta=0.0))


def test_logsnr_spacing_is_even_in_lambda_and_keeps_the_ends():
    d = GaussianDiffusion(1000)
    process = d.respace(20, "logsnr")
    used = process.timestep_map.numpy()
    assert used[0] == 0 and used[-1] == 999 and len(used) == 20
    abar = d.alphas_cumprod.numpy()[used]
    lam = 0.5 * np.log(abar / (1 - abar))
    steps = np.diff(lam)
    assert np.all(steps < 0) and steps.std() / abs(steps.mean()) < 0.1   # near-equal lambda steps
    torch.testing.assert_close(process.alphas_cumprod, d.alphas_cumprod[process.timestep_map])
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        d.respace(20, "quadratic")


def test_dpm_solver_pp_step_is_algorithm_2_in_the_papers_notation():
    """Three steps on an uneven lambda grid (r_2 != 1), recomputed here in Lu et al.'s notation:
    x_{t_1} first order, then r_2 = h_1 / h_2, D_2 = (1 + 1/(2 r_2)) x0(t_1) - 1/(2 r_2) x0(t_0), then
    the first-order final step x = x0(t_2)."""
    abar = torch.tensor([0.98, 0.6, 0.02], dtype=torch.float64)            # t = 0, 1, 2 (x_T at t = 2)
    d = GaussianDiffusion(3, clip_denoised=False, betas=(1 - abar / torch.cat([torch.ones(1), abar[:-1]])).numpy())
    net = lambda x, t: 0.3 * x + 0.1 * t.reshape(-1, 1, 1, 1).to(x)        # any eps network  # noqa: E731
    x = torch.randn((4, 1, 1, 1), generator=torch.Generator().manual_seed(3))
    out = d.dpm_solver_pp_sample(net, 4, (1, 1, 1), torch.device("cpu"), noise=torch.Generator().manual_seed(3))
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha / sigma)
    x0 = lambda x, i: (x.double() - sigma[i] * net(x, torch.full((4,), i))) / alpha[i]  # noqa: E731
    t0, t1, t2 = 2, 1, 0                                                     # the solver's t_0 > t_1 > t_2
    m0 = x0(x, t0)
    h1 = lam[t1] - lam[t0]
    x1 = sigma[t1] / sigma[t0] * x - alpha[t1] * (torch.exp(-h1) - 1) * m0
    m1 = x0(x1, t1)
    h2 = lam[t2] - lam[t1]
    r2 = h1 / h2
    assert abs(float(r2) - 1) > 0.2                                          # an uneven grid
    d2 = (1 + 1 / (2 * r2)) * m1 - 1 / (2 * r2) * m0
    x2 = sigma[t2] / sigma[t1] * x1 - alpha[t2] * (torch.exp(-h2) - 1) * d2
    torch.testing.assert_close(out.double(), x0(x2, t2), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- prediction targets, weighting

@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_prediction_target_maps_back_to_the_noise(prediction):
    """Salimans & Ho 2022: a network that outputs the exact target of its parameterization implies
    exactly the eps that made x_t (so every sampler, which reads eps, is unchanged)."""
    from models.diffusion import GaussianDiffusion

    process = GaussianDiffusion(100, "cosine", prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 1, 4, 4, generator=gen) * 2 - 1, torch.randn(6, 1, 4, 4, generator=gen)
    t = torch.tensor([0, 10, 30, 50, 80, 99])
    x_t = process.q_sample(x0, t, noise)
    a, s = process.signal_and_noise(t, x_t)
    target = process.objective.target(x0, noise, a, s)
    torch.testing.assert_close(process.objective.to_eps(target, x_t, a, s), noise, atol=1e-4, rtol=1e-4)
    if prediction == "v":   # v = a eps - s x0 (their Eq. in Sec. 4), and x0 = a x_t - s v
        torch.testing.assert_close(a * x_t - s * target, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_loss_is_min_snr_gamma_times_the_x0_error_whatever_the_target(prediction):
    """Hang et al. 2023: the Min-SNR-gamma loss of any parameterization equals
    min(SNR_t, gamma) ||x_0 - x^_0||^2, x^_0 the prediction the network's output implies."""
    from models.diffusion import GaussianDiffusion

    class Constant(torch.nn.Module):
        def forward(self, x, t):
            return torch.full_like(x, 0.3)

    process = GaussianDiffusion(200, "linear", prediction=prediction, weighting="min_snr", min_snr_gamma=5.0)
    x0 = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = process.training_loss(Constant(), x0, torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)                    # the same t and noise as the loss drew
    t = torch.randint(0, 200, (8,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = process.q_sample(x0, t, noise)
    eps = process.model_output(Constant(), x_t, t)[0]
    x0_hat = process.predict_x0(x_t, t, eps)
    abar = process.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0)) * (x0 - x0_hat).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_unknown_objectives_are_refused_with_the_choices():
    from models.diffusion import GaussianDiffusion

    with pytest.raises(ValueError, match=r"prediction 'score'.*\['eps', 'v', 'x0'\]"):
        GaussianDiffusion(10, prediction="score")
    with pytest.raises(ValueError, match="weighting 'p2'"):
        GaussianDiffusion(10, weighting="p2")


def test_classifier_guided_x0_stays_in_the_data_range_at_the_first_cosine_step():
    """Guided DDIM moves x^_0 by (1 - abar) / sqrt(abar) s grad: on the cosine schedule's first step
    (abar ~ 1e-9) that left [-1, 1] by orders of magnitude and ruined few-step guided sampling."""
    from models.diffusion.gaussian_diffusion import GaussianDiffusion

    process = GaussianDiffusion(num_timesteps=100, schedule="cosine")
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 99, dtype=torch.long)
    eps, x0 = process.denoise(lambda x_t, _: torch.zeros_like(x_t), x, t, guidance=lambda x_t, _: torch.ones_like(x_t))
    assert x0.abs().max() <= 1.0
    assert torch.allclose(process.predict_x0(x, t, eps), x0, atol=1e-4)   # eps^ consistent with the clipped x^_0
