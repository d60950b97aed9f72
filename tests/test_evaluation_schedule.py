"""The evaluation schedule: one evaluation per multiple of every_n_steps, whatever the step stride."""
from __future__ import annotations

import pytest

from metrics.callback import EvaluationCallback


def _gan_steps(batches: int, n_critic: int) -> list[int]:
    """Lightning's global_step after each batch of the GAN: a D step per batch, a G step after
    every n_critic-th D step (models.gan.GAN.is_generator_step)."""
    steps, step = [], 0
    for d_steps in range(1, batches + 1):
        step += 1 + (d_steps % n_critic == 0)
        steps.append(step)
    return steps


def _evaluated_at(every: int, steps: list[int], max_steps: int = 0) -> list[int]:
    callback = EvaluationCallback(every_n_steps=every)
    return [s for s in steps if callback.is_due(s, max_steps)]


@pytest.mark.parametrize("n_critic", [1, 2])
@pytest.mark.parametrize("every", [3, 5, 7, 10])
def test_gan_is_evaluated_once_per_multiple(n_critic, every):
    steps = _gan_steps(60, n_critic)
    evaluated = _evaluated_at(every, steps)
    # exactly one evaluation per multiple reached, at the first step at or past it
    multiples = list(range(every, steps[-1] + 1, every))
    assert len(evaluated) == len(multiples)
    for multiple, step in zip(multiples, evaluated):
        assert step == min(s for s in steps if s >= multiple)


def test_unit_stride_evaluates_at_the_multiples_and_leaves_the_last_step_to_the_final_one():
    assert _evaluated_at(200, list(range(1, 601)), max_steps=600) == [200, 400]
    assert _evaluated_at(0, list(range(1, 50))) == []


def test_schedule_survives_a_checkpoint():
    before = EvaluationCallback(every_n_steps=3)
    assert [s for s in [2, 4] if before.is_due(s, 0)] == [4]
    after = EvaluationCallback(every_n_steps=3)
    after.load_state_dict(before.state_dict())
    assert [s for s in [6, 8, 10] if after.is_due(s, 0)] == [6, 10]
