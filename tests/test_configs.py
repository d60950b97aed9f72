"""Composing a preset from Python: one documented function, no import for its side effect."""
import subprocess
import sys

import pytest

from conftest import ROOT
from models.registry import families


def run_fresh(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing of the test session imported), from the repository root."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_notebook_composes_a_paper_preset_with_models_configs_compose():
    done = run_fresh("from models.configs import compose\n"
                     "cfg = compose('train', ['experiment=adm_imagenet64_cond'])\n"
                     "print(cfg.model.net.attention_resolutions, cfg.model.net.null_class, cfg.model.num_classes)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[32,", "16,", "8]", "False", "1000"]


def test_hydras_own_compose_resolves_once_any_genbench_module_is_imported():
    done = run_fresh("import models.ddpm\n"
                     "from hydra import compose, initialize_config_dir\n"
                     f"with initialize_config_dir(config_dir={str(ROOT / 'conf')!r}, version_base='1.3'):\n"
                     "    cfg = compose(config_name='train', overrides=['experiment=digits_matched_ddpm', 'conditioning=class'])\n"
                     "print(list(cfg.model.net.attention_resolutions), cfg.model.net.null_class)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[4]", "True"]


def test_threads_compose_at_the_same_time():
    """The main job composes the noise-aware classifier's config in a thread beside the caches."""
    import threading

    from models.configs import compose

    errors, results = [], []

    def work():
        try:
            for _ in range(3):
                results.append(compose("train", ["experiment=digits_matched_ddpm", "conditioning=class"]).model.num_classes)
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [10] * 9


@pytest.mark.parametrize("family", sorted(families()))
def test_conditioning_is_a_config_group_every_family_takes(family):
    """conditioning=class makes any family class-conditional; the families with classifier-free
    guidance also train a null class (label dropout 0.1) and sample at w = 1; none undoes it all."""
    import hydra

    from models.configs import compose

    for conditioning, classes in (("none", None), ("class", 10)):
        model = hydra.utils.instantiate(compose("train", [f"model={family}", f"conditioning={conditioning}"]).model)
        assert model.num_classes == classes, conditioning
        if "classifier_free" in model.guidance_kinds:
            assert model.label_dropout == (0.1 if classes else 0.0)
            assert model.default_sampler["guidance_scale"] == (1.0 if classes else 0.0)


def test_a_checkpoints_model_settings_can_be_overridden_but_not_invented(smoke_checkpoint):
    """load_module(model_overrides=...): an estimator switched on the stored config; a section the
    stored model config does not have is refused by name."""
    from models.checkpoints import load_module

    module, _, _ = load_module(smoke_checkpoint, "cpu", {"likelihood.kind": "ode"})
    assert module.likelihood_kind == "ode"
    with pytest.raises(ValueError, match="no 'no_such_section'"):
        load_module(smoke_checkpoint, "cpu", {"no_such_section.x": 1})
