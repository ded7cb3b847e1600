"""The CUDA C++ backend (``mage_kernels._C``, ops ``torch.ops.mage_cuda.*``) on a GPU.

Skipped without a CUDA device or without the built extension (set
``MAGE_REQUIRE_CUDA_EXTENSION=1`` to turn that skip into a failure, as
``bench/gpu_check.sh`` does). Each op is compared with the plain-PyTorch
reference (float64 where accumulation order matters) and with the Triton
kernel, for fp32/fp16/bf16, ragged sizes, misaligned and strided tensors and
NaN/inf inputs; the schemas must equal the Python ops'.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import pytest
import torch

import mage_kernels
from mage_kernels import cuda_extension, reference
from mage_kernels.backends import triton_interpreter

_REQUIRE = os.environ.get("MAGE_REQUIRE_CUDA_EXTENSION", "0") not in ("", "0")
_REASON: Optional[str] = None
if not torch.cuda.is_available():
    _REASON = "no CUDA device"
elif cuda_extension.load() is None:
    _REASON = "the CUDA extension is not built: " + cuda_extension.why_unavailable()
needs_extension = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"
needs_compiled_triton = pytest.mark.skipif(
    triton_interpreter(), reason="TRITON_INTERPRET=1: compare with compiled Triton only (export TRITON_INTERPRET=0)"
)


def test_extension_available_when_required():
    """With MAGE_REQUIRE_CUDA_EXTENSION=1 (bench/gpu_check.sh) a missing GPU or extension fails instead of skipping."""
    if _REASON is not None:
        if _REQUIRE:
            pytest.fail(f"MAGE_REQUIRE_CUDA_EXTENSION=1 but {_REASON}")
        pytest.skip(_REASON)
    assert cuda_extension.load() is not None


@needs_extension
def test_schemas_equal_the_python_ops():
    assert cuda_extension.op_names() == sorted(cuda_extension.OPS)
    assert cuda_extension.schema_mismatches() == []


# ----------------------------------------------------------------------------- PEMA

SIZES = [1, 3, 17, 1000, 0, 16384, 16385, 70001]


def _pema_inputs(dtypes: Tuple[torch.dtype, torch.dtype, torch.dtype, torch.dtype], misalign: bool):
    """Random groups of ragged sizes; some elements hit the fallback, some are NaN/inf."""
    pd, ed, gd, fd = dtypes
    params, emas, grads, fishers = [], [], [], []
    for i, n in enumerate(SIZES):
        theta = torch.randn(n, device=DEV)
        ema = theta + 0.5 * torch.randn(n, device=DEV)
        grad = 0.5 * torch.randn(n, device=DEV)
        fisher = 50 * torch.rand(n, device=DEV)
        r = torch.rand(n, device=DEV)
        grad[r < 0.01] = float("nan")
        theta[(r >= 0.01) & (r < 0.02)] = float("inf")
        ema[(r >= 0.02) & (r < 0.03)] = theta[(r >= 0.02) & (r < 0.03)]  # theta == theta*
        shape = (n,) if i % 2 else (n, 1)
        out = []
        for t, dt in ((theta, pd), (ema, ed), (grad, gd), (fisher, fd)):
            t = t.reshape(shape).to(dt)
            if misalign and i % 3 == 1:  # contiguous but 1 element off the vector alignment
                buf = torch.empty(t.numel() + 1, dtype=dt, device=DEV)
                buf[1:].copy_(t.reshape(-1))
                t = buf[1:].view(shape)
            out.append(t)
        params.append(out[0]), emas.append(out[1]), grads.append(out[2]), fishers.append(out[3])
    return params, emas, grads, fishers


DTYPE_COMBOS = [
    (torch.float32,) * 4,
    (torch.float16, torch.float16, torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),  # fp32 EMA of bf16 weights
    (torch.float16, torch.bfloat16, torch.float32, torch.float16),
]


def _ulp_tolerance(dtype: torch.dtype) -> dict:
    # One unit in the last place of the storage type: the kernel and the reference
    # use the same fp32 operations, so only a rounding-boundary tie could differ.
    return {torch.float32: dict(rtol=2.4e-7, atol=1e-30), torch.float16: dict(rtol=1e-3, atol=6e-8),
            torch.bfloat16: dict(rtol=8e-3, atol=1e-38)}[dtype]


@needs_extension
@pytest.mark.parametrize("dtypes", DTYPE_COMBOS, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@pytest.mark.parametrize("misalign", [False, True], ids=["aligned", "misaligned"])
def test_pema_matches_reference(dtypes, misalign):
    params, emas, grads, fishers = _pema_inputs(dtypes, misalign)
    ref_emas = [e.clone() for e in emas]
    with torch.no_grad():
        counts = torch.ops.mage_cuda.pema_update_(params, emas, grads, fishers, 1e-5, 0.99)
        ref_counts = reference.pema_update_(params, ref_emas, grads, fishers, 1e-5, 0.99)
    assert counts.device.type == torch.device(DEV).type and counts.dtype == torch.int64
    assert counts.tolist() == ref_counts.tolist()
    fallback, nonfinite = counts.tolist()
    total = sum(SIZES)
    assert 0.2 * total < fallback < 0.8 * total and 0 < nonfinite < 0.05 * total, "the data must exercise both counters"
    for e, r in zip(emas, ref_emas):
        torch.testing.assert_close(e, r, equal_nan=True, **_ulp_tolerance(e.dtype))


@needs_extension
def test_pema_float64_formula():
    """Against a float64 evaluation of the ALGORITHM.md formula (fp32 inputs; fallback elements excluded at ties)."""
    n = 50_000
    theta = torch.randn(n, device=DEV)
    ema = theta + 0.3 * torch.randn(n, device=DEV)
    grad = torch.randn(n, device=DEV)
    fisher = 30 * torch.rand(n, device=DEV)
    out = ema.clone()
    with torch.no_grad():
        torch.ops.mage_cuda.pema_update_([theta], [out], [grad], [fisher], 1e-5, 0.99)
    t, e, g, f = (v.double() for v in (theta, ema, grad, fisher))
    beta = (g + 1) / (f * (t - e) + 1e-5)
    ok = (beta > 0) & (beta < 1)
    beta = torch.where(ok, beta, torch.full_like(beta, 0.99))
    want = beta * e + (1 - beta) * t
    assert 0.05 < ok.double().mean() < 0.95
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@needs_extension
@needs_compiled_triton
@pytest.mark.parametrize("dtypes", DTYPE_COMBOS[:3], ids=["fp32", "fp16", "bf16"])
def test_pema_matches_triton(dtypes):
    from mage_kernels.kernels import pema as triton_pema

    params, emas, grads, fishers = _pema_inputs(dtypes, misalign=False)
    tri_emas = [e.clone() for e in emas]
    with torch.no_grad():
        counts = torch.ops.mage_cuda.pema_update_(params, emas, grads, fishers, 1e-5, 0.99)
        tri_counts = triton_pema.pema_update_(params, tri_emas, grads, fishers, 1e-5, 0.99)
    assert counts.tolist() == tri_counts.tolist()
    for e, r in zip(emas, tri_emas):
        torch.testing.assert_close(e, r, equal_nan=True, **_ulp_tolerance(e.dtype))


@needs_extension
def test_pema_backend_cuda_dispatches_to_the_extension():
    params, emas, grads, fishers = _pema_inputs((torch.float32,) * 4, misalign=False)
    ref_emas = [e.clone() for e in emas]
    with mage_kernels.use_backend("cuda"):
        assert mage_kernels.resolve_backend(torch.device(DEV), "pema_update_") == "cuda"
        counts = mage_kernels.pema_update_(params, emas, grads, fishers)
    with mage_kernels.use_backend("torch"):
        ref_counts = mage_kernels.pema_update_(params, ref_emas, grads, fishers)
    assert counts.tolist() == ref_counts.tolist()
    for e, r in zip(emas, ref_emas):
        torch.testing.assert_close(e, r, equal_nan=True, **_ulp_tolerance(e.dtype))


@needs_extension
def test_pema_non_contiguous_inputs_and_bad_arguments():
    theta = torch.randn(64, 48, device=DEV)
    ema = theta + torch.randn_like(theta)
    grad = torch.randn(48, 64, device=DEV).t()  # non-contiguous: copied by the binding
    fisher = torch.rand(64, 96, device=DEV)[:, ::2]
    ref = ema.clone()
    with torch.no_grad():
        counts = torch.ops.mage_cuda.pema_update_([theta], [ema], [grad], [fisher], 1e-5, 0.99)
        ref_counts = reference.pema_update_([theta], [ref], [grad], [fisher], 1e-5, 0.99)
    assert counts.tolist() == ref_counts.tolist()
    torch.testing.assert_close(ema, ref, **_ulp_tolerance(torch.float32))

    op = torch.ops.mage_cuda.pema_update_
    e = torch.zeros(8, device=DEV)
    with pytest.raises(RuntimeError, match="same length"):
        op([e], [e], [e, e], [e], 1e-5, 0.99)
    with pytest.raises(RuntimeError, match="has dtype Double"):
        op([e.double()], [e], [e], [e], 1e-5, 0.99)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[9\]"):
        op([e], [e], [torch.zeros(9, device=DEV)], [e], 1e-5, 0.99)
    with pytest.raises(RuntimeError, match=r"fishers\[0\] is on cpu"):
        op([e], [e], [e], [torch.zeros(8)], 1e-5, 0.99)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op([e], [torch.zeros(16, device=DEV)[::2]], [e], [e], 1e-5, 0.99)


# ----------------------------------------------------------------------------- weight gradient + Fisher

# (num_samples, tokens per sample, P, Q, with Fisher, with token weights)
WG_CASES = [
    (3, 37, 8, 300, True, False),    # dA of one rank-8 adapter: P small
    (64, 5, 13, 70, True, True),     # many short samples: split over samples (atomics)
    (4, 33, 200, 12, True, True),    # dB: Q small
    (1, 17, 65, 130, True, False),   # one sample
    (2, 129, 70, 90, False, False),  # no Fisher: split over tokens
    (5, 0, 9, 11, True, False),      # zero tokens: zero gradient, Fisher unchanged
]


def _wg_inputs(n, t, p, q, dtype, strided: bool):
    m = n * t
    if strided:  # column slices like lora_op's g[:, start:stop], and a transposed x
        g = torch.randn(m, p + 7, device=DEV, dtype=dtype)[:, 3:3 + p]
        x = torch.randn(q, m, device=DEV, dtype=dtype).t()
    else:
        g = torch.randn(m, p, device=DEV, dtype=dtype)
        x = torch.randn(m, q, device=DEV, dtype=dtype)
    return g, x


def _fisher_buffer(p, q, layout: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(view passed to the op, whole storage) for a contiguous, column-sliced or transposed buffer."""
    if layout == "contiguous":
        big = torch.rand(p, q, device=DEV)
        return big, big
    if layout == "sliced":
        big = torch.rand(p, q + 5, device=DEV)
        return big[:, 2:2 + q], big
    big = torch.rand(q, p, device=DEV)
    return big.t(), big


def _tolerance(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", WG_CASES, ids=lambda c: "N{}xT{}_P{}_Q{}_f{}_w{}".format(*map(int, c)))
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_weight_grad_with_fisher_matches_float64_reference(dtype, case, layout):
    n, t, p, q, with_fisher, weighted = case
    g, x = _wg_inputs(n, t, p, q, dtype, strided=layout != "contiguous")
    fisher, storage = _fisher_buffer(p, q, layout) if with_fisher else (None, None)
    before = None if storage is None else storage.clone()
    weight = None
    if weighted:
        weight = torch.rand(n, t, device=DEV) + 0.5
        weight[:, t - t // 3:] = 0  # padding
    scale, fisher_scale = 0.7, 2.0 if weighted else 1.0

    grad = torch.ops.mage_cuda.weight_grad_with_fisher(g, x, n, scale, fisher, weight, fisher_scale)

    ref_fisher = None if before is None else before.double()
    ref_view = None if fisher is None else _same_view(ref_fisher, fisher, storage)
    if n * t:
        want = reference.weight_grad_with_fisher(g.double(), x.double(), n, scale, ref_view,
                                                 None if weight is None else weight.double(), fisher_scale)
    else:  # no tokens (the reference cannot reshape an empty batch): zero gradient, Fisher unchanged
        want = torch.zeros(p, q, dtype=torch.float64, device=DEV)
    assert grad.dtype == dtype and grad.shape == (p, q) and grad.is_contiguous()
    tol = _tolerance(dtype)
    torch.testing.assert_close(grad.double(), want, rtol=tol, atol=tol * (1 + want.abs().max().item()))
    if fisher is not None:
        # Only the view's elements change, by the float64 per-sample sum of squares.
        torch.testing.assert_close(storage.double(), ref_fisher, rtol=1e-4, atol=1e-5 * (1 + ref_fisher.abs().max().item()))
        if t > 0:
            assert not torch.equal(storage, before)


def _same_view(base64: torch.Tensor, view: torch.Tensor, storage: torch.Tensor) -> torch.Tensor:
    """The view of ``base64`` (a float64 copy of ``storage``) with ``view``'s offset and strides."""
    return base64.as_strided(view.shape, view.stride(), view.storage_offset() - storage.storage_offset())


@needs_extension
def test_weight_grad_accumulates_over_micro_batches():
    n, t, p, q = 6, 9, 16, 40
    fisher = torch.zeros(p, q, device=DEV)
    want = torch.zeros(p, q, dtype=torch.float64, device=DEV)
    for _ in range(3):
        g, x = _wg_inputs(n, t, p, q, torch.float32, strided=False)
        torch.ops.mage_cuda.weight_grad_with_fisher(g, x, n, 1.0, fisher, None, 1.0)
        reference.weight_grad_with_fisher(g.double(), x.double(), n, 1.0, want, None, 1.0)
    torch.testing.assert_close(fisher.double(), want, rtol=1e-5, atol=1e-6)


@needs_extension
def test_weight_grad_nan_propagates_like_the_reference():
    g, x = _wg_inputs(2, 8, 8, 20, torch.float32, strided=False)
    g[3, 2] = float("nan")
    fisher = torch.zeros(8, 20, device=DEV)
    grad = torch.ops.mage_cuda.weight_grad_with_fisher(g, x, 2, 1.0, fisher, None, 1.0)
    ref_f = torch.zeros(8, 20, device=DEV)
    ref = reference.weight_grad_with_fisher(g, x, 2, 1.0, ref_f, None, 1.0)
    assert torch.equal(grad.isnan(), ref.isnan()) and grad[2].isnan().all() and not grad[3].isnan().any()
    assert torch.equal(fisher.isnan(), ref_f.isnan())


@needs_extension
@needs_compiled_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_weight_grad_matches_triton(dtype):
    from mage_kernels.kernels import weight_grad as triton_wg

    n, t, p, q = 8, 24, 16, 96
    g, x = _wg_inputs(n, t, p, q, dtype, strided=True)
    w = (torch.rand(n, t, device=DEV) > 0.2).float()
    f_cuda = torch.rand(p, q, device=DEV)
    f_tri = f_cuda.clone()
    grad = torch.ops.mage_cuda.weight_grad_with_fisher(g, x, n, 0.5, f_cuda, w, 3.0)
    grad_tri = triton_wg.weight_grad_with_fisher(g, x, n, 0.5, f_tri, w, 3.0)
    tol = _tolerance(dtype)
    torch.testing.assert_close(grad.float(), grad_tri.float(), rtol=tol, atol=tol * (1 + grad_tri.abs().max().item()))
    torch.testing.assert_close(f_cuda, f_tri, rtol=max(tol, 1e-4), atol=1e-4 * (1 + f_tri.abs().max().item()))


@needs_extension
def test_weight_grad_bad_arguments():
    op = torch.ops.mage_cuda.weight_grad_with_fisher
    g = torch.randn(12, 4, device=DEV)
    x = torch.randn(12, 6, device=DEV)
    with pytest.raises(RuntimeError, match="12 tokens do not split into 5 samples"):
        op(g, x, 5, 1.0, torch.zeros(4, 6, device=DEV), None, 1.0)
    with pytest.raises(RuntimeError, match="Fisher buffer must be float32"):
        op(g, x, 3, 1.0, torch.zeros(4, 6, device=DEV, dtype=torch.float16), None, 1.0)
    with pytest.raises(RuntimeError, match=r"fisher must be \[4, 6\]"):
        op(g, x, 3, 1.0, torch.zeros(6, 4, device=DEV), None, 1.0)
    with pytest.raises(RuntimeError, match="overlapping"):
        op(g, x, 3, 1.0, torch.zeros(1, 6, device=DEV).expand(4, 6), None, 1.0)
    with pytest.raises(RuntimeError, match="g is Float but x is Half"):
        op(g, x.half(), 3, 1.0, None, None, 1.0)
    with pytest.raises(RuntimeError, match="has dtype Double"):
        op(g.double(), x.double(), 3, 1.0, None, None, 1.0)
    with pytest.raises(RuntimeError, match="g has 12 tokens but x has 11"):
        op(g, x[:11], 3, 1.0, None, None, 1.0)
    with pytest.raises(RuntimeError, match="token_weight has 5 entries for 12 tokens"):
        op(g, x, 3, 1.0, torch.zeros(4, 6, device=DEV), torch.ones(5, device=DEV), 1.0)
    with pytest.raises(RuntimeError, match="x is on cpu"):
        op(g, x.cpu(), 3, 1.0, None, None, 1.0)


def _lora_grads(backend: str, x, weight, lora_a, lora_b, rows: List[int], token_weight):
    a = lora_a.clone().requires_grad_(True)
    b = lora_b.clone().requires_grad_(True)
    fa = torch.zeros(lora_a.shape, device=DEV)
    fb = torch.zeros(lora_b.shape, device=DEV)
    with mage_kernels.use_backend(backend):
        y = mage_kernels.lora_linear(x, weight, None, a, b, 0.5, trainable_rows=rows, fisher_a=fa, fisher_b=fb,
                                     token_weight=token_weight, fisher_scale=float(x.shape[0]))
        y.square().mean().backward()
    return a.grad, b.grad, fa, fb


@needs_extension
def test_lora_linear_backward_with_cuda_backend():
    """The LoRA op's backward on backend "cuda" (CUDA weight-gradient kernel) equals backend "torch"."""
    n, t, k, out, r = 4, 10, 48, 40, 32
    x = torch.randn(n, t, k, device=DEV)
    weight = torch.randn(out, k, device=DEV) / k**0.5
    lora_a = torch.randn(r, k, device=DEV) / k**0.5
    lora_b = torch.randn(out, r, device=DEV)
    rows = list(range(8, 24))  # two of four rank-8 adapters trainable
    tw = torch.ones(n, t, device=DEV)
    tw[:, -3:] = 0
    got = _lora_grads("cuda", x, weight, lora_a, lora_b, rows, tw)
    want = _lora_grads("torch", x, weight, lora_a, lora_b, rows, tw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))
    assert got[2][8:24].abs().sum() > 0 and got[2][:8].abs().sum() == 0
