"""The authors' dense PEMA (ALGORITHM.md §6) against a float64 implementation written here, independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mage_kernels as mk

LAM = 1e-5


def numpy_authors_step(theta, ema, g, lam=LAM):
    """The authors' update in float64 numpy, from the formula (not from the library's code)."""
    theta, ema, g = (np.asarray(t, dtype=np.float64) for t in (theta, ema, g))
    d = g * g
    c = (theta - ema).T.dot(d) + lam * np.eye(theta.shape[1])
    alpha = (g + 1.0).dot(np.linalg.inv(c))
    return alpha * ema + (1.0 - alpha) * theta, alpha


def assert_close_fp32(got, want, alpha, theta, ema, alpha_rtol=1e-4):
    """The library's float32 result vs the float64 one, elementwise.

    ``theta* = alpha theta* + (1 - alpha) theta`` cancels catastrophically when ``|alpha|`` is
    large (it is ~1e5 in the rank-deficient case), so the float32 error is a few ulps of
    ``|alpha theta*| + |(1 - alpha) theta|``, plus alpha's own relative error times
    ``|alpha (theta* - theta)|``.
    """
    eps32 = float(np.finfo(np.float32).eps)
    tol = 8 * eps32 * (np.abs(alpha * ema) + np.abs((1 - alpha) * theta)) + alpha_rtol * np.abs(alpha * (ema - theta))
    err = np.abs(np.asarray(got, dtype=np.float64) - want)
    assert (err <= tol).all(), f"worst error / tolerance {float((err / tol).max()):.3g}"
    return tol


def _case(shape, scale_delta=0.3, scale_g=0.5, gen=None):
    theta = torch.randn(shape, dtype=torch.float64, generator=gen)
    ema = theta - scale_delta * torch.randn(shape, dtype=torch.float64, generator=gen)
    g = scale_g * torch.randn(shape, dtype=torch.float64, generator=gen)
    return theta, ema, g


@pytest.mark.parametrize("shape", [(4, 6), (8, 3), (3, 3)])  # lora_A-like [r, d], lora_B-like [d, r], square
def test_matches_an_independent_float64_implementation(shape):
    gen = torch.Generator().manual_seed(7 + shape[0])
    theta, ema, g = _case(shape, gen=gen)
    want, alpha = numpy_authors_step(theta.numpy(), ema.numpy(), g.numpy())
    # the library computes alpha in float32 (as the authors do) from float64 inputs here;
    # C is well conditioned for these sizes (|delta| ~ 0.3, |g| ~ 0.5), so float32 is accurate to ~1e-4
    e = ema.clone()
    stats = mk.authors_pema_update_([theta], [e], [g], lam=LAM)
    scale = np.abs(alpha).max() * (np.abs(theta.numpy()).max() + np.abs(ema.numpy()).max())
    np.testing.assert_allclose(e.numpy(), want, rtol=0, atol=2e-4 * scale)
    assert stats.elements == theta.numel() and stats.exceptions == 0
    assert stats.outside == int(((alpha <= 0) | (alpha >= 1)).sum())
    assert stats.nonfinite_alpha == 0 and stats.nonfinite_ema == 0


def test_rank_deficient_case_is_dominated_by_the_damping():
    """theta - theta* of rank 1 (and D of rank <= r): C = low rank + lam I, so its inverse is ~ 1/lam
    on the complement and alpha is ~ 1e5 -- far outside (0, 1), as ALGORITHM.md §6 says."""
    gen = torch.Generator().manual_seed(3)
    r, d = 4, 16
    u = torch.randn(r, 1, dtype=torch.float64, generator=gen)
    v = torch.randn(1, d, dtype=torch.float64, generator=gen)
    theta = torch.randn(r, d, dtype=torch.float64, generator=gen)
    ema = theta - 1e-3 * (u @ v)                      # rank-1 change
    g = 1e-3 * torch.randn(r, d, dtype=torch.float64, generator=gen)
    c = (theta - ema).T @ (g * g) + LAM * torch.eye(d, dtype=torch.float64)
    assert torch.linalg.matrix_rank((theta - ema).T @ (g * g), rtol=1e-8) == 1  # up to the rounding of theta - theta*
    want, alpha = numpy_authors_step(theta.numpy(), ema.numpy(), g.numpy())
    assert np.median(np.abs(alpha)) > 1e4  # ~ (g + 1) / lam
    e = ema.clone()
    stats = mk.authors_pema_update_([theta], [e], [g], lam=LAM)
    assert stats.outside == theta.numel()
    th, em = theta.numpy(), ema.numpy()
    tol = assert_close_fp32(e.numpy(), want, alpha, th, em)
    jump = np.abs(want - em)
    assert np.median(jump) > 5 * np.abs(th).max()  # theta* jumps far in one step (no clamp) ...
    assert np.median(tol) < 1e-2 * np.median(jump)  # ... and the check resolves that jump finely
    assert torch.linalg.cond(c) < 1e3  # the damping keeps C invertible: no exception branch


def test_singular_inverse_takes_the_fallback_and_is_counted(monkeypatch):
    theta, ema, g = _case((3, 5), gen=torch.Generator().manual_seed(1))

    def singular(c):
        raise torch.linalg.LinAlgError("singular")

    monkeypatch.setattr(torch.linalg, "inv", singular)
    e = ema.clone()
    stats = mk.authors_pema_update_([theta], [e], [g])
    torch.testing.assert_close(e, 0.99 * ema + 0.01 * theta, rtol=1e-12, atol=1e-12)
    assert stats.exceptions == 1 and stats.outside == 0


def test_class_interface_runs_before_the_optimizer_step_and_ends_on_the_average():
    layer = mk.MageLinear(6, 5, r=2, dropout=0.0)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0.0, 0.3)
    layer.set_trainable([0, 2])
    pema = mk.AuthorsPEMA(layer)
    assert pema.names == ["lora_A.0", "lora_A.2", "lora_B.0", "lora_B.2"] or sorted(pema.names) == sorted(
        ["lora_A.0", "lora_A.2", "lora_B.0", "lora_B.2"])
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        opt.zero_grad()
        layer(torch.randn(4, 3, 6)).pow(2).mean().backward()
        before = [e.clone() for e in pema.emas]
        want = [numpy_authors_step(p.detach().numpy(), e.numpy(), p.grad.numpy()) for p, e in zip(pema.params, before)]
        pema.update()
        if step == 0:
            # the task's first step has theta* = theta, so C = lam I exactly and alpha = (g + 1) / lam;
            # later steps invert the ill-conditioned C of an exploded theta* (float32 gives no digits there)
            for got, (w, alpha), p, e in zip(pema.emas, want, pema.params, before):
                assert np.allclose(alpha, (p.grad.double().numpy() + 1) / LAM)
                assert_close_fp32(got.numpy(), w, alpha, p.detach().double().numpy(), e.double().numpy())
        opt.step()
    assert pema.steps == 3 and pema.stats.elements == 3 * sum(p.numel() for p in pema.params)
    finite = [bool(torch.isfinite(e).all()) for e in pema.emas]
    pema.finish_task()
    for p, e, ok in zip(pema.params, pema.emas, finite):
        if ok:
            assert torch.equal(p.detach(), e)
    assert mk.persistent_state_bytes(pema) == sum(e.numel() * e.element_size() for e in pema.emas)
    layer.lora_A[0].grad = None
    with pytest.raises(RuntimeError, match="no gradient for the trainable adapter lora_A.0"):
        pema.update()


def test_bad_arguments():
    t = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="equal length"):
        mk.authors_pema_update_([t], [t, t], [t])
    with pytest.raises(ValueError, match="2-D"):
        mk.authors_pema_update_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="fallback"):
        mk.AuthorsPEMA(mk.MageLinear(4, 4), fallback=1.0)
