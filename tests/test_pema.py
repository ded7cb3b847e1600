"""PEMA (ALGORITHM.md §3): the functional update on every backend and the PEMA class.

The expected values come from ``spec_pema`` below, a straightforward float64
re-implementation of the ALGORITHM.md formula, applied to the same (fp32/fp16/fp64)
input values. Inputs are random and chosen so that both branches occur
(``0 < beta < 1`` and the fallback), with exact zeros in ``theta - theta*``,
exact ``g = -1`` (``beta = 0``, must fall back), and NaN / inf in ``g``, ``F`` and
``theta``. Elements whose ``beta`` lies within 1e-3 of the branch boundaries are
re-drawn, so float32 arithmetic cannot legitimately take the other branch.

The inputs are drawn on the CPU and moved to the ``device`` fixture
(tests/conftest.py): Triton's interpreter on CPU, the compiled kernel on CUDA.
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import pytest
import torch

import mage_kernels as mk
from mage_kernels import reference

LAM, BETA_FB = 1e-5, 0.99
# numpy (the Triton interpreter) warns about the deliberate inf * 0 inputs
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
# shapes: ragged, one spans several kernel programs (CHUNK = 4096), one is empty
SHAPES = [(37, 5), (9001,), (3, 1, 7), (0, 4), (1,)]


def fp32_rel_tol(device: torch.device) -> float:
    """Error allowed in theta*, relative to |theta| + |theta*|: a few float32 roundings; compiled
    Triton's fp32 ``/`` is ``div.full.f32`` (<= 2 ulp, not IEEE round-to-nearest), hence 2x on CUDA."""
    return 2e-6 if device.type == "cuda" else 1e-6


def spec_pema(p, e, g, f, lam=LAM, beta_fallback=BETA_FB):
    """ALGORITHM.md §3 in float64: returns (new theta*, fallback count, non-finite count)."""
    p, e, g, f = (t.double() for t in (p, e, g, f))
    beta = (g + 1) / (f * (p - e) + lam)
    inside = (beta > 0) & (beta < 1)
    beta = torch.where(inside, beta, torch.full_like(beta, beta_fallback))
    new = beta * e + (1 - beta) * p
    finite = torch.isfinite(new)
    return torch.where(finite, new, e), int((~inside).sum()), int((~finite).sum())


def _beta64(p, e, g, f):
    return (g.double() + 1) / (f.double() * (p.double() - e.double()) + LAM)


def make_case(shape, dtype, special=True, gen=None, device: torch.device = torch.device("cpu")
              ) -> Tuple[torch.Tensor, ...]:
    """(theta, theta*, g, F) with both branches, exact zeros of theta - theta*, and non-finite entries.

    Drawn on the CPU (the same values on every device), returned on ``device``."""
    n = 1
    for s in shape:
        n *= s
    p = torch.randn(n, dtype=torch.float64)
    d = torch.randn(n, dtype=torch.float64)
    g = 0.5 * torch.randn(n, dtype=torch.float64)
    f = 4 * torch.rand(n, dtype=torch.float64)
    p, g, f = p.to(dtype), g.to(dtype), f.to(dtype)
    e = (p.double() - d).to(dtype)
    # re-draw elements near the branch boundaries (0 and 1) until none is left
    for _ in range(50):
        beta = _beta64(p, e, g, f)
        near = ((beta - 1).abs() < 1e-3) | (beta.abs() < 1e-3) | ((f.double() * (p.double() - e.double()) + LAM).abs() < 1e-3)
        if not near.any():
            break
        k = int(near.sum())
        g[near] = (0.5 * torch.randn(k, dtype=torch.float64)).to(dtype)
        f[near] = (0.1 + 4 * torch.rand(k, dtype=torch.float64)).to(dtype)
        e[near] = (p[near].double() - torch.randn(k, dtype=torch.float64)).to(dtype)
    else:  # pragma: no cover
        raise AssertionError("could not draw inputs away from the branch boundaries")
    if special and n >= 40:
        idx = torch.randperm(n)[:40]
        e[idx[0:8]] = p[idx[0:8]]  # theta - theta* == 0 exactly -> beta = (g+1)/lam
        g[idx[8:11]] = -1.0  # beta == 0 exactly -> fallback
        g[idx[11]] = float("nan")
        g[idx[12]] = float("inf")
        g[idx[13]] = -float("inf")
        f[idx[14]] = float("nan")
        f[idx[15]] = float("inf")
        p[idx[16]] = float("nan")
        p[idx[17]] = float("inf")
        p[idx[18]] = -float("inf")
        f[idx[19]] = float("inf")
        e[idx[19]] = p[idx[19]]  # inf * 0 = NaN in the denominator
    return tuple(t.reshape(shape).to(device) for t in (p, e, g, f))


def make_lists(dtypes=(torch.float32,), device: torch.device = torch.device("cpu")):
    cases = [make_case(s, dt, device=device) for dt in dtypes for s in SHAPES]
    return [list(c) for c in zip(*cases)]  # params, emas, grads, fishers


def check_against_spec(before_emas, params, emas, grads, fishers, counts, rel=1e-6):
    fb_total = nf_total = 0
    for i, (p, e0, e, g, f) in enumerate(zip(params, before_emas, emas, grads, fishers)):
        want, fb, nf = spec_pema(p, e0, g, f)
        fb_total += fb
        nf_total += nf
        assert e.dtype == e0.dtype and e.shape == e0.shape
        assert torch.isfinite(e).all(), f"tensor {i}: theta* became non-finite"
        tol = rel * (p.double().abs().nan_to_num(0, 0, 0) + e0.double().abs() + 1e-30)
        if e.dtype == torch.float16:
            tol = 2e-3 * (want.abs() + 1e-3)
        err = (e.double() - want).abs()
        assert (err <= tol).all(), f"tensor {i} ({e.dtype}): max error {err.max():.3g}"
    assert counts.dtype == torch.int64 and counts.shape == (2,)
    assert counts.tolist() == [fb_total, nf_total]
    return fb_total, nf_total


@pytest.mark.parametrize("impl", ["reference", "torch", "triton", "op-triton"])
def test_pema_update_matches_float64_spec(impl, device):
    params, emas, grads, fishers = make_lists((torch.float32, torch.float64, torch.float16), device)
    before = [e.clone() for e in emas]
    if impl == "reference":
        counts = reference.pema_update_(params, emas, grads, fishers, LAM, BETA_FB)
    elif impl == "op-triton":
        with mk.use_backend("triton"):
            counts = torch.ops.mage.pema_update_(params, emas, grads, fishers, LAM, BETA_FB)
    else:
        with mk.use_backend(impl):
            counts = mk.pema_update_(params, emas, grads, fishers, lam=LAM, beta_fallback=BETA_FB)
    fb, nf = check_against_spec(before, params, emas, grads, fishers, counts, rel=fp32_rel_tol(device))
    total = sum(e.numel() for e in emas)
    # both branches and the guards were exercised
    assert 0 < fb < total and nf >= 3 * 3
    assert sum(int(((e - e0) != 0).sum()) for e, e0 in zip(emas, before)) > total // 2


def test_triton_matches_reference_exactly_enough_and_counts_accumulate(device):
    """The Triton kernel and the torch reference agree in float32 (to rounding) and in counts."""
    params, emas, grads, fishers = make_lists(device=device)
    emas_t = [e.clone() for e in emas]
    c_ref = reference.pema_update_(params, emas, grads, fishers, LAM, BETA_FB)
    with mk.use_backend("triton"):
        c_tri = mk.pema_update_(params, emas_t, grads, fishers, lam=LAM, beta_fallback=BETA_FB)
    assert c_ref.tolist() == c_tri.tolist()
    # compiled fp32 division is div.full.f32 (<= 2 ulp) while torch's is IEEE: a few ulp of |theta - theta*|
    atol = 5e-6 if device.type == "cuda" else 1e-6
    for a, b in zip(emas, emas_t):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=atol)


def test_op_schema_and_opcheck():
    schema = str(torch.ops.mage.pema_update_.default._schema)
    assert schema == (
        "mage::pema_update_(Tensor[] params, Tensor(a!)[] emas, Tensor[] grads, Tensor[] fishers, "
        "float lam, float beta_fallback) -> Tensor"
    )
    p, e, g, f = make_case((5, 3), torch.float32, special=False)
    torch.library.opcheck(torch.ops.mage.pema_update_.default, ([p], [e.clone()], [g], [f], LAM, BETA_FB))


def test_bad_inputs_are_named():
    p, e, g, f = make_case((4, 3), torch.float32, special=False)
    with pytest.raises(ValueError, match="equal length"):
        mk.pema_update_([p], [e], [g], [])
    with pytest.raises(ValueError, match="fisher 0 has shape"):
        mk.pema_update_([p], [e], [g], [f[:2]])
    with pytest.raises(ValueError, match="contiguous"):
        mk.pema_update_([p.t()], [e.t()], [g.t()], [f.t()])
    with pytest.raises(TypeError, match="floating point"):
        mk.pema_update_([p], [e], [g.long()], [f])


# ----------------------------------------------------------------------------- the PEMA class


def _model(device: torch.device = torch.device("cpu")):
    layer = mk.MageLinear(6, 5, r=2, dropout=0.0, device=device)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0.0, 0.3)
    layer.set_trainable([0, 2])
    return layer


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pema_class_end_to_end_with_optimizer(backend, device):
    layer = _model(device)
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters() if not p.requires_grad}
    fisher = mk.Fisher(layer)
    pema = mk.PEMA(layer, lam=1e-3, beta_fallback=0.9, backend=backend)
    assert pema.names == ["lora_A.0", "lora_A.2", "lora_B.0", "lora_B.2"] or sorted(pema.names) == sorted(
        ["lora_A.0", "lora_A.2", "lora_B.0", "lora_B.2"])
    expected = {n: p.detach().double().clone() for n, p in zip(pema.names, pema.params)}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    fb_expected = nf_expected = 0
    for step in range(3):
        fisher.reset()
        x = torch.randn(4, 3, 6, device=device)
        layer(x).pow(2).sum(-1).mean(-1).mean().backward()
        opt.step()
        # expected update from the float64 spec, with this step's g and F
        for n, p in zip(pema.names, pema.params):
            beta = (p.grad.double() + 1) / (fisher.for_parameter(p).double() * (p.double() - expected[n]) + 1e-3)
            inside = (beta > 0) & (beta < 1)
            beta = torch.where(inside, beta, torch.full_like(beta, 0.9))
            expected[n] = beta * expected[n] + (1 - beta) * p.detach().double()
            fb_expected += int((~inside).sum())
        counts = pema.update(fisher)
        assert counts.shape == (2,)
        opt.zero_grad()
    for n, e in zip(pema.names, pema.emas):
        torch.testing.assert_close(e.double(), expected[n], rtol=1e-5, atol=1e-7)
    assert pema.fallback_count == fb_expected and pema.nonfinite_count == nf_expected == 0
    assert 0.0 < pema.last_fallback_fraction <= 1.0
    assert pema.steps == 3
    # finish_task: theta <- theta*, frozen adapters untouched
    skipped = pema.finish_task()
    assert skipped == []
    for p, e in zip(pema.params, pema.emas):
        assert torch.equal(p.detach(), e)
    for n, p in layer.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_finish_task_skips_nan_ema_with_a_warning_and_start_task_rereads_trainable():
    layer = _model()
    pema = mk.PEMA(layer)
    with torch.no_grad():
        for p in pema.params:
            p.add_(1.0)
        pema.emas[1][0, 0] = float("nan")
    trained = [p.detach().clone() for p in pema.params]
    with pytest.warns(RuntimeWarning, match=pema.names[1]):
        skipped = pema.finish_task()
    assert skipped == [pema.names[1]]
    assert torch.equal(pema.params[1].detach(), trained[1])  # kept the trained weights
    assert torch.equal(pema.params[0].detach(), pema.emas[0]) and not torch.equal(trained[0], pema.emas[0])
    layer.set_trainable([3])
    pema.start_task()
    assert sorted(pema.names) == ["lora_A.3", "lora_B.3"]
    assert all(torch.equal(p.detach(), e) and p.data_ptr() != e.data_ptr() for p, e in zip(pema.params, pema.emas))
    assert pema.fallback_count == 0 and pema.last_fallback_fraction == 0.0


def test_update_does_not_sync_and_raises_for_a_missing_grad(device):
    layer = _model(device)  # backend "auto": triton on CUDA, torch on CPU
    fisher = mk.Fisher(layer)
    pema = mk.PEMA(layer)
    layer(torch.randn(2, 3, 6, device=device)).sum().backward()
    with torch.no_grad():  # an optimizer step moved theta away from theta*
        for p in pema.params:
            p.add_(0.1)
    before = [e.clone() for e in pema.emas]
    # a trainable adapter without a gradient (e.g. an engine keeping it elsewhere): a clear error,
    # nothing updated, nothing counted
    saved = layer.lora_A[2].grad
    layer.lora_A[2].grad = None
    with pytest.raises(RuntimeError, match=r"no gradient for the trainable adapter lora_A\.2 .*grads="):
        pema.update(fisher)
    assert pema.steps == 0 and pema.fallback_count == 0
    assert all(torch.equal(a, b) for a, b in zip(pema.emas, before))
    # ... and the same step with the gradients passed explicitly equals the .grad path
    explicit = {n: (saved if n == "lora_A.2" else p.grad) for n, p in zip(pema.names, pema.params)}
    twin = mk.PEMA(layer)
    for e, e0 in zip(twin.emas, before):
        e.copy_(e0)
    twin.update(fisher, grads=explicit)
    layer.lora_A[2].grad = saved
    counts = pema.update(fisher)
    assert isinstance(counts, torch.Tensor) and counts.device == pema.emas[0].device
    assert pema.steps == 1
    assert all(not torch.equal(a, b) for a, b in zip(pema.emas, before))
    for a, b in zip(twin.emas, pema.emas):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="2 gradients for 4"):
        twin.update(fisher, grads=[saved, saved])
    # a {name: F} mapping (Fisher.values()) gives the same update as the Fisher object
    for e, e0 in zip(twin.emas, before):
        e.copy_(e0)
    twin.update(fisher.values())
    for a, b in zip(twin.emas, pema.emas):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    with pytest.raises(KeyError, match="no Fisher"):
        twin.update({})
    with pytest.raises(TypeError, match="fisher"):
        pema.update(None)
    with pytest.raises(ValueError, match="beta_fallback"):
        mk.PEMA(layer, beta_fallback=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_gpu_matches_spec(dtype, gpu_device):
    """bf16 needs the compiled kernel (the interpreter's bf16 is not meaningful)."""
    params, emas, grads, fishers = make_lists((dtype,), gpu_device)
    before = [e.clone() for e in emas]
    with mk.use_backend("triton"):
        counts = mk.pema_update_(params, emas, grads, fishers, lam=LAM, beta_fallback=BETA_FB)
    for i, (p, e0, e, g, f) in enumerate(zip(params, before, emas, grads, fishers)):
        want, _, _ = spec_pema(p.cpu(), e0.cpu(), g.cpu(), f.cpu())
        assert torch.isfinite(e).all()
        tol = (1e-5 if dtype == torch.float32 else 1e-2) * (want.abs() + p.double().cpu().abs().nan_to_num(0, 0, 0) + 1e-3)
        assert ((e.double().cpu() - want).abs() <= tol).all(), f"tensor {i}"
    _, fb, nf = zip(*(spec_pema(p.cpu(), e0.cpu(), g.cpu(), f.cpu()) for p, e0, g, f in zip(params, before, grads, fishers)))
    assert counts.tolist() == [sum(fb), sum(nf)]
