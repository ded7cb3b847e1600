"""DEMA / CIA baseline (ALGORITHM.md §4) against a float64 re-implementation of the formula.

Per tensor: ``a = |theta - theta*|_1, b = |g|_1, c = |g - g_prev|_1``,
``alpha = 2 (1 + b) / (a c)``, fallback 0.01 unless ``0 < alpha < 1``,
``theta* <- (1 - alpha) theta* + alpha theta``, ``g_prev <- g`` (zeros before
the first step). The tensors are set so that some take the formula's alpha and
others the fallback, over several steps.
"""

from __future__ import annotations

import pytest
import torch

import mage_kernels as mk
from mage_kernels import reference


def spec_dema(p, e, g, gp, fallback=0.01):
    p, e, g, gp = (t.detach().double() for t in (p, e, g, gp))
    a = (p - e).abs().sum()
    b = g.abs().sum()
    c = (g - gp).abs().sum()
    alpha = 2 * (1 + b) / (a * c)
    used = float(alpha) if 0 < float(alpha) < 1 else fallback
    return (1 - used) * e + used * p, g.clone(), used


def _layer():
    layer = mk.MageLinear(6, 5, r=2, dropout=0.0)
    layer.set_trainable([0, 1])
    return layer


@pytest.mark.parametrize("fallback", [0.01, 0.05])
def test_dema_matches_float64_spec_over_steps(fallback):
    layer = _layer()
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters() if not p.requires_grad}
    dema = mk.DEMA(layer, alpha_fallback=fallback)
    assert sorted(dema.names) == ["lora_A.0", "lora_A.1", "lora_B.0", "lora_B.1"]
    assert all(torch.count_nonzero(g) == 0 for g in dema.prev_grads)  # g_prev starts at zero
    ema = {n: e.double().clone() for n, e in zip(dema.names, dema.emas)}
    gprev = {n: torch.zeros_like(e, dtype=torch.float64) for n, e in zip(dema.names, dema.emas)}
    used_formula = used_fallback = 0
    for step in range(4):
        with torch.no_grad():
            for i, p in enumerate(dema.params):
                # tensor 0 and 2 drift far (alpha from the formula), 1 and 3 barely move (fallback)
                p.add_(torch.randn_like(p) * (2.0 if i % 2 == 0 else 1e-3))
                p.grad = torch.randn_like(p) * (0.5 + step)
        alphas = dema.update()
        for i, (n, p) in enumerate(zip(dema.names, dema.params)):
            ema[n], gprev[n], used = spec_dema(p, ema[n], p.grad, gprev[n], fallback)
            assert float(alphas[i]) == pytest.approx(used, rel=1e-5), (step, n)
            if used == fallback:
                used_fallback += 1
            else:
                used_formula += 1
        for n, e, gp in zip(dema.names, dema.emas, dema.prev_grads):
            torch.testing.assert_close(e.double(), ema[n], rtol=1e-5, atol=1e-7)
            assert torch.equal(gp.double(), gprev[n])  # g_prev is an exact copy of g
    assert used_formula > 0 and used_fallback > 0
    assert dema.fallback_count == used_fallback and dema.nonfinite_count == 0
    assert dema.last_fallback_fraction == pytest.approx(0.5)
    dema.finish_task()
    for p, e in zip(dema.params, dema.emas):
        assert torch.equal(p.detach(), e)
    for n, p in layer.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


def test_dema_class_agrees_with_reference_function():
    layer = _layer()
    dema = mk.DEMA(layer)
    with torch.no_grad():
        for i, p in enumerate(dema.params):
            p.add_(torch.randn_like(p) * (3.0 if i < 2 else 1e-4))
            p.grad = torch.randn_like(p)
    emas = [e.clone() for e in dema.emas]
    gps = [g.clone() for g in dema.prev_grads]
    want = reference.dema_update_(dema.params, emas, [p.grad for p in dema.params], gps)
    got = dema.update()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, b in zip(dema.emas, emas):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(dema.prev_grads, gps):
        assert torch.equal(a, b)


def test_dema_counts_nonfinite_inputs_and_ignores_fisher():
    layer = _layer()
    dema = mk.DEMA(layer)
    with torch.no_grad():
        for p in dema.params:
            p.add_(1.0)
            p.grad = torch.randn_like(p)
        dema.params[0].grad[0, 0] = float("nan")
    alphas = dema.update(fisher="ignored")
    assert float(alphas[0]) == 0.01  # NaN alpha falls back
    assert dema.nonfinite_count == 1
    with pytest.raises(ValueError, match="alpha_fallback"):
        mk.DEMA(layer, alpha_fallback=0.0)


def test_dema_class_runs_the_reference_implementation(monkeypatch):
    """One implementation: DEMA.update() is reference.dema_step_ (spied), not a second copy of the formula."""
    layer = _layer()
    dema = mk.DEMA(layer)
    calls = []
    real = reference.dema_step_

    def spy(*args):
        calls.append(len(args[0]))
        return real(*args)

    monkeypatch.setattr(reference, "dema_step_", spy)
    with torch.no_grad():
        for p in dema.params:
            p.add_(torch.randn_like(p))
            p.grad = torch.randn_like(p)
    dema.update()
    assert calls == [4]


def test_dema_bf16_norms_are_not_rounded_to_bf16():
    """bf16 adapters: a, b, c and alpha come from the exact bf16 values summed in float64.

    Summing ~100 bf16 magnitudes in bf16 would be off by ~1e-2 relative; here alpha
    must match the float64 formula on the same bf16 values to float64 precision, and
    theta* to one bf16 rounding of the float64 update.
    """
    torch.manual_seed(3)
    layer = mk.MageLinear(48, 40, r=4, dropout=0.0, dtype=torch.bfloat16)
    layer.set_trainable([0, 1])
    dema = mk.DEMA(layer)
    gprev = [torch.zeros_like(e, dtype=torch.float64) for e in dema.emas]
    formula = 0
    for step in range(3):
        with torch.no_grad():
            for i, p in enumerate(dema.params):
                p.add_(torch.randn_like(p) * (3.0 if i % 2 == 0 else 1e-2))
                p.grad = (torch.randn_like(p, dtype=torch.float32) * (1 + step)).to(torch.bfloat16)
        before = [e.clone() for e in dema.emas]
        alphas = dema.update()
        assert alphas.dtype == torch.float64
        for i, p in enumerate(dema.params):
            # the spec on the stored bf16 values of theta* (the EMA is stored in bf16)
            want_e, gprev[i], used = spec_dema(p, before[i], p.grad, gprev[i])
            assert float(alphas[i]) == pytest.approx(used, rel=1e-12, abs=0), (step, i)
            formula += used != 0.01
            assert dema.emas[i].dtype == torch.bfloat16
            torch.testing.assert_close(dema.emas[i].double(), want_e, rtol=2 ** -8, atol=1e-30)
    assert formula > 0
