"""Class conditioning, classifier-free guidance and classifier guidance: checked against closed
forms and independent computations, plus the errors bad settings must raise before any work."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from models.components.gan_nets import ConditionalBatchNorm2d, DCGANDiscriminator, DCGANGenerator, SNGANDiscriminator
from models.components.unet import EncoderClassifier, UNet
from models.ddpm import DDPM
from models.diffusion import GaussianDiffusion
from models.noise import SampleNoise, sample_labels
from models.noisy_classifier import NoisyClassifier
from models.configs import compose

NUM_CLASSES = 3


# ----------------------------------------------------------------------------- Gaussian classes
class GaussianClassPosterior(nn.Module):
    """The exact p(y | x_t) of class-conditional data x_0 | y ~ N(mu_y, s^2 I) with uniform classes:
    x_t | y ~ N(a_t mu_y, v_t I), a_t = sqrt(abar_t), v_t = a_t^2 s^2 + 1 - abar_t, so the logits
    -||x - a_t mu_y||^2 / (2 v_t) (equal variances: the normaliser is shared)."""

    def __init__(self, means: torch.Tensor, std: float, diffusion: GaussianDiffusion):
        super().__init__()
        self.means, self.var0, self.diffusion = means, std ** 2, diffusion
        self.num_classes = means.shape[0]

    def stats(self, t):
        abar = self.diffusion.alphas_cumprod[t].float()[:, None]
        return abar.sqrt(), abar * self.var0 + 1 - abar

    def forward(self, x, t):
        a, v = self.stats(t)
        diff = x.flatten(1)[:, None, :] - a[:, None, :] * self.means.flatten(1)[None]   # (B, K, D)
        return -diff.pow(2).sum(-1) / (2 * v)


def closed_form_gradient(x, y, means, a, v):
    """grad_x log p(y | x_t) = (a mu_y - sum_k p(k | x_t) a mu_k) / v."""
    logits = -(x.flatten(1)[:, None] - a[:, None] * means.flatten(1)[None]).pow(2).sum(-1) / (2 * v)
    p = torch.softmax(logits, dim=1)                                              # (B, K)
    expected = p @ means.flatten(1)
    return ((a * (means.flatten(1)[y] - expected)) / v).reshape(x.shape)


def gaussian_guide(diffusion, std=0.3, seed=0):
    means = torch.randn(NUM_CLASSES, 1, 2, 2, generator=torch.Generator().manual_seed(seed))
    classifier = NoisyClassifier(GaussianClassPosterior(means, std, diffusion), diffusion,
                                 partial(torch.optim.Adam, lr=1e-3), (1, 2, 2), NUM_CLASSES)
    return classifier, means


def test_classifier_guidance_shifts_the_mean_by_sigma_times_the_exact_gradient():
    diffusion = GaussianDiffusion(100)
    classifier, means = gaussian_guide(diffusion)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 2, 2, generator=gen)
    t = torch.tensor([0, 10, 30, 50, 80, 99])
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    s = 2.5
    model = lambda x, t: 0.3 * x                                                  # any eps network
    plain = diffusion.p_mean_variance(model, x, t)
    guided = diffusion.guided_mean_variance(model, x, t, classifier.guidance_gradient(y, s))
    a, v = classifier.net.stats(t)
    grad = closed_form_gradient(x, y, means, a, v)
    expected = plain["mean"] + torch.exp(plain["log_variance"]) * s * grad
    torch.testing.assert_close(guided["mean"], expected, rtol=1e-5, atol=1e-6)
    # DDIM (Algorithm 2): eps^ = eps - sqrt(1 - abar_t) s grad
    eps = model(x, t)
    expected_eps = eps - (1 - diffusion.alphas_cumprod[t]).sqrt().float().reshape(-1, 1, 1, 1) * s * grad
    torch.testing.assert_close(diffusion.guided_eps(x, t, eps, classifier.guidance_gradient(y, s)), expected_eps,
                               rtol=1e-5, atol=1e-6)


def test_guided_ancestral_sampler_uses_the_guided_mean_at_original_timesteps():
    """Two respaced steps (original t = 99, then 0) from x_T: each step is mu + Sigma s grad with the
    gradient at the ORIGINAL timestep (the classifier was trained on the original process)."""
    diffusion = GaussianDiffusion(100)
    classifier, means = gaussian_guide(diffusion)
    process = diffusion.respace(2)
    assert process.timestep_map.tolist() == [0, 99]
    y, s = torch.tensor([2, 0]), 4.0
    model = lambda x, t: 0.1 * x
    out = process.ancestral_sample(model, 2, (1, 2, 2), torch.device("cpu"), SampleNoise([5, 6]),
                                   guidance=classifier.guidance_gradient(y, s))
    noise = SampleNoise([5, 6])
    x = noise.randn(1, 2, 2)
    for i, original in ((1, 99), (0, 0)):
        step = process.p_mean_variance(model, x, torch.full((2,), i))
        a, v = classifier.net.stats(torch.full((2,), original))
        x = step["mean"] + torch.exp(step["log_variance"]) * s * closed_form_gradient(x, y, means, a, v)
        if i > 0:
            x = x + torch.exp(0.5 * step["log_variance"]) * noise.randn(1, 2, 2)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)


class RecordingNet(nn.Module):
    """eps(x, t, y) = y (as a float image), recording every call's labels."""

    def __init__(self, num_classes=NUM_CLASSES, null_class=True):
        super().__init__()
        self.num_classes, self.null_class = num_classes, null_class
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, y=None):
        self.calls.append(y.clone())
        return y.float().reshape(-1, 1, 1, 1).expand_as(x) + 0 * self.weight


def cfg_ddpm(**kw) -> DDPM:
    return DDPM(RecordingNet(), GaussianDiffusion(50), partial(torch.optim.Adam, lr=1e-3), (1, 2, 2),
                num_classes=NUM_CLASSES, label_dropout=0.1, **kw)


def test_classifier_free_guidance_combines_both_halves_of_one_forward_pass():
    model = cfg_ddpm()
    y, w = torch.tensor([0, 1, 2]), 1.5
    eps = model.guided_eps_model(y, w)(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))
    null = NUM_CLASSES
    expected = ((1 + w) * y.float() - w * null).reshape(-1, 1, 1, 1).expand(3, 1, 2, 2)
    torch.testing.assert_close(eps, expected)
    calls = model.ema.shadow.calls
    assert len(calls) == 1 and calls[0].tolist() == [0, 1, 2, null, null, null]
    # sampling: one batched call per step; the recorded NFE counts both halves
    calls.clear()
    model.sample(3, labels=y, name="ddim", steps=5, guidance_scale=w)
    assert len(calls) == 5 and all(c.shape == (6,) for c in calls)
    assert model.sampling_cost(name="ddim", steps=5, guidance_scale=w)["nfe"] == 10
    assert model.sampling_cost(name="ddim", steps=5, guidance_scale=0.0)["nfe"] == 5


def test_dpm_solver_pp_samples_with_both_kinds_of_guidance():
    """sampler.name=dpm_solver_pp: classifier-free guidance in one batched call per step (NFE counts both
    halves); classifier guidance on the x_0 of the guided eps, so that two steps (first order, then the
    final x_0) are exactly guided DDIM at eta 0 (Algorithm 2), whose guided eps the test above checks."""
    model = cfg_ddpm()
    y, w = torch.tensor([0, 1, 2]), 1.5
    calls = model.ema.shadow.calls
    model.sample(3, labels=y, name="dpm_solver_pp", steps=5, guidance_scale=w)
    assert len(calls) == 5 and all(c.shape == (6,) for c in calls)
    assert model.sampling_cost(name="dpm_solver_pp", steps=5, guidance_scale=w)["nfe"] == 10
    diffusion = GaussianDiffusion(100)
    classifier, means = gaussian_guide(diffusion)
    process = diffusion.respace(2, "logsnr")
    assert process.timestep_map.tolist() == [0, 99]
    y, s = torch.tensor([2, 0]), 4.0
    net = lambda x, t: 0.1 * x
    dpm = process.dpm_solver_pp_sample(net, 2, (1, 2, 2), torch.device("cpu"), SampleNoise([5, 6]),
                                       guidance=classifier.guidance_gradient(y, s))
    ddim = process.ddim_sample(net, 2, (1, 2, 2), torch.device("cpu"), SampleNoise([5, 6]), eta=0.0,
                               guidance=classifier.guidance_gradient(y, s))
    unguided = process.dpm_solver_pp_sample(net, 2, (1, 2, 2), torch.device("cpu"), SampleNoise([5, 6]))
    torch.testing.assert_close(dpm, ddim, rtol=1e-5, atol=1e-6)
    assert (dpm - unguided).abs().max() > 1e-2


def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate():
    model = cfg_ddpm()
    torch.manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (40_000,))
    model.training_loss(torch.rand(40_000, 1, 2, 2), labels)
    seen = model.net.calls[-1]
    dropped = seen == NUM_CLASSES
    assert abs(dropped.double().mean().item() - 0.1) < 0.006      # binomial sd 0.0015
    assert torch.equal(seen[~dropped], labels[~dropped])             # the rest untouched


@pytest.mark.parametrize("family", ["gan", "vae", "realnvp", "ddpm"])
def test_conditional_samples_do_not_depend_on_batch_size(family, tmp_path):
    import hydra
    from metrics.evaluation import Evaluator

    cfg = compose("train", [f"model={family}", "model.num_classes=10", "model.sample_batch_size=5",
                         "model.sampler.steps=4" if family == "ddpm" else "seed=0"], tmp_path)
    model = hydra.utils.instantiate(cfg.model).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # away from the initialisation, where e.g. every class's CBN gain is 1
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    grabbed = {}
    for batch in (3, 7):
        parts = []
        Evaluator(num_samples=11, batch_size=batch).generate(
            model, model.sampler_kwargs(), lambda im, idx, y: parts.append((idx, im, y)))
        idx = sum((p[0] for p in parts), [])
        grabbed[batch] = (torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), idx)
    assert grabbed[3][2] == grabbed[7][2] == list(range(11))
    assert torch.equal(grabbed[3][0], grabbed[7][0]) and torch.equal(grabbed[3][1], grabbed[7][1])
    # the labels are the per-sample seeds' own, and they drive the samples
    assert torch.equal(grabbed[3][1], sample_labels([i for i in range(11)], 10))
    other = model.sample(11, generator=SampleNoise(range(11)), labels=(grabbed[3][1] + 1) % 10)
    assert not torch.equal(other, model.sample(11, generator=SampleNoise(range(11)), labels=grabbed[3][1]))


def test_sampled_labels_follow_the_requested_distribution():
    seeds = range(20_000)
    uniform = torch.bincount(sample_labels(seeds, 4), minlength=4).double() / 20_000
    assert torch.allclose(uniform, torch.full((4,), 0.25, dtype=torch.float64), atol=0.015)
    skewed = torch.bincount(sample_labels(seeds, 4, [0.7, 0.1, 0.1, 0.1]), minlength=4).double() / 20_000
    assert torch.allclose(skewed, torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64), atol=0.015)
    with pytest.raises(ValueError, match="probabilities"):
        sample_labels(seeds, 4, [0.5, 0.5])


# ----------------------------------------------------------------------------- GAN conditioning
def test_conditional_batch_norm_is_batch_norm_with_a_per_class_affine():
    cbn = ConditionalBatchNorm2d(4, 3).train()
    with torch.no_grad():
        cbn.gain.weight.normal_()
        cbn.bias.weight.normal_()
    x, y = torch.randn(8, 4, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = cbn(x, y)
    normed = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    expected = normed * cbn.gain.weight[y][:, :, None, None] + cbn.bias.weight[y][:, :, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    generator = DCGANGenerator(1, 8, latent_dim=6, base_channels=8, num_classes=3)
    assert generator(torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])).shape == (5, 1, 8, 8)


@pytest.mark.parametrize("net", ["dcgan", "sngan"])
def test_projection_discriminator_adds_the_class_embedding_inner_product(net):
    torch.manual_seed(0)
    d = DCGANDiscriminator(1, 8, base_channels=8, spectral=True, num_classes=3) if net == "dcgan" \
        else SNGANDiscriminator(3, 32, base_channels=4, num_classes=3)
    d.eval()
    x = torch.randn(4, *((1, 8, 8) if net == "dcgan" else (3, 32, 32)))
    y1, y2 = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    out1, out2 = d(x, y1), d(x, y2)
    assert out1.shape == (4,)
    phi = d.net(x).sum((2, 3))                                        # pooled last features
    embed = d.projection.embed.weight                                 # (spectrally normalised) V
    torch.testing.assert_close(out1 - out2, ((embed[y1] - embed[y2]) * phi).sum(1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="class-conditional"):
        d(x)


# ----------------------------------------------------------------------------- flow and VAE
def test_conditional_flow_density_integrates_to_one():
    """Importance sampling (150k points) of int p(v | y) dv over logit space for a 2x2 flow with
    perturbed weights: the conditional density is normalised for every class."""
    import hydra

    cfg = compose("train", ["model=realnvp", "model.num_classes=2", "datamodule.image_size=2",
                         "model.flow.num_scales=1", "model.flow.features=8"])
    model = hydra.utils.instantiate(cfg.model).eval().double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.base_mean.normal_(0, 0.5)
        model.base_log_scale.normal_(0, 0.2)
    n, scale = 150_000, 2.0
    proposal = torch.distributions.Normal(0.0, scale)
    v = proposal.sample((n, 1, 2, 2)).double()
    log_q = proposal.log_prob(v).flatten(1).sum(1)
    with torch.no_grad():
        z, logdet = model.flow(v)
        for y in (0, 1):
            log_p = model.base_log_prob(z, torch.full((n,), y)) + logdet
            integral = torch.exp(log_p - log_q).mean().item()
            assert integral == pytest.approx(1.0, abs=0.025), (y, integral)   # MC error ~0.005


def test_conditional_bounds_use_the_labels(tmp_path):
    import hydra

    x, y = torch.rand(4, 1, 8, 8).mul(255).round().div(255), torch.tensor([0, 1, 2, 3])
    for family in ("vae", "realnvp"):
        model = hydra.utils.instantiate(compose("train", [f"model={family}", "model.num_classes=10"]).model).eval()
        if family == "realnvp":
            with torch.no_grad():
                model.base_mean[1].fill_(3.0)
        with torch.no_grad():
            same = model.log_likelihood(x, torch.Generator().manual_seed(0), labels=y)
            other = model.log_likelihood(x, torch.Generator().manual_seed(0), labels=(y + 1) % 10)
        assert torch.isfinite(same).all() and not torch.allclose(same, other)
        with pytest.raises(ValueError, match="pass labels"):
            model.log_likelihood(x)


# ----------------------------------------------------------------------------- bad input
def test_guidance_settings_are_refused_with_the_fix():
    uncond = DDPM(UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, 16), GaussianDiffusion(100),
                  partial(torch.optim.Adam), (1, 8, 8))
    with pytest.raises(ValueError, match="null class.*classifier_ckpt"):
        uncond.sample(2, guidance_scale=1.0)
    with pytest.raises(ValueError, match="classifier_ckpt"):
        uncond.sample(2, classifier_scale=1.0)
    for bad in (-1.0, "strong", float("nan")):
        with pytest.raises(ValueError, match="guidance_scale must be"):
            cfg_ddpm().sample(2, labels=torch.tensor([0, 1]), guidance_scale=bad)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        cfg_ddpm().sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unknown DDPM sampler settings"):
        cfg_ddpm(sampler={"guidance": 1.0})
    with pytest.raises(ValueError, match="null_class"):
        DDPM(UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, 16, num_classes=3), GaussianDiffusion(100),
             partial(torch.optim.Adam), (1, 8, 8), num_classes=3, label_dropout=0.1)


def test_a_classifier_for_another_setting_is_refused():
    diffusion = GaussianDiffusion(100)
    net = EncoderClassifier(1, 8, 10, 16, (1, 2), 1, (4,), 0.0, 16)
    classifier = NoisyClassifier(net, diffusion, partial(torch.optim.Adam), (1, 8, 8), 10)
    classifier.run_config = {"datamodule": {"name": "mnist"}}
    model = DDPM(UNet(1, 16, 16, (1, 2), 1, (8,), 0.0, 16, num_classes=3), GaussianDiffusion(20, "cosine"),
                 partial(torch.optim.Adam), (1, 16, 16), num_classes=3)
    model.run_config = {"datamodule": {"name": "digits"}}
    with pytest.raises(ValueError, match="dataset 'mnist'.*10 classes.*image shape.*schedule"):
        classifier.check_guides(model)


def test_conditional_model_on_unlabelled_or_mismatched_data_is_refused_before_training(tmp_path):
    from scripts.train import train

    for overrides, match in ((["datamodule.num_classes=0"], "unlabelled.*num_classes=0"),
                             (["model.num_classes=5"], "num_classes=5.*num_classes=10")):
        cfg = compose("train", ["experiment=smoke", "model=gan", "model.num_classes=${datamodule.num_classes}",
                             "logger=csv", *overrides], tmp_path / match[:5])
        with pytest.raises(ValueError, match=match):
            train(cfg)


# ----------------------------------------------------------------------------- metrics
def test_class_accuracy_and_intra_fid_against_independent_computations():
    from torchmetrics.functional.classification import multiclass_accuracy

    from metrics.features import FeatureMetrics
    from metrics.reference import ReferenceStats

    class LinearExtractor(nn.Module):
        name, feature_dim, has_logits, classifies_dataset = "toy", 3, True, True

        def forward(self, images):
            pool = images.float().flatten(1)[:, :3] / 255.0
            return {"pool": pool, "logits": pool @ torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])}

    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(90, 3, generator=gen, dtype=torch.float64)
    ref_labels = torch.arange(90) % 3
    stats = ReferenceStats(ref.mean(0), torch.cov(ref.T), ref.float(), {"dataset": "toy", "split": "train",
                           "num_images": 90, "extractor": {"extractor": "toy"}}, ref_labels)
    fm = FeatureMetrics(LinearExtractor(), stats, ["fid"], intra_fid=True)
    images = torch.randint(0, 256, (60, 1, 2, 2), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 3, (60,), generator=gen)
    for start in (0, 25):
        stop = 25 if start == 0 else 60
        fm.update_generated(images[start:stop], range(start, stop), labels[start:stop])
    values, _ = fm.compute(60)
    out = LinearExtractor()(images)
    assert values["class_acc"] == pytest.approx(float(multiclass_accuracy(out["logits"], labels, 3, average="micro")))

    def scipy_fid(a, b):
        a, b = a.numpy(), b.numpy()
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))

    expected = np.mean([scipy_fid(out["pool"].double()[labels == c], ref[ref_labels == c]) for c in range(3)])
    assert values["intra_fid"] == pytest.approx(expected, rel=1e-5)
    assert not math.isnan(values["fid"])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def guided_checkpoints(tmp_path_factory, shared_cache):
    """A class-conditional DDPM with label dropout and a noisy classifier, trained by scripts/train.py."""
    from scripts.train import train

    out = tmp_path_factory.mktemp("guided")
    common = ["logger=csv", "callbacks.progress_bar=null", f"paths.cache_dir={shared_cache}"]
    # the classifier preset follows the digits DDPMs' cosine schedule; a guided DDPM of another one is refused
    train(compose("train", ["experiment=smoke", "model.num_classes=${datamodule.num_classes}", "model.label_dropout=0.2",
                         "model.diffusion.schedule=cosine", "evaluation.final_extractors=[]", "evaluation.final_sampler={name: ddim, steps: 5, "
                         "guidance_scale: 1.0}", *common], out / "ddpm"))
    train(compose("train", ["experiment=digits_noisy_classifier", "trainer.max_steps=12", "trainer.check_val_every_n_epoch=1",
                         "++trainer.limit_val_batches=1", *common], out / "classifier"))
    return out / "ddpm" / "checkpoints" / "last.ckpt", out / "classifier"


def test_noisy_classifier_run_logs_accuracy_per_noise_level(guided_checkpoints):
    import json

    results = json.loads((guided_checkpoints[1] / "results.json").read_text())
    assert results["status"] == "ok" and results["model"] == "noisy_classifier"
    assert {"val_acc", "val_acc_t0_249", "val_acc_t750_999"} <= set(results["metrics"])
    assert not (guided_checkpoints[1] / "eval_final.json").exists()       # nothing to sample, nothing evaluated


def test_guidance_sweeps_write_tables_plots_and_true_costs(guided_checkpoints, shared_cache, tmp_path):
    import json

    from scripts.guidance_sweep import guidance_sweep
    from models.configs import compose

    ddpm, classifier_dir = guided_checkpoints
    classifier = classifier_dir / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ddpm}", "evaluation.num_samples=12", "evaluation.batch_size=12", "evaluation.repeats=2",
              "sampler.name=ddim", "sampler.steps=4", f"paths.cache_dir={shared_cache}", "evaluation.grid_size=0"]
    for guidance, scales, extra in (("classifier_free", "[0,2]", []),
                                    ("classifier", "[0,3]", [f"sampler.classifier_ckpt={classifier}"])):
        cfg = compose("eval", [*common, *extra, f"+guidance={guidance}", f"+scales={scales}"], tmp_path / guidance)
        rows = guidance_sweep(cfg)
        assert [r["scale"] for r in rows] == [0.0, 2.0] if guidance == "classifier_free" else [0.0, 3.0]
        assert {"fid", "fid_ci95", "precision", "recall", "class_acc"} <= set(rows[0])
        if guidance == "classifier_free":   # two network passes per step once guided
            assert [r["nfe"] for r in rows] == [4, 8] and [r["classifier_nfe"] for r in rows] == [0, 0]
        else:
            assert [r["nfe"] for r in rows] == [4, 4] and [r["classifier_nfe"] for r in rows] == [0, 4]
        assert (tmp_path / guidance / "plots" / "guidance_sweep.png").is_file()
        one = json.loads((tmp_path / guidance / "scale_0" / "results.json").read_text())
        assert one["details"]["labels"]["counts"] and sum(one["details"]["labels"]["counts"]) == 12


@pytest.mark.slow   # about 40 s: two gloo processes sampling with both kinds of guidance (make test-all)
def test_conditional_checkpoint_metrics_are_identical_on_one_and_two_processes(guided_checkpoints, shared_cache,
                                                                               tmp_path):
    from scripts.evaluate import evaluate
    from models.configs import compose

    ddpm, classifier_dir = guided_checkpoints
    results = {}
    for n in (1, 2):
        results[n] = evaluate(compose("eval", [
            f"ckpt_path={ddpm}", f"num_processes={n}", "evaluation.num_samples=10", "evaluation.batch_size=3",
            "evaluation.bpd_num_images=2", "sampler.name=ddim", "sampler.steps=4", "sampler.guidance_scale=1.5",
            f"sampler.classifier_ckpt={classifier_dir / 'checkpoints' / 'last.ckpt'}", "sampler.classifier_scale=2",
            f"paths.cache_dir={shared_cache}"], tmp_path / f"n{n}"))
    one, two = results[1]["metrics"], results[2]["metrics"]
    assert {"fid", "class_acc", "bpd", "nfe", "classifier_nfe"} <= set(one)
    for name in one:
        if name != "sec_per_sample":
            assert two[name] == pytest.approx(one[name], rel=1e-6, abs=1e-9), name
    assert results[1]["details"]["labels"] == results[2]["details"]["labels"]
