"""``reference.pema_update_foreach_`` (the ``torch`` backend of ``mage::pema_update_``).

Checked three ways on fresh random inputs:

* bitwise against the readable per-tensor loop ``reference.pema_update_`` (same
  operations in the same order), for float32 / float64 / float16 / bfloat16 and
  a list mixing dtypes;
* against a float64 re-implementation of the ALGORITHM.md §3 formula, with
  inputs built so that every element's ``beta`` is at least 0.1 away from the
  branch boundaries 0 and 1 (so rounding cannot legitimately flip a branch),
  plus special elements: ``g = inf`` / NaN (beta not finite: fallback),
  ``F = inf`` (beta = 0: fallback), ``theta = NaN`` and ``theta* = inf`` (new
  not finite: theta* kept and counted);
* through ``torch.ops.mage.pema_update_`` with backend ``torch``.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

import mage_kernels as mk
from mage_kernels import reference

LAM, BETA_FB = 1e-5, 0.99
SHAPES = [(37, 5), (129,), (3, 1, 7), (0, 4), (1,)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
Quad = Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]


def make_inputs(dtypes, device: str, seed: int, specials: bool = True) -> Quad:
    """theta, theta*, g, F per shape; beta targets in (0.1, 0.9), (1.1, 3) or (-2, -0.1)."""
    gen = torch.Generator().manual_seed(seed)
    params, emas, grads, fishers = [], [], [], []
    for i, shape in enumerate(SHAPES):
        dtype = dtypes[i % len(dtypes)]
        n = 1
        for s in shape:
            n *= s
        e = torch.randn(n, generator=gen, dtype=torch.float64)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
        d = sign * (0.1 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64))  # |theta - theta*| >= 0.1
        p = e + d
        f = 0.5 + 1.5 * torch.rand(n, generator=gen, dtype=torch.float64)
        branch = torch.randint(0, 3, (n,), generator=gen)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        beta = torch.where(branch == 0, 0.1 + 0.8 * u, torch.where(branch == 1, 1.1 + 1.9 * u, -2 + 1.9 * u))
        g = beta * (f * d + LAM) - 1
        if specials and n >= 6:
            g[0] = float("inf")
            g[1] = float("nan")
            f[2] = float("inf")
            p[3] = float("nan")
            e[4] = float("inf")
            g[5] = -1.0  # beta exactly 0: fallback
        params.append(p.to(dtype).reshape(shape).to(device))
        emas.append(e.to(dtype).reshape(shape).to(device))
        grads.append(g.to(dtype).reshape(shape).to(device))
        fishers.append(f.to(dtype).reshape(shape).to(device))
    return params, emas, grads, fishers


def spec_pema(p, e, g, f):
    """ALGORITHM.md §3 in float64 from the stored values: (new theta*, fallbacks, non-finite)."""
    p, e, g, f = (t.double() for t in (p, e, g, f))
    beta = (g + 1) / (f * (p - e) + LAM)
    ok = (beta > 0) & (beta < 1)
    beta = torch.where(ok, beta, torch.full_like(beta, BETA_FB))
    new = beta * e + (1 - beta) * p
    fin = torch.isfinite(new)
    return torch.where(fin, new, e), int((~ok).sum()), int((~fin).sum())


DTYPE_CASES = {
    "fp32": [torch.float32],
    "fp64": [torch.float64],
    "fp16": [torch.float16],
    "bf16": [torch.bfloat16],
    "mixed": [torch.float32, torch.bfloat16, torch.float64],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_foreach_is_bitwise_the_loop_reference(case, device):
    params, emas, grads, fishers = make_inputs(DTYPE_CASES[case], device, seed=1)
    emas_loop = [e.clone() for e in emas]
    emas_each = [e.clone() for e in emas]
    c_loop = reference.pema_update_(params, emas_loop, grads, fishers, LAM, BETA_FB)
    c_each = reference.pema_update_foreach_(params, emas_each, grads, fishers, LAM, BETA_FB)
    assert c_each.dtype == torch.int64 and c_each.shape == (2,) and c_each.device == emas[0].device
    assert torch.equal(c_each, c_loop)
    assert int(c_each[0]) > 0 and int(c_each[1]) > 0  # both fallbacks and skips happened
    for a, b, e0 in zip(emas_each, emas_loop, emas):
        assert a.dtype == e0.dtype and a.shape == e0.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert not torch.equal(a[torch.isfinite(a)], e0[torch.isfinite(a)]) or a.numel() <= 1  # it did move


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["fp32", "fp64", "bf16", "mixed"])
def test_foreach_matches_float64_spec(case, device):
    dtypes = DTYPE_CASES[case]
    params, emas, grads, fishers = make_inputs(dtypes, device, seed=2)
    before = [e.clone() for e in emas]
    counts = reference.pema_update_foreach_(params, emas, grads, fishers, LAM, BETA_FB)
    want_fb = want_skip = 0
    for p, e0, g, f, got in zip(params, before, grads, fishers, emas):
        want, fb, skip = spec_pema(p, e0, g, f)
        want_fb += fb
        want_skip += skip
        # float32 compute: a few roundings of values of size |theta| + |theta*|; fp64 is near-exact;
        # half types add one rounding of the result to the storage dtype.
        rel = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[got.dtype]
        scale = (p.double().abs() + e0.double().abs()).nan_to_num(0.0, 0.0, 0.0) + 1
        err = (got.double() - want).abs().nan_to_num(0.0, 0.0, 0.0)  # inf - inf -> nan; compared below
        assert bool((err <= rel * scale).all()), f"{got.dtype}: max err {float((err / scale).max()):.3g}"
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert counts.tolist() == [want_fb, want_skip]
    # the specials: 6 per tensor with >= 6 elements -> 6 fallbacks each (plus random ones), 2 skips each
    big = sum(1 for e in emas if e.numel() >= 6)
    assert want_skip == 2 * big and want_fb > 6 * big


def test_foreach_without_specials_moves_every_element():
    params, emas, grads, fishers = make_inputs([torch.float32], "cpu", seed=3, specials=False)
    before = [e.clone() for e in emas]
    counts = reference.pema_update_foreach_(params, emas, grads, fishers, LAM, BETA_FB)
    assert int(counts[1]) == 0
    for p, e0, g, f, got in zip(params, before, grads, fishers, emas):
        want, _, _ = spec_pema(p, e0, g, f)
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


def test_foreach_bad_and_empty_lists():
    p = torch.randn(4)
    with pytest.raises(ValueError, match="equal length"):
        reference.pema_update_foreach_([p], [p.clone()], [p], [])
    counts = reference.pema_update_foreach_([], [], [], [])
    assert counts.tolist() == [0, 0] and counts.dtype == torch.int64


def test_torch_backend_of_the_op_is_the_foreach_reference(monkeypatch):
    params, emas, grads, fishers = make_inputs([torch.float32], "cpu", seed=4)
    calls = []
    real = reference.pema_update_foreach_

    def spy(*args):
        calls.append(len(args[1]))
        return real(*args)

    monkeypatch.setattr(reference, "pema_update_foreach_", spy)
    expect = [e.clone() for e in emas]
    c_loop = reference.pema_update_(params, expect, grads, fishers, LAM, BETA_FB)
    with mk.use_backend("torch"):
        counts = mk.pema_update_(params, emas, grads, fishers, lam=LAM, beta_fallback=BETA_FB)
    assert calls == [len(SHAPES)]
    assert torch.equal(counts, c_loop)
    for a, b in zip(emas, expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
