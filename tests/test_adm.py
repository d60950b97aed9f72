"""The ADM UNet options, the paper presets' parameter counts and Improved DDPM's learned variances."""
import math

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.configs import compose
from models.components.unet import AttnBlock, EncoderClassifier, ResBlock, UNet
from models.diffusion import GaussianDiffusion

# Parameter counts of the released models as openai/guided-diffusion's script_util.create_model /
# create_classifier and openai/improved-diffusion's create_model build them with the flags of their
# READMEs (counted by running those constructors' layer structure; the paper: 296M / 422M / 554M).
RELEASED_COUNTS = {
    "adm_imagenet64_cond": 295_904_454,
    "adm_imagenet128_cond": 421_529_606,
    "adm_imagenet256_cond": 553_838_086,
    "adm_imagenet256_uncond": 552_814_086,
    "adm_classifier_imagenet64": 65_438_568,
    "adm_classifier_imagenet128": 42_568_040,
    "adm_classifier_imagenet256": 54_096_360,
    "iddpm_cifar10": 52_546_438,
    "ddpm_cifar10_ho2020": 35_746_307,   # Ho et al. 2020's 35.7M, unchanged by the ADM options
}


@pytest.mark.parametrize("preset", sorted(RELEASED_COUNTS))
def test_paper_presets_have_the_released_models_parameter_counts(preset, tmp_path):
    cfg = compose("train", [f"experiment={preset}", "logger=csv"], tmp_path)
    with torch.device("meta"):      # shapes only: no 554M-parameter allocation
        net = hydra.utils.instantiate(cfg.model.net)
    assert sum(p.numel() for p in net.parameters()) == RELEASED_COUNTS[preset]


def test_adm_and_iddpm_presets_train_what_their_papers_train(tmp_path):
    for preset, schedule, steps in [("adm_imagenet64_cond", "cosine", 1000), ("adm_imagenet128_cond", "linear", 1000),
                                    ("iddpm_cifar10", "cosine", 4000)]:
        cfg = compose("train", [f"experiment={preset}", "logger=csv"], tmp_path)
        d = cfg.model.diffusion
        assert (d.schedule, d.num_timesteps, d.variance, d.loss) == (schedule, steps, "learned_range", "hybrid")
        assert cfg.model.net.learn_sigma and cfg.model.net.use_scale_shift_norm
    cfg = compose("train", ["experiment=adm_classifier_imagenet64", "logger=csv"], tmp_path)
    assert cfg.model.diffusion.schedule == "cosine"      # the process of the 64x64 DDPM it guides


def test_scale_shift_norm_is_adaptive_group_norm():
    """ADM Sec. 3: AdaGN(h, e) = y_s GroupNorm(h) + y_b, (y_s, y_b) = Linear(e); guided-diffusion writes
    y_s = 1 + s. Recomputed here with the functional ops from the block's own weights."""
    torch.manual_seed(0)
    block = ResBlock(8, 16, temb_ch=12, dropout=0.0, groups=4, scale_shift=True).eval()
    torch.nn.init.normal_(block.conv2.weight)
    x, temb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    h = F.conv2d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias)), block.conv1.weight, block.conv1.bias, padding=1)
    scale, shift = F.linear(F.silu(temb), block.temb_proj.weight, block.temb_proj.bias)[:, :, None, None].chunk(2, 1)
    h = F.group_norm(h, 4, block.norm2.weight, block.norm2.bias) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    expected = F.conv2d(x, block.skip.weight, block.skip.bias) + h
    torch.testing.assert_close(block(x, temb), expected)
    assert block.temb_proj.out_features == 32       # 2 x out channels: a scale and a shift each


@pytest.mark.parametrize("resample,size", [("down", 2), ("up", 8)])
def test_biggan_resblock_resamples_both_branches(resample, size):
    """BigGAN up/down residual block: nearest x2 / 2x2 average pooling on the skip branch and after
    the first norm + SiLU on the residual branch; a zero last conv leaves the resampled input."""
    block = ResBlock(4, 4, 8, 0.0, 2, scale_shift=True, resample=resample)
    x = torch.randn(3, 4, 4, 4)
    out = block(x, torch.randn(3, 8))
    assert out.shape == (3, 4, size, size)
    resampled = F.avg_pool2d(x, 2) if resample == "down" else F.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(out, resampled)     # conv2 is zero-initialised


def test_multi_head_attention_equals_per_head_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(8, groups=2, num_heads=4)
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(2, 8, 3, 3)
    q, k, v = F.conv2d(F.group_norm(x, 2, block.norm.weight, block.norm.bias), block.qkv.weight,
                       block.qkv.bias).reshape(2, 3, 8, 9).unbind(1)                 # (B, C, HW) each
    heads = []
    for h in range(4):
        qh, kh, vh = (z[:, 2 * h:2 * h + 2] for z in (q, k, v))                   # (B, 2, HW)
        weights = torch.softmax(torch.einsum("bct,bcs->bts", qh, kh) / math.sqrt(2), dim=-1)
        heads.append(torch.einsum("bts,bcs->bct", weights, vh))
    expected = x + F.conv2d(torch.cat(heads, 1).reshape(2, 8, 3, 3), block.proj.weight, block.proj.bias)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_adm_unet_with_every_option_keeps_the_image_shape_and_outputs_v():
    net = UNet(3, 16, 16, (1, 2, 2), 1, (8, 4), 0.1, norm_groups=8, num_classes=5, num_head_channels=8,
               use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True)
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.tensor([1, 4]))
    assert out.shape == (2, 6, 16, 16)
    clf = EncoderClassifier(3, 16, 5, 16, (1, 2, 2), 1, (8, 4), norm_groups=8, num_head_channels=8,
                            use_scale_shift_norm=True, resblock_updown=True)
    assert clf(torch.randn(2, 3, 16, 16), torch.tensor([3, 7])).shape == (2, 5)
    assert clf.pool.num_heads == 32 // 8
    with pytest.raises(ValueError, match="num_head_channels"):
        UNet(3, 16, 16, (1, 2), 1, (8,), norm_groups=8, num_head_channels=12)


# ----------------------------------------------------------------------------- learned variances

def test_learned_range_spans_beta_tilde_to_beta_on_every_respaced_process():
    """Nichol & Dhariwal Eq. 15: v = -1 gives log beta~_t, v = +1 log beta_t, in between the log-linear
    interpolation, with the betas of the (respaced) process it runs on."""
    base = GaussianDiffusion(1000, "cosine", variance="learned_range")
    for process in (base, base.respace(25)):
        betas = process.betas.numpy()
        abar = np.cumprod(1 - betas)
        beta_tilde = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
        t = torch.arange(1, process.num_timesteps)
        x = torch.zeros(len(t), 1, 1, 1, dtype=torch.float64)
        for v, expected in [(-1.0, np.log(beta_tilde)), (1.0, np.log(betas[1:])),
                            (0.2, 0.6 * np.log(betas[1:]) + 0.4 * np.log(beta_tilde))]:
            got = process.model_log_variance_of(torch.full_like(x, v), t, x).flatten().numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_learned_variance_at_its_ends_is_the_fixed_processes():
    """v = -1 everywhere is the fixedsmall process (every t) and v = +1 the fixedlarge one (t > 0;
    at t = 0 fixedlarge takes beta~_1, diffusion_tf's choice): same means, variances and bound terms."""
    learned, small, large = (GaussianDiffusion(50, variance=v) for v in ("learned_range", "fixedsmall", "fixedlarge"))
    x0, x_t = torch.rand(50, 1, 2, 2) * 2 - 1, torch.randn(50, 1, 2, 2)
    t = torch.arange(50)
    eps = lambda x, t: 0.3 * x
    for v, fixed, keep in [(-1.0, small, t >= 0), (1.0, large, t > 0)]:
        model = lambda x, t, v=v: torch.cat([eps(x, t), torch.full_like(x, v)], 1)
        a, b = learned.p_mean_variance(model, x_t, t), fixed.p_mean_variance(eps, x_t, t)
        torch.testing.assert_close(a["mean"], b["mean"])
        torch.testing.assert_close(a["log_variance"][keep], b["log_variance"].expand_as(x_t)[keep])
        torch.testing.assert_close(learned.vb_term_bpd(model, x0, x_t, t)[keep], fixed.vb_term_bpd(eps, x0, x_t, t)[keep])


def test_hybrid_loss_is_l_simple_plus_a_thousandth_of_t_times_the_kl_and_its_vlb_sees_no_mean_gradient():
    """L_hybrid = L_simple + 0.001 L_vlb (Eq. 16), L_vlb = T L_t for the sampled t; the L_vlb term is
    computed with a stop-gradient on the mean, so the eps channels get L_simple's gradient only."""
    T = 100
    diffusion = GaussianDiffusion(T, variance="learned_range", loss="hybrid", clip_denoised=False).double()
    x0 = torch.rand(4, 1, 2, 2, dtype=torch.float64) * 2 - 1
    out = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)   # the network output (eps, v)
    seen = {}

    def model(x, t):
        seen["x_t"], seen["t"] = x, t
        return out
    loss = diffusion.training_loss(model, x0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, T, (4,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    assert torch.equal(seen["t"], t)
    # the KL of Eq. 5 by hand (numpy), in bits per dim
    b = diffusion.betas.numpy()
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    e, v, xt, x0n = out.detach()[:, :1].numpy(), out.detach()[:, 1:].numpy(), seen["x_t"].numpy(), x0.numpy()
    tt = t.numpy()[:, None, None, None]
    post_var = b * (1 - abar_prev) / (1 - abar)
    c1, c2 = b * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - b) / (1 - abar)
    true_mean = c1[tt] * x0n + c2[tt] * xt
    true_logvar = np.log(np.append(post_var[1], post_var[1:]))[tt]
    pred_x0 = (xt - np.sqrt(1 - abar[tt]) * e) / np.sqrt(abar[tt])
    model_mean = c1[tt] * pred_x0 + c2[tt] * xt
    frac = (v + 1) / 2
    model_logvar = frac * np.log(b)[tt] + (1 - frac) * true_logvar
    kl = 0.5 * (-1 + model_logvar - true_logvar + np.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * np.exp(-model_logvar))
    kl_bits = kl.reshape(4, -1).mean(1) / math.log(2)
    mse = ((e - noise.numpy()) ** 2).reshape(4, -1).mean(1)
    assert (tt.flatten() > 0).all()      # the seed's t avoid the decoder term (tested with the bound)
    np.testing.assert_allclose(loss.detach().numpy(), mse + 0.001 * T * kl_bits, rtol=1e-10)
    loss.sum().backward()
    np.testing.assert_allclose(out.grad[:, :1].numpy(), 2 * (e - noise.numpy()) / 4, rtol=1e-10)
    assert out.grad[:, 1:].abs().sum() > 0          # v learns from L_vlb


def test_learned_variance_misconfigurations_are_refused_with_the_fix():
    from models.ddpm import DDPM

    with pytest.raises(ValueError, match="loss=hybrid.*variance=learned_range"):
        GaussianDiffusion(10, loss="hybrid")
    net = UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, 16)
    opt = lambda params: torch.optim.Adam(params)
    with pytest.raises(ValueError, match="learn_sigma=true"):
        DDPM(net, GaussianDiffusion(10, "cosine", variance="learned_range"), opt, (1, 8, 8))
    with pytest.raises(ValueError, match="2 output channels.*learn_sigma=true"):
        GaussianDiffusion(10, "cosine", variance="learned_range").training_loss(net, torch.zeros(2, 1, 8, 8))
    learned = UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, 16, learn_sigma=True)
    model = DDPM(learned, GaussianDiffusion(10, "cosine", variance="learned_range", loss="hybrid"), opt, (1, 8, 8))
    with pytest.raises(ValueError, match="ignores this model's learned variances.*ancestral"):
        model.sample(2, name="ddim", steps=5, eta=1.0)
    assert model.sample(2, name="ddim", steps=5, eta=0.0).shape == (2, 1, 8, 8)
    assert model.sample(2, name="ancestral", steps=5).shape == (2, 1, 8, 8)
    assert torch.isfinite(model.training_loss(torch.rand(2, 1, 8, 8))["loss"])


def test_classifier_free_guidance_guides_eps_and_keeps_the_conditional_variance():
    from models.ddpm import DDPM

    class Net(torch.nn.Module):
        num_classes, null_class, learn_sigma = 3, True, True

        def forward(self, x, t, y):
            label = y.float().reshape(-1, 1, 1, 1).expand_as(x)
            return torch.cat([label, label / 10], 1)          # eps = y, v = y / 10

    model = DDPM(Net(), GaussianDiffusion(10, "cosine", variance="learned_range", loss="hybrid"), lambda p: None, (1, 2, 2),
                 num_classes=3, label_dropout=0.1, ema_decay=0.0)
    model.ema.shadow = Net()
    out = model.guided_eps_model(torch.tensor([1, 2]), 2.0)(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    # eps: (1 + w) y - w * 3 (null label 3); v: the conditional y / 10
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([3 * 1 - 2 * 3, 3 * 2 - 2 * 3.0]))
    torch.testing.assert_close(out[:, 1, 0, 0], torch.tensor([0.1, 0.2]))


def test_every_ablation_variant_composes_and_the_architecture_pair_has_about_equal_parameters(tmp_path):
    from scripts.ablation import ABLATIONS, TRAIN_EVALUATION

    counts = {}
    for name, spec in ABLATIONS.items():
        for variant, overrides in spec["variants"].items():
            cfg = compose("train", [f"experiment={spec.get('preset', 'digits_ddpm')}", "logger=csv",
                                 *spec.get("train_evaluation", TRAIN_EVALUATION), *overrides], tmp_path)
            model = hydra.utils.instantiate(cfg.model)
            counts[(name, variant)] = sum(p.numel() for p in model.net.parameters())
            for sampler in spec["samplers"].values():
                model._check_sampler(**{**model.default_sampler, **sampler})
    ho, *others = (counts[("architecture", v)] for v in ABLATIONS["architecture"]["variants"])
    assert all(abs(n / ho - 1) < 0.08 for n in others)      # within 8% of the Ho configuration


def test_ablation_reruns_an_interrupted_run_and_tabulates_mean_and_std(tmp_path):
    from metrics.results import write_json
    from scripts.ablation import finished, markdown, run_ablation, spread

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"mid-training")
    assert not finished(run)                       # a checkpoint alone is an interrupted run
    write_json(run / "results.json", {"status": "failed", "error": "killed"})
    assert not finished(run)
    fid = spread([1.0, 2.0, 3.0])
    assert (fid["mean"], fid["std"]) == (2.0, 1.0)
    from scipy import stats
    assert fid["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) / 3 ** 0.5)   # the 95% Student-t half-width
    result = {"seeds": [0, 1], "repeats": 2, "num_samples": 1000, "bpd_images": 200, "variants": {
        "a": {"num_params": 700_000, "fid": {"ancestral-25": fid}, "bpd": spread([4.9, 5.1])}}}
    assert "| a | 0.70M | 2.00 ± 2.48 | 5.0000 ± 1.2706 |" in markdown(result)
    with pytest.raises(ValueError, match="unknown variance variants"):
        run_ablation("variance", tmp_path / "out", [0], 10, 1, 0, [], only=["no such variant"])


def test_learned_variances_trained_by_l_simple_are_refused():
    """v gets no gradient from L_simple: the run would report variances it never learned."""
    from models.ddpm import DDPM

    learned = UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, 16, learn_sigma=True)
    with pytest.raises(ValueError, match="learned_range with model.diffusion.loss=simple.*loss=hybrid"):
        DDPM(learned, GaussianDiffusion(10, "cosine", variance="learned_range"), lambda p: None, (1, 8, 8))


def test_a_respaced_process_keeps_its_schedules_name():
    base = GaussianDiffusion(100, "cosine")
    assert base.respace(10).schedule == "cosine" and base.respace(10, "logsnr").schedule == "cosine"


def test_hybrid_training_vlb_uses_the_unclipped_x0_prediction():
    """improved-diffusion's training L_vlb is computed from the unclipped x^_0: the training loss is
    the same whether the process clips for sampling or not, and equals the unclipped vb term."""
    class Far(torch.nn.Module):      # eps far off: x^_0 lies well outside [-1, 1], so clipping would matter
        learn_sigma = True

        def forward(self, x, t):
            return torch.cat([torch.full_like(x, -30.0), torch.zeros_like(x)], 1)

    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    losses = []
    for clip in (True, False):
        process = GaussianDiffusion(50, "cosine", variance="learned_range", loss="hybrid", clip_denoised=clip)
        losses.append(process.training_loss(Far(), x0, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(losses[0], losses[1])
    process = GaussianDiffusion(50, "cosine", variance="learned_range", loss="hybrid", clip_denoised=True)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 50, (4,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = process.q_sample(x0, t, noise)
    eps, v = process.model_output(Far(), x_t, t)
    unclipped = process.vb_terms_of(x0, x_t, t, process.mean_variance_of(eps, v, x_t, t, clip=False))
    clipped = process.vb_terms_of(x0, x_t, t, process.mean_variance_of(eps, v, x_t, t, clip=True))
    simple = (eps - noise).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(losses[0], simple + 0.001 * 50 * unclipped)
    assert not torch.allclose(clipped, unclipped)        # the case where the two differ
