"""The fused weight-gradient + per-sample Fisher kernel (ALGORITHM.md §2).

``mage_kernels.kernels.weight_grad.weight_grad_with_fisher`` (Triton: in the
interpreter on CPU tensors, or compiled on CUDA tensors -- the ``device`` fixture
of tests/conftest.py) is checked against ``reference.weight_grad_with_fisher``
evaluated in float64, and against a brute-force loop over samples that squares
each sample's gradient explicitly. ``torch.ops.mage.weight_grad_with_fisher`` is
checked for backend dispatch and with ``torch.library.opcheck``.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

import mage_kernels
from mage_kernels import reference
from mage_kernels import weight_grad_op
from mage_kernels.kernels import weight_grad as wg

REL_TOL = {torch.float32: 2e-6, torch.float16: 2e-3}
# The Fisher squares fp32 accumulations of exact fp16 x fp16 products, so it keeps
# fp32 accuracy even for fp16 inputs -- except that with non-binary token weights
# the weighted gradient g * w is rounded to the input dtype before the tl.dot
# (as the reference does in that dtype), ~5e-4 relative in fp16.
FISHER_REL_TOL = {torch.float32: 5e-6, torch.float16: 5e-6}
FISHER_REL_TOL_WEIGHTED_FP16 = 3e-3
DTYPES = [torch.float32, torch.float16]

# (num_samples, tokens per sample T, P, Q): ragged. T=1 is "one token per sample" (the GEMM of
# squares), T <= 64 one tile per sample, T = 70 the per-sample loop over token tiles.
SHAPES = [(5, 7, 13, 29), (3, 1, 8, 50), (37, 1, 5, 19), (1, 20, 24, 17), (4, 33, 3, 40), (2, 70, 9, 21)]


def assert_close_rel(out: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    assert out.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0, "the reference is all zeros: the test would prove nothing"
    err = (out.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} vs reference scale {scale:.3g}"


def brute_force(g, x, num_samples, scale, token_weight=None, fisher_scale=1.0):
    """Batch gradient and Fisher increment by an explicit float64 loop over samples."""
    g, x = g.double(), x.double()
    m = g.shape[0]
    t = m // num_samples
    if token_weight is None:
        w = torch.ones(m, dtype=torch.float64, device=g.device)
    else:
        w = token_weight.double().reshape(m)
    grad = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float64, device=g.device)
    fisher = torch.zeros_like(grad)
    for n in range(num_samples):
        rows = slice(n * t, (n + 1) * t)
        grad += scale * g[rows].t() @ x[rows]
        per_sample = fisher_scale * scale * (g[rows] * w[rows, None]).t() @ x[rows]
        fisher += per_sample**2
    return grad, fisher


def make_inputs(num_samples, t, p, q, dtype, padding: bool, device: torch.device):
    m = num_samples * t
    g = torch.randn(m, p, dtype=dtype, device=device)
    x = torch.randn(m, q, dtype=dtype, device=device)
    w: Optional[torch.Tensor] = None
    if padding:
        w = torch.rand(m, device=device) + 0.5
        if t > 1:
            w[t - 1 :: t] = 0.0  # the last token of every sample is padding
        else:
            w[1] = 0.0  # one-token samples: the second sample is all padding
    return g, x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,t,p,q", SHAPES)
@pytest.mark.parametrize("padding", [False, True])
def test_gradient_and_fisher_match_reference_and_brute_force(dtype, n, t, p, q, padding, device):
    g, x, w = make_inputs(n, t, p, q, dtype, padding, device)
    start = torch.rand(p, q, device=device)
    fisher = start.clone()
    grad = wg.weight_grad_with_fisher(g, x, n, 0.5, fisher, w, fisher_scale=3.0)
    assert grad.dtype == dtype

    ref_fisher = start.double().clone()
    ref_grad = reference.weight_grad_with_fisher(
        g.double(), x.double(), n, 0.5, ref_fisher, None if w is None else w.double(), 3.0
    )
    assert_close_rel(grad, ref_grad, REL_TOL[dtype])
    fisher_tol = FISHER_REL_TOL_WEIGHTED_FP16 if (padding and dtype == torch.float16) else FISHER_REL_TOL[dtype]
    assert_close_rel(fisher, ref_fisher, fisher_tol)

    bf_grad, bf_increment = brute_force(g, x, n, 0.5, w, 3.0)
    assert_close_rel(grad, bf_grad, REL_TOL[dtype])
    assert_close_rel(fisher - start, bf_increment, fisher_tol)


@pytest.mark.parametrize("t", [1, 6, 70], ids=["T1-squares", "T6-one-tile", "T70-loop"])
@pytest.mark.parametrize("padding", [False, True])
def test_in_kernel_dropout_of_x_matches_reference_with_the_regenerated_mask(t, padding, device):
    """``x`` is the adapters' input: with a seed the kernel uses drop(x) (mask made in the kernel);
    the reference gets the mask regenerated from the same seed."""
    from mage_kernels.kernels.dropout import dropout_mask

    n, p, q, drop = 4, 7, 45, 0.3
    g, x, w = make_inputs(n, t, p, q, torch.float32, padding, device)
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    fisher = torch.rand(p, q, device=device)
    start = fisher.clone()
    grad = wg.weight_grad_with_fisher(g, x, n, 0.5, fisher, w, 3.0, dropout_p=drop, seed=seed)
    keep = dropout_mask(x.shape[0], q, drop, seed)
    assert 0.5 < keep.double().mean().item() < 0.9
    x_drop = x.double() * keep.double() / (1 - drop)
    bf_grad, bf_fisher = brute_force(g, x_drop, n, 0.5, w, 3.0)
    assert_close_rel(grad, bf_grad, REL_TOL[torch.float32])
    assert_close_rel(fisher - start, bf_fisher, FISHER_REL_TOL[torch.float32])
    plain = wg.weight_grad_with_fisher(g, x, n, 0.5, dropout_p=drop, seed=seed)  # no Fisher: the plain kernel
    assert_close_rel(plain, bf_grad, REL_TOL[torch.float32])


@pytest.mark.parametrize("splits", [2, 5])
def test_one_token_samples_split_over_the_token_axis(splits, device):
    """T = 1: the GEMM of squares splits its token axis over programs; the sums are the same."""
    g, x, w = make_inputs(75, 1, 6, 33, torch.float32, True, device)
    fisher = torch.rand(6, 33, device=device)
    start = fisher.clone()
    grad = wg.weight_grad_with_fisher(g, x, 75, 0.8, fisher, w, 2.0, _splits=splits)
    bf_grad, bf_fisher = brute_force(g, x, 75, 0.8, w, 2.0)
    assert_close_rel(grad, bf_grad, 2e-6)
    assert_close_rel(fisher - start, bf_fisher, 5e-6)


def test_fisher_is_not_the_square_of_the_batch_gradient(device):
    g, x, _ = make_inputs(4, 5, 6, 7, torch.float32, False, device)
    fisher = torch.zeros(6, 7, device=device)
    grad = wg.weight_grad_with_fisher(g, x, 4, 1.0, fisher)
    assert (fisher - grad.pow(2)).abs().max() > 1e-2 * fisher.abs().max()


def test_padding_weights_do_not_change_the_batch_gradient(device):
    g, x, w = make_inputs(3, 6, 9, 11, torch.float32, True, device)
    fisher_a, fisher_b = torch.zeros(9, 11, device=device), torch.zeros(9, 11, device=device)
    grad_w = wg.weight_grad_with_fisher(g, x, 3, 1.0, fisher_a, w)
    grad = wg.weight_grad_with_fisher(g, x, 3, 1.0, fisher_b)
    torch.testing.assert_close(grad_w, grad, rtol=0, atol=0)
    assert (fisher_a - fisher_b).abs().max() > 1e-3 * fisher_b.abs().max()


def test_zero_weight_tokens_do_not_reach_the_fisher(device):
    """A padded token with garbage gradient contributes nothing: same Fisher as dropping it."""
    n, t, p, q = 3, 5, 7, 9
    g, x, _ = make_inputs(n, t, p, q, torch.float32, False, device)
    w = torch.ones(n * t, device=device)
    w[t - 1 :: t] = 0.0
    fisher = torch.zeros(p, q, device=device)
    wg.weight_grad_with_fisher(g, x, n, 1.0, fisher, w)
    keep = w.bool()
    g_kept, x_kept = g[keep], x[keep]
    expected = torch.zeros(p, q, device=device)
    wg.weight_grad_with_fisher(g_kept, x_kept, n, 1.0, expected)
    torch.testing.assert_close(fisher, expected, rtol=1e-5, atol=1e-6)


def test_micro_batches_accumulate(device):
    g1, x1, w1 = make_inputs(3, 4, 10, 12, torch.float32, True, device)
    g2, x2, w2 = make_inputs(2, 4, 10, 12, torch.float32, True, device)
    fisher = torch.zeros(10, 12, device=device)
    wg.weight_grad_with_fisher(g1, x1, 3, 0.7, fisher, w1, 2.0)
    wg.weight_grad_with_fisher(g2, x2, 2, 0.7, fisher, w2, 2.0)
    expected = brute_force(g1, x1, 3, 0.7, w1, 2.0)[1] + brute_force(g2, x2, 2, 0.7, w2, 2.0)[1]
    assert_close_rel(fisher, expected, 5e-6)


def test_strided_fisher_view_is_updated_in_place_and_nothing_else(device):
    p, q = 11, 4
    buffer = torch.rand(p, 13, device=device)
    before = buffer.clone()
    view = buffer[:, 4:8]  # the trainable columns of a bigger Fisher buffer (like fisher_b[:, run])
    assert not view.is_contiguous()
    g, x, _ = make_inputs(6, 3, p, q, torch.float32, False, device)
    wg.weight_grad_with_fisher(g, x, 6, 1.0, view)
    assert torch.equal(buffer[:, :4], before[:, :4])
    assert torch.equal(buffer[:, 8:], before[:, 8:])
    assert_close_rel(buffer[:, 4:8] - before[:, 4:8], brute_force(g, x, 6, 1.0)[1], 5e-6)


def test_non_contiguous_inputs(device):
    n, t = 4, 3
    g_full = torch.randn(n * t, 20, device=device)
    g = g_full[:, 3:11]  # a column slice, like g[:, start:stop] of the trainable rows
    x = torch.randn(17, n * t, device=device).t()
    fisher = torch.zeros(8, 17, device=device)
    grad = wg.weight_grad_with_fisher(g, x, n, 1.3, fisher)
    bf_grad, bf_fisher = brute_force(g, x, n, 1.3)
    assert_close_rel(grad, bf_grad, 2e-6)
    assert_close_rel(fisher, bf_fisher, 5e-6)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("with_fisher", [False, True])
def test_split_over_samples_matches_single_pass(splits, with_fisher, device):
    """The GPU path splits the samples over a second grid axis when few tiles exist."""
    g, x, w = make_inputs(7, 5, 9, 21, torch.float32, True, device)
    fisher = torch.rand(9, 21, device=device) if with_fisher else None
    start = None if fisher is None else fisher.clone()
    grad = wg.weight_grad_with_fisher(g, x, 7, 0.9, fisher, w, 1.5, _splits=splits)
    bf_grad, bf_fisher = brute_force(g, x, 7, 0.9, w, 1.5)
    assert_close_rel(grad, bf_grad, 2e-6)
    if with_fisher:
        assert_close_rel(fisher - start, bf_fisher, 5e-6)


def test_without_fisher_is_the_plain_batch_gradient_over_many_chunks(device):
    # 301 tokens span several token chunks
    g, x = torch.randn(301, 19, device=device), torch.randn(301, 23, device=device)
    grad = wg.weight_grad_with_fisher(g, x, 1, 0.25)
    assert_close_rel(grad, 0.25 * g.double().t() @ x.double(), 2e-6)


def test_empty_batch_leaves_fisher_untouched(device):
    fisher = torch.rand(5, 6, device=device)
    before = fisher.clone()
    g, x = torch.randn(0, 5, device=device), torch.randn(0, 6, device=device)
    grad = wg.weight_grad_with_fisher(g, x, 0, 1.0, fisher)
    assert torch.equal(grad, torch.zeros(5, 6, device=device))
    assert torch.equal(fisher, before)


def test_bad_input_is_rejected(device):
    g, x = torch.randn(10, 4, device=device), torch.randn(10, 6, device=device)
    with pytest.raises(ValueError, match="do not split into 3 samples"):
        wg.weight_grad_with_fisher(g, x, 3, 1.0, torch.zeros(4, 6, device=device))
    with pytest.raises(TypeError, match="float32"):
        wg.weight_grad_with_fisher(g, x, 2, 1.0, torch.zeros(4, 6, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"fisher must be \[4, 6\]"):
        wg.weight_grad_with_fisher(g, x, 2, 1.0, torch.zeros(6, 4, device=device))
    with pytest.raises(ValueError, match="token_weight has 9 entries"):
        wg.weight_grad_with_fisher(g, x, 2, 1.0, torch.zeros(4, 6, device=device), torch.ones(9, device=device))
    with pytest.raises(ValueError, match="g has 10 tokens but x has 9"):
        wg.weight_grad_with_fisher(g, x[:9], 1, 1.0)
    with pytest.raises(TypeError, match="float64"):
        wg.weight_grad_with_fisher(g.double(), x.double(), 2, 1.0)


# ----------------------------------------------------------------------------- the torch op


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_dispatches_to_the_selected_backend(backend, device):
    g, x, w = make_inputs(4, 3, 6, 10, torch.float32, True, device)
    fisher = torch.zeros(6, 10, device=device)
    with mage_kernels.use_backend(backend):
        grad = weight_grad_op.weight_grad_with_fisher_op(g, x, 4, 0.5, fisher, w, 2.0)
    bf_grad, bf_fisher = brute_force(g, x, 4, 0.5, w, 2.0)
    assert_close_rel(grad, bf_grad, 2e-6)
    assert_close_rel(fisher, bf_fisher, 5e-6)


def test_op_schema_is_the_documented_one():
    schema = str(torch.ops.mage.weight_grad_with_fisher.default._schema)
    assert schema == "mage::weight_grad_with_fisher" + weight_grad_op.OP_SCHEMA


def test_opcheck_with_torch_backend():
    with mage_kernels.use_backend("torch"):
        g, x, w = make_inputs(3, 4, 5, 6, torch.float32, True, torch.device("cpu"))
        torch.library.opcheck(torch.ops.mage.weight_grad_with_fisher.default, (g, x, 3, 0.5, torch.zeros(5, 6), w, 2.0))
        torch.library.opcheck(torch.ops.mage.weight_grad_with_fisher.default, (g, x, 3, 0.5, None, None, 1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_large_against_reference(dtype, gpu_device):
    n, t, p, q = 16, 128, 24, 1000
    g = torch.randn(n * t, p, device=gpu_device, dtype=dtype)
    x = torch.randn(n * t, q, device=gpu_device, dtype=dtype)
    fisher = torch.zeros(p, q, device=gpu_device)
    grad = wg.weight_grad_with_fisher(g, x, n, 1.0, fisher)
    ref_fisher = torch.zeros(p, q, device=gpu_device, dtype=torch.float64)
    ref_grad = reference.weight_grad_with_fisher(g.double(), x.double(), n, 1.0, ref_fisher)
    assert (grad.double() - ref_grad).abs().max() <= 1e-2 * ref_grad.abs().max()
    assert (fisher.double() - ref_fisher).abs().max() <= 1e-4 * ref_fisher.abs().max()


@pytest.mark.parametrize("with_fisher", [False, True])
def test_gpu_tile_sizes_in_the_interpreter(monkeypatch, with_fisher, interpreter_only):
    """The block sizes the GPU path picks (bigger than the interpreter's) are correct too."""
    monkeypatch.setattr(wg, "triton_interpreter", lambda: False)
    g, x, w = make_inputs(3, 41, 37, 150, torch.float32, True, torch.device("cpu"))
    fisher = torch.zeros(37, 150) if with_fisher else None
    grad = wg.weight_grad_with_fisher(g, x, 3, 0.5, fisher, w if with_fisher else None)
    bf_grad, bf_fisher = brute_force(g, x, 3, 0.5, w)
    assert_close_rel(grad, bf_grad, 2e-6)
    if with_fisher:
        assert_close_rel(fisher, bf_fisher, 5e-6)
