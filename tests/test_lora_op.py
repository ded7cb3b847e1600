"""The full ``mage::lora_linear`` op and ``MageLinear`` on its three paths.

Paths (``mage_kernels.lora_linear_path``): ``cublas`` (the CUDA default: torch.mm /
addmm GEMMs accumulating into one output, Triton only for the dropout mask and the
Fisher), ``triton`` (explicit backend: the concatenated-K Triton GEMM) and ``torch``
(the reference). On CPU the ``cublas`` path is forced with ``lora_op.use_path`` and its
Triton kernels run in the interpreter.

Everything is compared with autograd of ``reference.lora_linear`` evaluated in
float64 (ALGORITHM.md §1): y, dx, dA_k, dB_k for every trainable-adapter mask of
the table, all-trainable and none-trainable, with and without a separate
adapter input, in-kernel dropout (the reference uses the regenerated mask of the
call's seed) and a bias. Frozen adapters must get no gradient at all. The
Fisher buffers the op fills in its backward are compared with per-sample
gradients from ``torch.func.vmap(torch.func.grad(...))`` (ALGORITHM.md §2).
All paths run on the ``device`` fixture (tests/conftest.py): CPU tensors and
Triton's interpreter, or CUDA tensors and the compiled Triton kernels on a GPU
machine (the float64 references then run on the GPU too).
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional, Sequence

import pytest
import torch

import mage_kernels
from mage_kernels import MageLinear, reference
from mage_kernels import lora_op
from mage_kernels.lora_op import lora_linear

BACKENDS = ["cublas", "triton", "torch"]  # paths of mage::lora_linear (see on_path)


@contextlib.contextmanager
def on_path(name: str):
    """Run the enclosed calls on one path: ``triton``/``torch`` are backends, ``cublas`` is forced."""
    if name == "cublas":
        with lora_op.use_path("cublas"):
            yield
    else:
        with mage_kernels.use_backend(name):
            yield

# ALGORITHM.md §1's table, then all and none.
MASKS = [(0, 1, 2), (0, 3), (0, 1, 3), (0, 1, 2, 3), ()]
REL_TOL = 2e-5  # fp32 op vs float64 reference, relative to the largest reference entry

# Ragged sizes: 3 samples x 5 tokens, d_in 50, d_out 29, rank 3 per adapter.
NUM_SAMPLES, TOKENS, D_IN, D_OUT, RANK, NUM_ADAPTERS = 3, 5, 50, 29, 3, 4
SCALING = 1.5
DROP_P = 0.25


def assert_close_rel(out: torch.Tensor, expected: torch.Tensor, rel: float = REL_TOL) -> None:
    assert out.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0, "the reference is all zeros: the test would prove nothing"
    err = (out.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} vs reference scale {scale:.3g}"


def rows_of(adapters: Sequence[int], r: int = RANK) -> List[int]:
    return [k * r + i for k in adapters for i in range(r)]


class Problem:
    """Fresh random weights of one layer: W0, bias, four A_k, four B_k (B_k random, not zero)."""

    def __init__(self, with_bias: bool, device: torch.device, dtype=torch.float32):
        kw = dict(dtype=dtype, device=device)
        self.weight = torch.randn(D_OUT, D_IN, **kw) / D_IN**0.5
        self.bias = torch.randn(D_OUT, **kw) if with_bias else None
        self.a = [torch.randn(RANK, D_IN, **kw) / D_IN**0.5 for _ in range(NUM_ADAPTERS)]
        self.b = [torch.randn(D_OUT, RANK, **kw) / RANK**0.5 for _ in range(NUM_ADAPTERS)]
        self.x = torch.randn(NUM_SAMPLES, TOKENS, D_IN, **kw)
        self.grad_y = torch.randn(NUM_SAMPLES, TOKENS, D_OUT, **kw)
        self.keep = (torch.rand(NUM_SAMPLES, TOKENS, D_IN, device=device) > DROP_P).to(dtype) / (1 - DROP_P)
        self.seed = lora_op.new_dropout_seed(device)

    def seeded_keep(self, path: str) -> torch.Tensor:
        """float64 keep / (1 - p) of the in-kernel mask this path draws for self.seed."""
        keep = mage_kernels.dropout_mask(self.x.shape, DROP_P, self.seed, path="torch" if path == "torch" else path)
        return keep.double() / (1 - DROP_P)

    def reference_grads(self, dropout: bool, keep: Optional[torch.Tensor] = None) -> Dict[str, object]:
        """y and gradients of every input by autograd of the float64 reference (``keep``: a seeded mask)."""
        x = self.x.double().requires_grad_()
        a = [t.double().requires_grad_() for t in self.a]
        b = [t.double().requires_grad_() for t in self.b]
        x_lora = x * self.keep.double() if dropout else None
        if keep is not None:
            x_lora = x * keep
        y = reference.lora_linear(
            x, self.weight.double(), None if self.bias is None else self.bias.double(),
            torch.cat(a, 0), torch.cat(b, 1), SCALING, x_lora,
        )
        y.backward(self.grad_y.double())
        return {"y": y.detach(), "dx": x.grad, "da": [t.grad for t in a], "db": [t.grad for t in b]}

    def run_op(self, trainable: Sequence[int], dropout: bool, seeded: bool = False, **fisher) -> Dict[str, object]:
        x = self.x.clone().requires_grad_()
        a = [t.clone().requires_grad_(k in trainable) for k, t in enumerate(self.a)]
        b = [t.clone().requires_grad_(k in trainable) for k, t in enumerate(self.b)]
        x_lora = x * self.keep if dropout else None
        drop = dict(dropout_p=DROP_P, dropout_seed=self.seed) if seeded else {}
        y = lora_linear(
            x, self.weight, self.bias, torch.cat(a, 0), torch.cat(b, 1), SCALING,
            x_lora=x_lora, trainable_rows=rows_of(trainable), **drop, **fisher,
        )
        y.backward(self.grad_y)
        return {"y": y.detach(), "dx": x.grad, "da": [t.grad for t in a], "db": [t.grad for t in b]}


def check_against_reference(got, expected, trainable) -> None:
    assert_close_rel(got["y"], expected["y"])
    assert_close_rel(got["dx"], expected["dx"])
    for k in range(NUM_ADAPTERS):
        if k in trainable:
            assert_close_rel(got["da"][k], expected["da"][k])
            assert_close_rel(got["db"][k], expected["db"][k])
        else:
            assert got["da"][k] is None and got["db"][k] is None, f"frozen adapter {k} received a gradient"


# ----------------------------------------------------------------------------- the op, every mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", MASKS, ids=lambda m: "adapters" + "".join(map(str, m)) if m else "frozen")
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_op_matches_float64_reference(backend, trainable, dropout, with_bias, device):
    problem = Problem(with_bias, device)
    with on_path(backend):
        got = problem.run_op(trainable, dropout)
    check_against_reference(got, problem.reference_grads(dropout), trainable)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", MASKS, ids=lambda m: "adapters" + "".join(map(str, m)) if m else "frozen")
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_in_kernel_dropout_matches_float64_reference_with_the_regenerated_mask(backend, trainable, with_bias,
                                                                                 device):
    """Dropout from a seed (mask made in the kernels, regenerated in the backward): y, dx, dA, dB equal
    the float64 reference applied with the same mask, regenerated from the seed."""
    problem = Problem(with_bias, device)
    with on_path(backend):
        got = problem.run_op(trainable, dropout=False, seeded=True)
        keep = problem.seeded_keep(backend)
    frac = float((keep != 0).double().mean())
    assert 0.5 < frac < 0.95, f"kept fraction {frac} for p={DROP_P}"  # the mask really drops something
    check_against_reference(got, problem.reference_grads(False, keep=keep), trainable)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_dropout_with_fisher_and_a_separate_adapter_input(backend, device):
    """Seeded dropout on top of x_lora, with the Fisher: the Fisher squares per-sample gradients of drop(x_lora)."""
    problem = Problem(True, device)
    trainable = (0, 1, 3)
    fisher_a = torch.zeros(NUM_ADAPTERS * RANK, D_IN, device=device)
    fisher_b = torch.zeros(D_OUT, NUM_ADAPTERS * RANK, device=device)
    with on_path(backend):
        got = problem.run_op(trainable, dropout=True, seeded=True, fisher_a=fisher_a, fisher_b=fisher_b)
        keep = problem.seeded_keep(backend)
    x = problem.x.double().requires_grad_()
    a = [t.double().requires_grad_() for t in problem.a]
    b = [t.double().requires_grad_() for t in problem.b]
    y = reference.lora_linear(x, problem.weight.double(), problem.bias.double(), torch.cat(a, 0), torch.cat(b, 1),
                              SCALING, x * problem.keep.double() * keep)
    y.backward(problem.grad_y.double())
    assert_close_rel(got["y"], y.detach())
    assert_close_rel(got["dx"], x.grad)
    for k in trainable:
        assert_close_rel(got["da"][k], a[k].grad)
        assert_close_rel(got["db"][k], b[k].grad)
    saved_keep = problem.keep
    problem.keep = saved_keep * keep.to(saved_keep.dtype)  # the adapters' input: drop(x * keep0)
    exp_a, exp_b = per_sample_fisher_by_vmap(problem, True, None)
    problem.keep = saved_keep
    rows = rows_of(trainable)
    assert_close_rel(fisher_a[rows], exp_a[rows])
    assert_close_rel(fisher_b[:, rows], exp_b[:, rows])


@pytest.mark.parametrize("path", ["cublas", "triton"])
def test_in_kernel_dropout_keeps_one_minus_p_and_scales_by_its_inverse(path, device):
    """The Philox mask: kept fraction 1 - p (within 5 sigma), kept entries scaled by exactly 1 / (1 - p),
    the same mask for the same seed, a different one for another seed."""
    p, m, k = 0.3, 96, 160
    x = torch.rand(m, k, device=device) + 0.5  # no zeros: a zero output means dropped
    eye_a = torch.eye(k, device=device)
    seed = lora_op.new_dropout_seed(device)
    with on_path(path):
        u = lora_linear(x, None, None, eye_a, torch.eye(k, device=device), 1.0, dropout_p=p, dropout_seed=seed)
        keep = mage_kernels.dropout_mask((m, k), p, seed)
        other = mage_kernels.dropout_mask((m, k), p, lora_op.new_dropout_seed(device))
    kept = u != 0
    assert torch.equal(kept, keep), "the forward's mask differs from the regenerated one"
    frac = kept.double().mean().item()
    sigma = (p * (1 - p) / (m * k)) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    torch.testing.assert_close(u[kept], x[kept] / (1 - p), rtol=2e-6, atol=0)
    assert not torch.equal(keep, other)
    assert 0.25 < (keep != other).double().mean().item() < 0.6  # independent masks differ in ~2p(1-p)


def test_torch_backend_dropout_mask_is_reproducible_from_the_seed():
    p = 0.2
    seed = lora_op.new_dropout_seed(torch.device("cpu"))
    a = mage_kernels.dropout_mask((40, 33), p, seed, path="torch")
    b = mage_kernels.dropout_mask((40, 33), p, seed, path="torch")
    assert torch.equal(a, b) and 0.7 < a.double().mean().item() < 0.9


_CASES = {  # name -> (rows of lora_a trained, tokens per sample, x requires grad, base weight, token weights)
    "all_rows": (None, 5, True, True, False),
    "row_subset": ([0, 1, 6, 7], 5, True, True, True),
    "no_rows": ([], 5, True, True, False),
    "frozen_input": (None, 5, False, True, True),
    "adapters_only": ([2, 3, 4], 5, True, False, False),
    "empty_batch": (None, 0, True, True, False),
}


def _torch_path_step(fn, separate: bool, fisher: bool, case: str):
    """y, the input gradients, dA, dB and the Fisher of one dropout step of ``fn`` on the torch path."""
    rows, t, x_grad, with_weight, with_tw = _CASES[case]
    g = torch.Generator().manual_seed(7)
    n, k, o, r = 3, 12, 10, 8
    x = torch.randn(n, t, k, generator=g, requires_grad=x_grad)
    xl = torch.randn(n, t, k, generator=g, requires_grad=True) if separate else None
    w = torch.randn(o, k, generator=g) if with_weight else None
    a = torch.randn(r, k, generator=g, requires_grad=True)
    b = torch.randn(o, r, generator=g, requires_grad=True)
    fa, fb, fc = (torch.zeros(r, k), torch.zeros(o, r), torch.zeros(1, dtype=torch.int64)) if fisher else (None,) * 3
    tw = torch.rand(n, t, generator=g) if (fisher and with_tw) else None
    seed = torch.tensor([123456789], dtype=torch.int64)
    y = fn(x, w, a, b, xl, rows, fa, fb, fc, tw, seed)
    y.backward(torch.randn(y.shape, generator=g))
    out = [y.detach(), x.grad, a.grad, b.grad] + ([xl.grad] if separate else []) + ([fa, fb, fc] if fisher else [])
    return out


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize("separate", [False, True], ids=["x", "separate_x_lora"])
@pytest.mark.parametrize("fisher", [False, True], ids=["no_fisher", "fisher"])
def test_torch_path_draws_its_mask_once_and_equals_the_op_regenerating_it(case, separate, fisher, monkeypatch):
    """``lora_linear`` on a CPU draws the mask once and keeps it for the backward; the op called
    directly with ``dropout_p`` regenerates it there: bit for bit the same step."""
    p = 0.3

    def public(x, w, a, b, xl, rows, fa, fb, fc, tw, seed):
        return lora_linear(x, w, None, a, b, 0.5, x_lora=xl, trainable_rows=rows, fisher_a=fa, fisher_b=fb,
                           fisher_count=fc, token_weight=tw, fisher_scale=3.0, dropout_p=p, dropout_seed=seed)

    def raw_op(x, w, a, b, xl, rows, fa, fb, fc, tw, seed):
        k = x.shape[-1]
        y, _ = torch.ops.mage.lora_linear(
            x.reshape(-1, k), w, None, a, b, 0.5, None if xl is None else xl.reshape(-1, k),
            list(range(a.shape[0])) if rows is None else rows, fa, fb, fc,
            None if tw is None else tw.reshape(-1), x.shape[0], 3.0, p, seed)
        return y.reshape(*x.shape[:-1], b.shape[0])

    draws = []
    real = reference.dropout_keep_mask
    monkeypatch.setattr(reference, "dropout_keep_mask", lambda *args: draws.append(args) or real(*args))
    with on_path("torch"):
        got = _torch_path_step(public, separate, fisher, case)
        assert len(draws) == 1, f"the torch path drew {len(draws)} masks for one forward and backward"
        expected = _torch_path_step(raw_op, separate, fisher, case)
    assert len(draws) >= 2  # the op itself draws it in the forward (and again in a backward with work)
    for i, (a, b) in enumerate(zip(got, expected)):
        if a is None or b is None:
            assert a is None and b is None, f"output {i}: one gradient is missing"
            continue
        assert torch.equal(a, b), f"output {i} differs (max {float((a - b).abs().max()):.3g})"
    if case in ("all_rows", "row_subset", "adapters_only"):
        assert got[2].abs().sum() > 0 and (not fisher or got[-3].abs().sum() > 0)


def test_dropout_keep_mask_op_passes_opcheck():
    seed = torch.tensor([4242], dtype=torch.int64)
    torch.library.opcheck(torch.ops.mage.dropout_keep_mask.default, (seed, 6, 9, 0.25))


def test_torch_path_dropout_compiles_without_graph_breaks():
    """The torch path's mask op is opaque to ``torch.compile``: one graph, the eager values."""
    p = 0.25

    def step(x, w, a, b, seed):
        return lora_linear(x, w, None, a, b, 2.0, dropout_p=p, dropout_seed=seed).square().sum()

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 6, 16, generator=g), torch.randn(12, 16, generator=g)
    a0, b0 = torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)
    seed = torch.tensor([98765], dtype=torch.int64)
    grads = []
    with on_path("torch"):
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
        for xi in (x, x[:, :4]):  # two sequence lengths through one dynamic graph
            for fn in (step, compiled):
                a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
                loss = fn(xi, w, a, b, seed)
                loss.backward()
                grads.append((loss.detach(), a.grad, b.grad))
        explanation = torch._dynamo.explain(step)(x, w, a0, b0, seed)
    assert explanation.graph_break_count == 0
    for eager, comp in (grads[0:2], grads[2:4]):
        for e, c in zip(eager, comp):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert grads[0][1].abs().sum() > 0 and not torch.equal(grads[0][1], grads[2][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_float16(backend, device):
    problem = Problem(True, device, dtype=torch.float16)
    with on_path(backend):
        got = problem.run_op((0, 1, 3), dropout=True)
    expected = problem.reference_grads(dropout=True)
    for key in ("y", "dx"):
        assert got[key].dtype == torch.float16
        assert_close_rel(got[key], expected[key], 5e-3)
    for k in (0, 1, 3):
        assert_close_rel(got["da"][k], expected["da"][k], 5e-3)
        assert_close_rel(got["db"][k], expected["db"][k], 5e-3)
    assert got["da"][2] is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, device):
    problem = Problem(True, device)
    x_t = problem.x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not x_t.is_contiguous()
    problem.x = x_t
    with on_path(backend):
        got = problem.run_op((0, 3), dropout=False)
    check_against_reference(got, problem.reference_grads(False), (0, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
def test_adapters_only_without_base_weight(backend, dropout, device):
    """weight=None (a quantized base adds its own output): y and grads of the adapters' part alone."""
    problem = Problem(True, device)
    problem.weight = torch.zeros(D_OUT, D_IN, device=device)  # the reference's view of "no base weight"
    x = problem.x.clone().requires_grad_()
    a = torch.cat(problem.a, 0).requires_grad_()
    b = torch.cat(problem.b, 1).requires_grad_()
    x_lora = x * problem.keep if dropout else None
    with on_path(backend):
        y = lora_linear(x, None, problem.bias, a, b, SCALING, x_lora=x_lora)
        y.backward(problem.grad_y)
    expected = problem.reference_grads(dropout)
    assert_close_rel(y.detach(), expected["y"])
    assert_close_rel(x.grad, expected["dx"])
    assert_close_rel(a.grad, torch.cat(expected["da"], 0))
    assert_close_rel(b.grad, torch.cat(expected["db"], 1))


def test_triton_backend_rejects_float64_clearly(device):
    problem = Problem(True, device, dtype=torch.float64)
    with mage_kernels.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        problem.run_op((0,), dropout=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, device):
    problem = Problem(True, device)
    x = torch.randn(0, TOKENS, D_IN, requires_grad=True, device=device)
    a = torch.cat(problem.a, 0).requires_grad_()
    b = torch.cat(problem.b, 1).requires_grad_()
    fisher_a, fisher_b = torch.rand(a.shape, device=device), torch.rand(b.shape, device=device)
    before = fisher_a.clone(), fisher_b.clone()
    with on_path(backend):
        y = lora_linear(x, problem.weight, problem.bias, a, b, SCALING, fisher_a=fisher_a, fisher_b=fisher_b)
        y.sum().backward()
    assert y.shape == (0, TOKENS, D_OUT)
    assert x.grad.shape == x.shape
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
    assert torch.equal(fisher_a, before[0]) and torch.equal(fisher_b, before[1])


# ----------------------------------------------------------------------------- Fisher through the op


def per_sample_fisher_by_vmap(problem: Problem, dropout: bool, token_weight: Optional[torch.Tensor]):
    """sum_n (d loss_n / dA)^2 and (d loss_n / dB)^2 with loss_n = sum_t w_t <y_nt, dY_nt> (float64)."""
    w = torch.ones(NUM_SAMPLES, TOKENS, device=problem.x.device) if token_weight is None else token_weight
    x = problem.x.double()
    x_lora = x * problem.keep.double() if dropout else x
    a, b = torch.cat(problem.a, 0).double(), torch.cat(problem.b, 1).double()
    bias = None if problem.bias is None else problem.bias.double()

    def loss(a_, b_, x_n, xl_n, gy_n, w_n):
        y = reference.lora_linear(x_n, problem.weight.double(), bias, a_, b_, SCALING, xl_n)
        return (y * gy_n * w_n[:, None]).sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0, 0))(
        a, b, x, x_lora, problem.grad_y.double(), w.double()
    )
    return grads[0].pow(2).sum(0), grads[1].pow(2).sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", [False, True])
def test_fisher_through_the_op_matches_vmap_per_sample_gradients(backend, padding, device):
    problem = Problem(True, device)
    trainable = (0, 1, 3)
    token_weight = None
    if padding:
        token_weight = torch.ones(NUM_SAMPLES, TOKENS, device=device)
        token_weight[:, -2:] = 0.0
    fisher_a = torch.rand(NUM_ADAPTERS * RANK, D_IN, device=device)
    fisher_b = torch.rand(D_OUT, NUM_ADAPTERS * RANK, device=device)
    start_a, start_b = fisher_a.clone(), fisher_b.clone()
    with on_path(backend):
        got = problem.run_op(trainable, True, fisher_a=fisher_a, fisher_b=fisher_b, token_weight=token_weight)
    # The batch gradient is unaffected by the Fisher and its token weights.
    check_against_reference(got, problem.reference_grads(True), trainable)

    exp_a, exp_b = per_sample_fisher_by_vmap(problem, True, token_weight)
    rows = rows_of(trainable)
    frozen = [i for i in range(NUM_ADAPTERS * RANK) if i not in rows]
    assert_close_rel(fisher_a[rows] - start_a[rows], exp_a[rows])
    assert_close_rel(fisher_b[:, rows] - start_b[:, rows], exp_b[:, rows])
    assert torch.equal(fisher_a[frozen], start_a[frozen]), "Fisher rows of frozen adapters changed"
    assert torch.equal(fisher_b[:, frozen], start_b[:, frozen])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_accumulates_over_micro_batches_like_the_reference(backend, device):
    first, second = Problem(False, device), Problem(False, device)
    second.weight, second.a, second.b = first.weight, first.a, first.b  # the same layer, new data
    fisher_a = torch.zeros(NUM_ADAPTERS * RANK, D_IN, device=device)
    fisher_b = torch.zeros(D_OUT, NUM_ADAPTERS * RANK, device=device)
    with on_path(backend):
        for p in (first, second):
            p.run_op((0, 3), False, fisher_a=fisher_a, fisher_b=fisher_b, fisher_scale=2.0)
    ref_a = torch.zeros_like(fisher_a, dtype=torch.float64)
    ref_b = torch.zeros_like(fisher_b, dtype=torch.float64)
    a, b = torch.cat(first.a, 0).double(), torch.cat(first.b, 1).double()
    rows = rows_of((0, 3))
    for p in (first, second):
        x = p.x.double().reshape(-1, D_IN)
        gy = p.grad_y.double().reshape(-1, D_OUT)
        g = gy @ b
        fa = ref_a[rows]  # a copy (advanced indexing); frozen rows stay zero
        reference.weight_grad_with_fisher(g[:, rows], x, NUM_SAMPLES, SCALING, fa, None, 2.0)
        ref_a[rows] = fa
        fb = ref_b[:, rows]
        reference.weight_grad_with_fisher(gy, (x @ a.t())[:, rows], NUM_SAMPLES, SCALING, fb, None, 2.0)
        ref_b[:, rows] = fb
    assert_close_rel(fisher_a, ref_a)
    assert_close_rel(fisher_b, ref_b)


# ----------------------------------------------------------------------------- MageLinear


def make_layer(trainable: Sequence[int], dropout: float = 0.0, bias: bool = True,
               device: Optional[torch.device] = None) -> MageLinear:
    layer = MageLinear(D_IN, D_OUT, r=RANK, alpha=SCALING * NUM_ADAPTERS * RANK, dropout=dropout, bias=bias,
                       device=device)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()  # B = 0 at init would make every dA zero and the tests blind
    layer.set_trainable(trainable)
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
def test_mage_linear_with_dropout_matches_reference(backend, device):
    layer = make_layer((0, 1, 2), dropout=DROP_P, device=device).train()
    x = torch.randn(NUM_SAMPLES, TOKENS, D_IN, requires_grad=True, device=device)
    grad_y = torch.randn(NUM_SAMPLES, TOKENS, D_OUT, device=device)
    torch.manual_seed(99)
    with on_path(backend):
        y = layer(x)
        y.backward(grad_y)
        torch.manual_seed(99)  # replay the layer's seed draw; its mask is shared by all adapters
        seed = lora_op.new_dropout_seed(x.device)
        keep = mage_kernels.dropout_mask(x.shape, DROP_P, seed).double() / (1 - DROP_P)

    xd = x.detach().double().requires_grad_()
    a = [p.detach().double().requires_grad_() for p in layer.lora_A]
    b = [p.detach().double().requires_grad_() for p in layer.lora_B]
    y_ref = reference.lora_linear(xd, layer.base.weight.double(), layer.base.bias.double(), torch.cat(a, 0),
                                  torch.cat(b, 1), layer.scaling, xd * keep)
    y_ref.backward(grad_y.double())
    assert_close_rel(y.detach(), y_ref.detach())
    assert_close_rel(x.grad, xd.grad)
    for k in range(NUM_ADAPTERS):
        if k in (0, 1, 2):
            assert_close_rel(layer.lora_A[k].grad, a[k].grad)
            assert_close_rel(layer.lora_B[k].grad, b[k].grad)
        else:
            assert layer.lora_A[k].grad is None and layer.lora_B[k].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_adapters_keep_their_values_after_an_optimizer_step(backend, optimizer, device):
    layer = make_layer((0, 3), dropout=0.1, device=device).train()
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    params = list(layer.parameters())  # all of them: the optimizer must skip the grad-less ones
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=0.1, weight_decay=0.1))
    x = torch.randn(NUM_SAMPLES, TOKENS, D_IN, device=device)
    with on_path(backend):
        for _ in range(2):
            opt.zero_grad()
            layer(x).pow(2).mean().backward()
            opt.step()
    for name, p in layer.named_parameters():
        trained = name.startswith(("lora_A.0", "lora_B.0", "lora_A.3", "lora_B.3"))
        if trained:
            assert not torch.equal(p, before[name]), f"{name} should have been updated"
        else:
            assert p.grad is None, f"{name} is frozen but has a gradient"
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_gradcheck_torch_backend():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(2, 3, 7) > 0.3).double()
    weight = torch.randn(5, 7, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    a = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    with mage_kernels.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda x_, a_, b_: lora_linear(x_, weight, bias, a_, b_, 0.7, x_lora=x_ * keep), (x, a, b)
        )
        assert torch.autograd.gradcheck(lambda x_, a_, b_: lora_linear(x_, weight, None, a_, b_, 0.7), (x, a, b))


# ----------------------------------------------------------------------------- torch.compile / opcheck


def _train_step(layer: MageLinear, x: torch.Tensor, fn) -> Dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    y = fn(xx)
    y.pow(2).sum().backward()
    out = {"y": y.detach(), "dx": xx.grad}
    for name, p in layer.named_parameters():
        if p.grad is not None:
            out[name] = p.grad.clone()
    return out


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(compile_backend):
    layer = make_layer((0, 1, 3), dropout=0.0)
    x = torch.randn(NUM_SAMPLES, TOKENS, D_IN)
    torch._dynamo.reset()
    with mage_kernels.use_backend("torch"):
        eager = _train_step(layer, x, layer)
        compiled_layer = torch.compile(layer, backend=compile_backend, fullgraph=True)
        start = time.perf_counter()
        compiled = _train_step(layer, x, compiled_layer)
        elapsed = time.perf_counter() - start
    assert set(compiled) == set(eager) and {"lora_A.2", "lora_B.2"}.isdisjoint(eager)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6)
    print(f"torch.compile({compile_backend}) first forward+backward: {elapsed:.1f}s")


def _op_args(with_fisher: bool):
    m, k, n, r = 6, 9, 7, 8
    x = torch.randn(m, k, requires_grad=True)
    x_lora = torch.randn(m, k, requires_grad=True)
    weight, bias = torch.randn(n, k), torch.randn(n)
    a = torch.randn(r, k, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    fa = torch.zeros(r, k) if with_fisher else None
    fb = torch.zeros(n, r) if with_fisher else None
    count = torch.zeros(1, dtype=torch.int64) if with_fisher else None
    tw = torch.ones(m) if with_fisher else None
    seed = torch.tensor([12345], dtype=torch.int64)
    return (x, weight, bias, a, b, 0.5, x_lora, [0, 1, 5, 6], fa, fb, count, tw, 2, 1.0, 0.25, seed)


@pytest.mark.parametrize("with_fisher", [False, True])
def test_opcheck_lora_linear(with_fisher):
    with mage_kernels.use_backend("torch"):
        torch.library.opcheck(torch.ops.mage.lora_linear.default, _op_args(with_fisher))


def test_opcheck_lora_linear_backward():
    m, k, n, r = 6, 9, 7, 8
    args = (torch.randn(m, n), torch.randn(m, k), torch.randn(n, k), torch.randn(r, k), torch.randn(n, r),
            torch.randn(m, r), 0.5, [0, 1, 5], True, True, torch.zeros(r, k), torch.zeros(n, r),
            torch.zeros(1, dtype=torch.int64), None, 3, 1.0,
            0.25, torch.tensor([7], dtype=torch.int64))
    with mage_kernels.use_backend("torch"):
        torch.library.opcheck(torch.ops.mage.lora_linear_backward.default, args)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_autocast_matches_reference(dtype, gpu_device):
    layer = make_layer((0, 1, 2), device=gpu_device)
    x = torch.randn(4, 64, D_IN, device=gpu_device, requires_grad=True)
    with mage_kernels.use_backend("triton"), torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y_ref = reference.lora_linear(x.double(), layer.base.weight.double(), layer.base.bias.double(),
                                  torch.cat(list(layer.lora_A), 0).double(), torch.cat(list(layer.lora_B), 1).double(),
                                  layer.scaling)
    assert (y.double() - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()
