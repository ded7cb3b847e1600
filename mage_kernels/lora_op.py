"""The fused MAGE LoRA linear as a ``torch.library`` custom op with autograd (ALGORITHM.md §1).

Two ops are registered in the ``mage`` namespace:

``torch.ops.mage.lora_linear(x, weight, bias, lora_a, lora_b, scaling, x_lora, trainable_rows, fisher_a,
fisher_b, fisher_count, token_weight, num_samples, fisher_scale, dropout_p, dropout_seed) -> (y, su)``
    ``y = x W0^T + bias + (s u) B^T`` with the pre-scaled shrink ``s u = s drop(x_lora) A^T``
    (saved for the backward). ``x`` is 2-D ``[M, K]``; ``x_lora`` (``None``: ``x``) is the
    adapters' input; with ``dropout_p > 0`` the adapters see ``drop(x_lora)``, its mask
    generated from the int64 ``dropout_seed`` inside the kernels and regenerated in
    the backward (never stored). (:func:`lora_linear` on the torch path applies the dropout
    before the op instead, with the mask of ``torch.ops.mage.dropout_keep_mask``, and calls the
    op with ``dropout_p = 0``.)

``torch.ops.mage.lora_linear_backward(...) -> (dx, dx_lora, dA, dB)``
    ``dx`` always, ``dA``/``dB`` only for the rows/columns in ``trainable_rows``
    (the rest stay zero and cost nothing). When the Fisher buffers are given, it
    also adds each sample's squared gradient into them in place (ALGORITHM.md §2)
    without materializing per-sample gradients.

Both have fake (meta) implementations, so they trace under ``torch.compile``.

Which implementation runs: :func:`lora_linear_path` (also public as
``mage_kernels.lora_linear_path``) is THE rule, used by the op itself, so it
always says which path a given call takes:

``"cublas"`` -- CUDA tensors under ``"auto"`` (fp16/bf16/fp32) and under ``"cuda"``
    The big GEMMs in cuBLAS (``torch.mm`` / ``addmm``, fp32 accumulation), the rank-4r
    expand accumulated into the same output::

        y  = x W0^T + b;    y.addmm_(s u, B^T)              (s u = s x A^T: one GEMM for the 4 adapters)
        dx = dY W0;         dx.addmm_(s G, A)               (s G = s dY B)
        dA = (s G)^T x;     dB = dY^T (s u)

    Triton only where cuBLAS cannot do the work: with dropout the shrink, the
    masked expand ``dx += mask / (1 - p) * (s G A)`` and ``dA`` regenerate the mask
    in the kernel; with the Fisher the weight gradients run in the Fisher kernel
    (``T = 1``: one GEMM of squares; short samples: one tile per sample; see
    :mod:`mage_kernels.kernels.weight_grad`). Under ``"cuda"`` the Fisher weight
    gradient without dropout runs in the CUDA extension instead.
``"triton"`` -- only when backend ``"triton"`` is requested explicitly
    The base GEMMs in the Triton concatenated-K kernel (``[x | s u] @ [W0 | B]^T``, one
    kernel; selectable so that benchmarks can compare it with the cuBLAS composition
    in the same run), everything else in Triton too.
``"torch"`` -- CPU tensors, dtypes the kernels lack (float64), backend ``"torch"``
    :mod:`mage_kernels.reference`; the dropout mask from a ``torch.Generator`` seeded
    with the same seed (same semantics, different bits than the Triton mask).

Users normally call :func:`lora_linear` (or use :class:`mage_kernels.MageLinear`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import reference
from .backends import backend as requested_backend
from .backends import resolve_backend
from .weight_grad_op import OP_NAME as WEIGHT_GRAD_OP
from .weight_grad_op import weight_grad_impl

__all__ = ["lora_linear", "lora_linear_path", "LoraLinearPath", "contiguous_runs", "new_dropout_seed", "use_path"]

_EMPTY_SHAPE = (0,)
PATHS = ("cublas", "triton", "torch")
_forced_path: Optional[str] = None


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(_EMPTY_SHAPE)


def contiguous_runs(rows: Sequence[int]) -> List[Tuple[int, int]]:
    """Split sorted row indices into maximal ``[start, stop)`` runs: ``[0,1,2,6,7] -> [(0,3),(6,8)]``."""
    runs: List[Tuple[int, int]] = []
    for r in sorted(rows):
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def new_dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh int64 ``[1]`` dropout seed on ``device``, drawn from torch's generator of that device
    (so ``torch.manual_seed`` makes the masks reproducible; no host sync, CUDA-graph safe)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


# ----------------------------------------------------------------------------- the path rule


@dataclasses.dataclass(frozen=True)
class LoraLinearPath:
    """Which implementation each part of one ``mage::lora_linear`` call uses (see :func:`lora_linear_path`)."""

    path: str  # "cublas" | "triton" | "torch"
    backend: str  # the concrete kernel backend: "triton" | "cuda" | "torch"
    base_gemm: str  # forward x W0^T + b and input-gradient dY W0
    shrink: str  # s drop(x) A^T (and s dY B)
    expand: str  # the rank-4r expand into y and into dx
    weight_grad: str  # dA, dB (and the Fisher)

    def as_dict(self) -> Dict[str, str]:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def use_path(name: Optional[str]) -> Iterator[None]:
    """Force the path (``"cublas"`` | ``"triton"`` | ``"torch"``) of the enclosed calls, overriding the
    rule of :func:`lora_linear_path` (tests and benchmarks: e.g. the cuBLAS composition on CPU
    tensors, with its Triton kernels in the interpreter). ``None`` restores the rule."""
    global _forced_path
    if name is not None and name not in PATHS:
        raise ValueError(f"unknown path {name!r}; choose one of {', '.join(PATHS)}")
    old = _forced_path
    _forced_path = name
    try:
        yield
    finally:
        _forced_path = old


def _triton_or(name: str) -> str:
    return "triton" if name == "cuda" else name


def lora_linear_path(device: torch.device, dtype: Optional[torch.dtype] = None, *, dropout: bool = False,
                     fisher: bool = False, tokens_per_sample: Optional[int] = None) -> LoraLinearPath:
    """The path a ``mage::lora_linear`` call takes (forward and backward), by the documented rule.

    Args:
        device, dtype: of the call's tensors.
        dropout: the adapters' input dropout is on (``p > 0`` in training).
        fisher: the Fisher buffers are attached (the backward accumulates them).
        tokens_per_sample: ``T`` of the Fisher's samples (``1``: inputs ``[N, d]``).

    Rule (the module docstring explains each path): explicit backend ``"torch"``, a
    non-CUDA device or a dtype outside float16/bfloat16/float32 under ``"auto"`` ->
    ``"torch"``; explicit ``"triton"`` -> ``"triton"`` (concatenated-K Triton GEMM);
    otherwise (``"auto"`` or ``"cuda"`` on CUDA) -> ``"cublas"``. An explicitly
    requested backend that cannot run raises
    :class:`~mage_kernels.BackendUnavailableError` (no silent fallback).
    """
    concrete = resolve_backend(device, WEIGHT_GRAD_OP, dtype)
    if _forced_path is not None:
        path = _forced_path
        if path != "torch" and concrete == "torch":
            concrete = "triton"
    elif concrete == "torch":
        path = "torch"
    elif requested_backend() == "triton":
        path = "triton"
    else:
        path = "cublas"
    if path == "torch":
        mask = "torch.Generator mask" if dropout else "no dropout"
        return LoraLinearPath("torch", "torch", "torch (reference)", f"torch ({mask})", "torch", "torch")
    t1 = fisher and tokens_per_sample == 1
    fisher_kernel = ("Fisher kernel: one GEMM of squares (T = 1)" if t1 else
                     "Fisher kernel: one tile per sample" if fisher and tokens_per_sample is not None
                     and 1 < tokens_per_sample <= 64 else "Fisher kernel: per-sample loop" if fisher else "")
    if path == "triton":
        return LoraLinearPath(
            "triton", "triton", "triton concat-K GEMM (bias in the epilogue)",
            "triton shrink" + (" (in-kernel Philox dropout)" if dropout else ""),
            "triton masked expand (dropout)" if dropout else "triton concat-K (same accumulator)",
            "triton " + (fisher_kernel or "weight-grad kernel") + (" (in-kernel dropout)" if dropout else ""),
        )
    wg_backend = concrete if (concrete == "cuda" and fisher and not dropout) else "triton"
    if not fisher and not dropout:
        weight_grad = "cublas torch.mm"
    elif wg_backend == "cuda":
        weight_grad = "cuda extension weight_grad_with_fisher"
    else:
        weight_grad = "triton " + (fisher_kernel or "weight-grad kernel") + (" (in-kernel dropout)" if dropout else "")
    return LoraLinearPath(
        "cublas", concrete, "cublas torch.addmm / torch.mm",
        "triton shrink (in-kernel Philox dropout)" if dropout else "cublas torch.mm (one GEMM, 4 adapters)",
        "cublas y.addmm_(s u, B^T); dx: triton masked expand" if dropout else
        "cublas y.addmm_(s u, B^T) / dx.addmm_(s G, A)",
        weight_grad,
    )


# ----------------------------------------------------------------------------- implementations


class _Torch:
    """The reference path: plain PyTorch on any device."""

    @staticmethod
    def shrink(x, a, scale, p, seed):
        xl = reference.dropout(x, p, seed) if p else x
        return reference.shrink(xl, a, scale)

    @staticmethod
    def forward(x, w_t, su, b_t, bias):
        return reference.matmul_concat_k(x, w_t, su, b_t, 1.0, bias)

    @staticmethod
    def base_input_grad(dy, w):
        return dy @ w

    @staticmethod
    def add_lora_input_grad_(out, sg, a, p, seed, keep=None):
        part = sg @ a
        if p:
            part = reference.dropout(part, p, seed, keep)
        return out.add_(part)

    @staticmethod
    def fused_input_grad(dy, w, sg, a):
        return None

    @staticmethod
    def weight_grad(g, x, n, fisher, tw, fs, p, seed):
        xl = reference.dropout(x, p, seed) if p else x
        return reference.weight_grad_with_fisher(g, xl, n, 1.0, fisher, tw, fs)

    @staticmethod
    def backward_mask(m, k, p, seed):
        """The keep-mask, drawn ONCE per backward and shared by the input and weight gradients.

        Reached when the op itself gets ``dropout_p > 0``: a direct op call, or a CUDA tensor on
        the torch path (:func:`lora_linear` on a CPU applies the dropout before the op).

        Drawing it is most of a small layer's cost on a CPU (``torch.rand`` is about 3 ns per
        element, the GEMMs of a rank-32 adapter far less); the kernels of the other paths
        regenerate it in registers instead.
        """
        return reference.dropout_keep_mask(m, k, p, seed)


class _Cublas:
    """CUDA by construction: cuBLAS GEMMs accumulating into one output; Triton only for masks and the Fisher."""

    def __init__(self, concrete: str) -> None:
        from .kernels import lora as tk  # Triton, for the dropout kernels

        self.tk = tk
        self.concrete = concrete

    def shrink(self, x, a, scale, p, seed):
        if p:
            return self.tk.shrink(x, a, scale, p, seed)
        u = torch.mm(x, a.t())
        return u.mul_(scale) if scale != 1.0 else u

    @staticmethod
    def forward(x, w_t, su, b_t, bias):
        y = torch.addmm(bias, x, w_t) if bias is not None else torch.mm(x, w_t)
        return y.addmm_(su, b_t)

    @staticmethod
    def base_input_grad(dy, w):
        return torch.mm(dy, w)

    def add_lora_input_grad_(self, out, sg, a, p, seed):
        if p:
            return self.tk.expand_accumulate_(out, sg, a, 1.0, p, seed)
        return out.addmm_(sg, a)

    @staticmethod
    def fused_input_grad(dy, w, sg, a):
        return None

    def weight_grad(self, g, x, n, fisher, tw, fs, p, seed):
        if fisher is None and not p:
            return torch.mm(g.t(), x)
        if self.concrete == "cuda" and not p:
            return weight_grad_impl("cuda")(g, x, n, 1.0, fisher, tw, fs)
        from .kernels import weight_grad as twg

        return twg.weight_grad_with_fisher(g, x, n, 1.0, fisher, tw, fs, dropout_p=p, seed=seed)


class _Triton:
    """Everything in Triton, the base GEMMs in the concatenated-K kernel (explicit ``backend="triton"``)."""

    def __init__(self) -> None:
        from .kernels import lora as tk
        from .kernels import weight_grad as twg

        self.tk, self.twg = tk, twg

    def shrink(self, x, a, scale, p, seed):
        return self.tk.shrink(x, a, scale, p, seed)

    def forward(self, x, w_t, su, b_t, bias):
        return self.tk.matmul_concat_k(x, w_t, su, b_t, 1.0, bias)

    def base_input_grad(self, dy, w):
        return self.tk.matmul_concat_k(dy, w)

    def add_lora_input_grad_(self, out, sg, a, p, seed):
        return self.tk.expand_accumulate_(out, sg, a, 1.0, p, seed)

    def fused_input_grad(self, dy, w, sg, a):
        return self.tk.matmul_concat_k(dy, w, sg, a, 1.0)

    def weight_grad(self, g, x, n, fisher, tw, fs, p, seed):
        return self.twg.weight_grad_with_fisher(g, x, n, 1.0, fisher, tw, fs, dropout_p=p, seed=seed)


def _implementation(device: torch.device, dtype: torch.dtype):
    info = lora_linear_path(device, dtype)
    if info.path == "torch":
        return _Torch
    if info.path == "triton":
        return _Triton()
    return _Cublas(info.backend)


# ----------------------------------------------------------------------------- forward


@torch.library.custom_op("mage::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor],
    trainable_rows: List[int],
    fisher_a: Optional[torch.Tensor],
    fisher_b: Optional[torch.Tensor],
    fisher_count: Optional[torch.Tensor],
    token_weight: Optional[torch.Tensor],
    num_samples: int,
    fisher_scale: float,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    impl = _implementation(x.device, x.dtype) if x.shape[0] else _Torch
    xl = x if x_lora is None else x_lora
    su = impl.shrink(xl, lora_a, scaling, dropout_p, dropout_seed)  # s drop(x) A^T, [M, R]
    if weight is None:  # adapters only: the caller adds its own (e.g. quantized) base
        y = impl.shrink(su, lora_b, 1.0, 0.0, None)
        return (y + bias if bias is not None else y), su
    return impl.forward(x, weight.t(), su, lora_b.t(), bias), su


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, x_lora, trainable_rows, fisher_a, fisher_b, fisher_count,
      token_weight, num_samples, fisher_scale, dropout_p, dropout_seed):
    return x.new_empty(x.shape[0], lora_b.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


# ----------------------------------------------------------------------------- backward


@torch.library.custom_op("mage::lora_linear_backward", mutates_args=("fisher_a", "fisher_b", "fisher_count"))
def _lora_linear_backward_op(
    grad_y: torch.Tensor,
    x_lora: torch.Tensor,
    weight: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    su: torch.Tensor,
    scaling: float,
    trainable_rows: List[int],
    separate_lora_input: bool,
    need_input_grad: bool,
    fisher_a: Optional[torch.Tensor],
    fisher_b: Optional[torch.Tensor],
    fisher_count: Optional[torch.Tensor],
    token_weight: Optional[torch.Tensor],
    num_samples: int,
    fisher_scale: float,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _implementation(grad_y.device, grad_y.dtype) if grad_y.shape[0] else _Torch
    p, seed = dropout_p, dropout_seed
    runs = contiguous_runs(trainable_rows)
    need_g = need_input_grad or bool(runs)
    keep = None  # the torch backend's mask, drawn once for the input and weight gradients
    if p and impl is _Torch and grad_y.shape[0] and (need_input_grad or runs):
        keep = impl.backward_mask(grad_y.shape[0], lora_a.shape[1], p, seed)
    sg = impl.shrink(grad_y, lora_b.t(), scaling, 0.0, None) if need_g else None  # s G = s dY B, [M, R]
    dx, dx_lora = _empty(grad_y), _empty(grad_y)
    if need_input_grad:
        m, k = grad_y.shape[0], lora_a.shape[1]
        fused = None
        if weight is not None and not separate_lora_input and not p:
            fused = impl.fused_input_grad(grad_y, weight, sg, lora_a)
        if fused is not None:
            dx = fused
        else:
            base = impl.base_input_grad(grad_y, weight) if weight is not None else grad_y.new_zeros(m, k)
            mask = {} if keep is None else {"keep": keep}
            if separate_lora_input:
                dx = base
                dx_lora = impl.add_lora_input_grad_(grad_y.new_zeros(m, k), sg, lora_a, p, seed, **mask)
            else:
                dx = impl.add_lora_input_grad_(base, sg, lora_a, p, seed, **mask)
    x_w, p_w = x_lora, p  # what the weight gradients read, and the dropout still to apply to it
    if keep is not None and runs:
        x_w, p_w = reference.dropout(x_lora, p, seed, keep), 0.0  # made after dx: a lower peak
    keep = None
    d_a = torch.zeros_like(lora_a)
    d_b = torch.zeros_like(lora_b)
    # An empty batch has zero gradients and adds nothing to the Fisher (and has no samples to split).
    for start, stop in runs if grad_y.shape[0] else []:
        # dA[run] = (s G[:, run])^T drop(x)
        d_a[start:stop] = impl.weight_grad(
            sg[:, start:stop], x_w, num_samples,
            None if fisher_a is None else fisher_a[start:stop], token_weight, fisher_scale, p_w, seed,
        )
        # dB[:, run] = dY^T (s u)[:, run]: the same primitive with the roles of g and x swapped.
        d_b[:, start:stop] = impl.weight_grad(
            grad_y, su[:, start:stop], num_samples,
            None if fisher_b is None else fisher_b[:, start:stop], token_weight, fisher_scale, 0.0, None,
        )
    if fisher_count is not None:  # the samples whose gradient reached this layer (mage_kernels.fisher)
        fisher_count.add_(num_samples if grad_y.shape[0] else 0)
    return dx, dx_lora, d_a, d_b


@_lora_linear_backward_op.register_fake
def _(grad_y, x_lora, weight, lora_a, lora_b, su, scaling, trainable_rows, separate_lora_input, need_input_grad,
      fisher_a, fisher_b, fisher_count, token_weight, num_samples, fisher_scale, dropout_p, dropout_seed):
    m = grad_y.shape[0]
    k = lora_a.shape[1]
    dx = grad_y.new_empty(m, k) if need_input_grad else grad_y.new_empty(_EMPTY_SHAPE)
    dxl = grad_y.new_empty(m, k) if (need_input_grad and separate_lora_input) else grad_y.new_empty(_EMPTY_SHAPE)
    return dx, dxl, torch.empty_like(lora_a), torch.empty_like(lora_b)


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, scaling, x_lora, trainable_rows,
     fisher_a, fisher_b, fisher_count, token_weight, num_samples, fisher_scale, dropout_p, dropout_seed) = inputs
    _, su = output
    separate = x_lora is not None
    ctx.save_for_backward(x_lora if separate else x, weight, lora_a, lora_b, su, token_weight, dropout_seed)
    # The Fisher buffers are accumulators the backward writes into, not inputs whose value the
    # backward reads: keep them out of save_for_backward, whose version check would reject a
    # layer applied twice in one graph (both backwards add into the same buffer) or a reset.
    ctx.fisher_buffers = (fisher_a, fisher_b, fisher_count)
    ctx.scaling = scaling
    ctx.trainable_rows = list(trainable_rows)
    ctx.separate = separate
    ctx.num_samples = num_samples
    ctx.fisher_scale = fisher_scale
    ctx.dropout_p = dropout_p


def _backward(ctx, grad_y, grad_u):
    xl, weight, lora_a, lora_b, su, token_weight, seed = ctx.saved_tensors
    fisher_a, fisher_b, fisher_count = ctx.fisher_buffers
    need = ctx.needs_input_grad
    if need[1] or need[2]:
        raise NotImplementedError(
            "mage.lora_linear keeps the base weight and bias frozen; call requires_grad_(False) on them"
        )
    need_dx = bool(need[0] or (ctx.separate and need[6]))
    rows = ctx.trainable_rows if (need[3] or need[4]) else []
    dx, dxl, d_a, d_b = torch.ops.mage.lora_linear_backward(
        grad_y.contiguous(), xl, weight, lora_a, lora_b, su, ctx.scaling, rows, ctx.separate, need_dx,
        fisher_a, fisher_b, fisher_count, token_weight, ctx.num_samples, ctx.fisher_scale, ctx.dropout_p, seed,
    )
    return (
        dx if need[0] else None, None, None,
        d_a if need[3] else None, d_b if need[4] else None,
        None,
        dxl if (ctx.separate and need[6]) else None,
        None, None, None, None, None, None, None, None, None,
    )


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry


def lora_linear(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    x_lora: Optional[torch.Tensor] = None,
    trainable_rows: Optional[Sequence[int]] = None,
    fisher_a: Optional[torch.Tensor] = None,
    fisher_b: Optional[torch.Tensor] = None,
    fisher_count: Optional[torch.Tensor] = None,
    token_weight: Optional[torch.Tensor] = None,
    fisher_scale: float = 1.0,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``x W0^T + bias + scaling * (drop(x_lora) A^T) B^T`` with a kernel backward.

    Args:
        x: input ``[..., K]``; with Fisher buffers, ``[N, T, K]`` (or ``[N, K]``),
            one sample per leading index.
        weight, bias: the frozen base linear (``[N_out, K]``, ``[N_out]``).
        lora_a, lora_b: concatenated adapters ``[R, K]`` and ``[N_out, R]``.
        scaling: the LoRA scaling ``s``.
        x_lora: the adapters' input, same shape as ``x``; ``None`` means ``x``.
        trainable_rows: rows of ``lora_a`` (columns of ``lora_b``) whose
            gradient is computed; ``None`` means all ``R``. Rows outside
            ``trainable_rows`` get an all-ZERO gradient in ``lora_a.grad`` /
            ``lora_b.grad`` (and add nothing to the Fisher), even though the
            whole ``lora_a`` / ``lora_b`` tensor requires grad: pass every row
            you train. (:class:`~mage_kernels.MageLinear` always passes exactly
            its trainable adapters' rows.)
        fisher_a, fisher_b: float32 buffers shaped like ``lora_a``/``lora_b``;
            when given, the backward adds ``sum_n (fisher_scale * g_n)^2`` of the
            trainable rows/columns into them in place.
        fisher_count: optional int64 ``[1]`` tensor (any device; :class:`mage_kernels.Fisher`
            keeps it on the CPU) to which the backward adds the number of samples ``N``,
            so the sample count needs no Python hook and compiles with the model.
        token_weight: optional ``[N, T]`` per-token weight for the Fisher
            (0 for padding); the batch gradient is not affected.
        fisher_scale: factor turning the gradient reaching this op into a
            per-sample gradient (``N`` for a loss averaged over ``N`` samples).
        dropout_p, dropout_seed: dropout on the adapters' input, ONE mask shared by
            all adapters: ``drop(x)[m, k] = keep(m, k) * x[m, k] / (1 - p)``, the mask a
            function of the int64 ``[1]`` seed (:func:`new_dropout_seed`) and the element's
            index, generated inside the kernels and regenerated in the backward. The
            torch path on a CPU draws it once and keeps it for the backward, with the
            dropped input (1 byte plus one input element per element).
            The Triton kernels (Philox) and the torch backend (``torch.Generator``) draw
            different masks for one seed (same distribution); see
            ``mage_kernels.dropout_mask`` for the mask a call used.
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    num_samples = x.shape[0] if x.dim() >= 2 else 1
    x2 = x.reshape(-1, k)
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    rows = list(range(lora_a.shape[0])) if trainable_rows is None else sorted(int(r) for r in trainable_rows)
    tw = None if token_weight is None else token_weight.reshape(-1)
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1); got {dropout_p}")
    if p and dropout_seed is None:
        raise ValueError("lora_linear: dropout_p > 0 needs a dropout_seed (mage_kernels.lora_op.new_dropout_seed)")
    if p and x2.device.type == "cpu" and lora_linear_path(x2.device, x2.dtype).path == "torch":
        # On a CPU the torch path draws its mask once and keeps it for the backward (autograd,
        # through torch.where: the bool mask and the dropped input); regenerating it there, as
        # the kernels do in registers, would draw every uniform twice (most of a small layer's
        # cost on a CPU). Elsewhere (a CUDA tensor on the torch path) the op regenerates it, and
        # the path rule stays inside the op under torch.compile.
        src = x2 if xl2 is None else xl2
        keep = torch.ops.mage.dropout_keep_mask(dropout_seed, src.shape[0], src.shape[1], p)
        xl2, p = reference.dropout(src, p, dropout_seed, keep), 0.0
    y, _ = torch.ops.mage.lora_linear(
        x2, weight, bias, lora_a, lora_b, float(scaling), xl2, rows,
        fisher_a, fisher_b, fisher_count, tw, num_samples, float(fisher_scale), p, dropout_seed if p else None,
    )
    return y.reshape(*lead, lora_b.shape[0])


@torch.library.custom_op("mage::dropout_keep_mask", mutates_args=())
def _dropout_keep_mask_op(seed: torch.Tensor, m: int, k: int, p: float) -> torch.Tensor:
    """The torch path's ``[m, k]`` bool keep-mask of ``seed`` (:func:`mage_kernels.reference.dropout_keep_mask`).

    An op of its own so that ``torch.compile`` treats the seeded ``torch.Generator`` as opaque.
    """
    return reference.dropout_keep_mask(m, k, p, seed)


@_dropout_keep_mask_op.register_fake
def _(seed, m, k, p):
    return torch.empty((m, k), dtype=torch.bool, device=seed.device)


def dropout_mask(shape: Sequence[int], p: float, seed: torch.Tensor, path: Optional[str] = None) -> torch.Tensor:
    """The bool keep-mask ``[*shape]`` a call with this seed used on ``seed.device``.

    ``shape`` is the adapters' input shape (``[..., K]``; the mask is of its 2-D view
    ``[M, K]``). ``path`` defaults to the one :func:`lora_linear_path` picks now: the
    Triton paths' Philox mask, or the torch backend's generator mask. For tests and
    references; the Triton/cuBLAS paths never materialize it (the torch path on a CPU keeps the
    same mask for its backward).
    """
    shape = tuple(int(s) for s in shape)
    k = shape[-1] if shape else 1
    m = 1
    for s in shape[:-1]:
        m *= s
    if path is None:
        path = lora_linear_path(seed.device, None, dropout=True).path
    if path == "torch":
        keep = reference.dropout_keep_mask(m, k, p, seed)
    else:
        from .kernels.dropout import dropout_mask as triton_mask

        keep = triton_mask(m, k, p, seed)
    return keep.reshape(shape)
