"""``mk.FixedEMA``: the fixed-rate EMA of the trainable adapters (LAE's stable EMA), against float64."""

from __future__ import annotations

import pytest
import torch

import mage_kernels as mk


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(mk.MageLinear(12, 10, r=2), mk.MageLinear(10, 6, r=2))
    for layer in model:
        layer.for_task(inputs={"image", "text"}, output="text")  # adapters 0, 1, 2 train; 3 stays frozen
        with torch.no_grad():
            for b in layer.lora_B:
                b.normal_(0.0, 0.1)  # B starts at zero: give the tensors values to average
    return model


def _trainable(model):
    return list(mk.adapter_parameters(model, trainable_only=True))


@pytest.mark.parametrize("decay", [0.99, 0.7])
def test_update_is_the_float64_ema_of_the_trajectory_and_finish_task_adopts_it(decay):
    model = _model()
    ema = mk.FixedEMA(model, decay=decay)
    named = _trainable(model)
    assert ema.names == [n for n, _ in named] and named
    want = {n: p.detach().double().clone() for n, p in named}  # theta* = theta at the task's start
    frozen = {n: p.detach().clone() for n, p in mk.adapter_parameters(model, trainable_only=False)
              if n not in want}
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):  # random walks stand in for optimizer steps
        with torch.no_grad():
            for _, p in named:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        ema.update()
        for n, p in named:
            want[n] = decay * want[n] + (1 - decay) * p.detach().double()
    for n, e in zip(ema.names, ema.emas):
        torch.testing.assert_close(e.double(), want[n], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(e, dict(named)[n])  # the EMA lags the weights
    assert ema.steps == 5 and ema.fallback_count == 0 and ema.nonfinite_count == 0
    assert ema.state_bytes() == sum(p.numel() * 4 for _, p in named)
    ema.finish_task()
    for n, p in named:
        torch.testing.assert_close(p.detach().double(), want[n], rtol=1e-6, atol=1e-7)
    for n, p in mk.adapter_parameters(model, trainable_only=False):
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n  # frozen adapters are not touched


def test_state_dict_round_trip_and_start_task_snapshots_again():
    model = _model()
    ema = mk.FixedEMA(model)
    with torch.no_grad():
        for _, p in _trainable(model):
            p.mul_(1.5)
    ema.update()
    state = ema.state_dict()
    other = mk.FixedEMA(_model(seed=3))
    other.load_state_dict(state)
    for a, b in zip(other.emas, ema.emas):
        assert torch.equal(a, b)
    ema.start_task()
    for e, (_, p) in zip(ema.emas, _trainable(model)):
        assert torch.equal(e, p.detach()) and ema.steps == 0
    assert state["kind"] == "FixedEMA"
    with pytest.raises(ValueError, match="state_dict is a DEMA's, not a FixedEMA's"):
        ema.load_state_dict(mk.DEMA(model).state_dict())  # same tensors, another kind of EMA


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, float("nan")])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        mk.FixedEMA(_model(), decay=decay)
