"""Every paper-scale preset really trains (slow; `make test-all`): composed as it is, with only the
batch size, the sample count and the step counts shrunk (and the CPU as accelerator, on stand-in
data of the preset's shape), it takes two real optimizer steps, runs its final evaluation, and a
resume from the step-1 checkpoint ends on exactly the step-2 weights. The peak memory (RSS) of
each run is printed.

Each run is its own process (``python tests/test_paper_presets.py PRESET OUT STAGE``), so that its
peak memory is its own."""
from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the presets that reproduce papers at GPU scale (conf/experiment/)
PAPER_PRESETS = [
    "ddpm_cifar10_ho2020", "ddpm_cifar10_cfg", "iddpm_cifar10", "dcgan_cifar10", "sngan_cifar10",
    "sngan_cifar10_projection", "vae_cifar10", "realnvp_cifar10",
    "adm_imagenet64_cond", "adm_imagenet128_cond", "adm_imagenet256_cond", "adm_imagenet256_uncond",
    "adm_classifier_imagenet64", "adm_classifier_imagenet128", "adm_classifier_imagenet256",
]
#: stand-in images per split: enough for two batches of one and the evaluation's reference
STAND_IN_IMAGES = 6


def write_stand_in_data(cfg, data_dir: Path) -> None:
    """Random images in the on-disk format of the preset's dataset (CIFAR-10 python batches with
    their MD5s published for this process; downsampled-ImageNet .npz files)."""
    rng = np.random.default_rng(0)
    name, size = cfg.datamodule.name, int(cfg.datamodule.image_size)
    if name == "cifar10":
        import hashlib

        import torchvision.datasets as tvd

        base = data_dir / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(base / batch, "wb") as f:
                pickle.dump({"data": rng.integers(0, 256, (STAND_IN_IMAGES, 3072), dtype=np.uint8),
                             "labels": list(range(STAND_IN_IMAGES))}, f)
        with open(base / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
        md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in base.iterdir()}
        tvd.CIFAR10.train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
        tvd.CIFAR10.test_list = [["test_batch", md5["test_batch"]]]
        tvd.CIFAR10.meta = {**tvd.CIFAR10.meta, "md5": md5["batches.meta"]}
    elif name == "imagenet":
        folder = Path(cfg.datamodule.data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for stem, n in (("train_data_batch_1", 3 * STAND_IN_IMAGES), ("val_data", STAND_IN_IMAGES)):
            np.savez(folder / f"{stem}.npz", data=rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8),
                     labels=np.arange(1, n + 1))
    else:
        raise ValueError(f"no stand-in data for dataset {name!r}")


def overrides(preset: str, out: Path, max_steps: int) -> list[str]:
    data = out.parent / "data"
    return [f"experiment={preset}", "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.max_steps={max_steps}",
            "datamodule.batch_size=1", "datamodule.num_workers=0", "datamodule.download=false",
            f"paths.data_dir={data}", f"paths.cache_dir={out.parent / 'cache'}", "logger=csv",
            "callbacks.progress_bar=null", "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.model_checkpoint.save_top_k=-1", "++callbacks.model_checkpoint.monitor=null",
            "callbacks.model_checkpoint.save_last=link",     # a link, not a third copy of a 9 GB checkpoint
            "evaluation.num_samples=8", "evaluation.batch_size=8", "evaluation.bpd_num_images=0",
            "evaluation.every_n_steps=0", "evaluation.grid_size=2", "evaluation.reference.num_images=8",
            "++datamodule.options.val_size=2"]


def run_stage(preset: str, out: Path, stage: str) -> dict:
    """``steps``: two batches of optimizer steps and the final evaluation; ``resume``: from the
    checkpoint of ``steps`` after the first batch to the end of the second, without evaluation."""
    import torch

    from models.configs import compose
    from omegaconf import open_dict
    from scripts.train import train

    from hydra.utils import get_class

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = compose("train", overrides(preset, out, 2), out)
    # two batches: Lightning's step counts every optimizer step (a GAN batch takes a D and a G step)
    per_batch = getattr(get_class(cfg.model._target_), "max_optimizer_steps_per_batch", 1)
    extra = [] if stage == "steps" else [f"ckpt_path={first_checkpoint(out.parent / 'steps')}"]
    cfg = compose("train", [*overrides(preset, out, 2 * per_batch), *extra], out)
    with open_dict(cfg):
        if cfg.model.get("sampler") is not None and "steps" in cfg.model.sampler:   # a diffusion sampler:
            for key in ("sampler", "final_sampler"):                               # its own, in 2 steps
                cfg.evaluation[key] = {**(cfg.evaluation.get(key) or {}), "steps": 2}
        if stage == "resume":
            cfg.callbacks.evaluation = None
    write_stand_in_data(cfg, Path(cfg.paths.data_dir))
    metrics = train(cfg)
    results = json.loads((out / "results.json").read_text())
    return {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "train_steps": results["train_steps"], "status": results["status"],
            "num_params": results["num_params"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def first_checkpoint(run: Path) -> Path:
    """The checkpoint written after the first batch (the earliest step)."""
    steps = sorted((run / "checkpoints").glob("step*.ckpt"))
    assert len(steps) >= 2, steps
    return steps[0]


def same_weights(a: Path, b: Path) -> list[str]:
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_takes_two_steps_evaluates_and_resumes_exactly(preset, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "WANDB_MODE": "offline"}
    report = {}
    for stage in ("steps", "resume"):
        proc = subprocess.run([sys.executable, __file__, preset, str(tmp_path / stage), stage], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("PRESET_RESULT ")]
        assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
        report[stage] = json.loads(lines[-1].split(" ", 1)[1])
    steps, resumed = report["steps"], report["resume"]
    assert steps["status"] == "ok" and steps["train_steps"] >= 2
    assert steps["metrics"], "the final evaluation produced no metric"
    ckpts = tmp_path / "steps" / "checkpoints"
    first_checkpoint(tmp_path / "steps")
    differ = same_weights(ckpts / "last.ckpt", tmp_path / "resume" / "checkpoints" / "last.ckpt")
    for stage in ("steps", "resume"):            # a paper-scale checkpoint takes GBs of disk
        for ckpt in (tmp_path / stage / "checkpoints").glob("*.ckpt"):
            ckpt.unlink()
    assert differ == [], f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
    with capsys.disabled():
        print(f"\n{preset}: {steps['num_params']:,} parameters, peak RSS {steps['peak_rss_mb']:.0f} MB (2 steps + "
              f"evaluation), {resumed['peak_rss_mb']:.0f} MB (resume); metrics {sorted(steps['metrics'])}")


if __name__ == "__main__":
    name, out_dir, which = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    print("PRESET_RESULT " + json.dumps(run_stage(name, out_dir, which)), flush=True)
