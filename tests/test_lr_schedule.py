"""The per-task learning-rate shape (``TrainConfig.lr_schedule``) that the optimizer really uses."""

import math

import pytest
import torch
from torch import nn

from mage_cl.engines import LR_SCHEDULES, lr_factor, make_engine
from mage_cl.trainer import TrainConfig


def _lrs_seen_by_adamw(cfg: TrainConfig):
    """The learning rate of every optimizer step of one task, read from the optimizer itself."""
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    steps = make_engine("ddp").begin_task(model, params, cfg)
    seen = []
    for _ in range(cfg.steps_per_task):
        seen.append(steps.opt.param_groups[0]["lr"])
        model(torch.randn(4, 3)).square().mean().backward()
        steps.step()
        steps.zero_grad()
    return seen


@pytest.mark.parametrize("steps,warmup", [(20, 5), (7, 1), (3, 5)])
def test_cosine_warms_up_then_falls_as_half_a_cosine_to_zero(steps, warmup):
    cfg = TrainConfig(steps_per_task=steps, warmup_steps=warmup, lr=0.02, lr_schedule="cosine")
    seen = _lrs_seen_by_adamw(cfg)
    for s, lr in enumerate(seen):
        if s + 1 < warmup:  # linear warm-up
            want = 0.02 * (s + 1) / warmup
        else:  # written out independently: position of step s in the decay, 0 at its first step
            pos = (s + 1 - warmup) / (steps - warmup + 1)
            want = 0.02 * (math.cos(math.pi * pos) + 1) / 2
        assert lr == pytest.approx(want, rel=1e-12), s
    decay = seen[warmup - 1:]
    assert all(b < a for a, b in zip(decay, decay[1:]))  # strictly falling after the warm-up
    if steps > warmup:
        assert decay[0] == pytest.approx(0.02) and seen[-1] < 0.02 * 0.1


def test_constant_keeps_the_learning_rate_after_the_warm_up():
    seen = _lrs_seen_by_adamw(TrainConfig(steps_per_task=9, warmup_steps=4, lr=0.01))
    assert seen == pytest.approx([0.0025, 0.005, 0.0075] + [0.01] * 6, rel=1e-12)


def test_an_unknown_schedule_is_refused_before_any_step():
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'; choose from constant, cosine"):
        model = nn.Linear(2, 2)
        make_engine("ddp").begin_task(model, list(model.parameters()), TrainConfig(lr_schedule="linear"))
    assert LR_SCHEDULES == ("constant", "cosine")
    assert lr_factor(TrainConfig(steps_per_task=10, warmup_steps=2, lr_schedule="cosine"), 100) == 0.0
