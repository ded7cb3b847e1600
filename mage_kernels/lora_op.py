"""The fused MAGE LoRA linear as a ``torch.library`` custom op with autograd.

Two ops are registered in the ``mage`` namespace:

``torch.ops.mage.lora_linear(x, weight, bias, lora_a, lora_b, scaling, x_lora, trainable_rows,
fisher_a, fisher_b, token_weight, num_samples, fisher_scale) -> (y, u)``
    ``y = x W0^T + bias + scaling * (x_lora A^T) B^T`` and the saved shrink
    ``u = x_lora A^T``. ``x`` is 2-D ``[M, K]``.

``torch.ops.mage.lora_linear_backward(...) -> (dx, dx_lora, dA, dB)``
    ``dx`` always, ``dA``/``dB`` only for the rows/columns in
    ``trainable_rows`` (the rest stay zero and cost nothing). When the Fisher
    buffers are given, it also adds each sample's squared gradient into them in
    place (SPEC section 2) without materializing per-sample gradients.

Both have fake (meta) implementations, so they trace under ``torch.compile``.
Each op dispatches to the backend chosen by :mod:`mage_kernels.backends` through
three primitives (shrink GEMM, concatenated-K GEMM, weight gradient with
Fisher), which exist for every backend with the same semantics.

Users normally call :func:`lora_linear` (or use :class:`mage_kernels.MageLinear`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import reference
from .backends import resolve_backend
from .weight_grad_op import OP_NAME as WEIGHT_GRAD_OP
from .weight_grad_op import weight_grad_impl

__all__ = ["lora_linear", "contiguous_runs", "primitives"]

_EMPTY_SHAPE = (0,)


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


class _Primitives:
    """The three building blocks the op is made of, for one backend."""

    def __init__(self, shrink, matmul_concat_k, weight_grad_with_fisher):
        self.shrink = shrink
        self.matmul_concat_k = matmul_concat_k
        self.weight_grad_with_fisher = weight_grad_with_fisher


def primitives(device: torch.device, dtype: Optional[torch.dtype] = None) -> _Primitives:
    """The primitives of the backend that :func:`~mage_kernels.backends.resolve_backend` picks.

    ``dtype`` is the compute dtype (``"auto"`` picks the torch reference for
    dtypes the Triton kernels lack, e.g. float64). The weight-gradient primitive
    comes from :func:`mage_kernels.weight_grad_op.weight_grad_impl`, the same
    backend-to-implementation map that ``torch.ops.mage.weight_grad_with_fisher``
    uses. The CUDA extension implements only that primitive (not the GEMMs), so
    backend ``"cuda"`` runs the GEMMs on Triton.
    """
    name = resolve_backend(device, WEIGHT_GRAD_OP, dtype)
    if name == "torch":
        return _TORCH
    from .kernels import lora as tk  # imports Triton: only when a Triton/CUDA backend is chosen

    return _Primitives(tk.shrink, tk.matmul_concat_k, weight_grad_impl(name))


_TORCH = _Primitives(reference.shrink, reference.matmul_concat_k, weight_grad_impl("torch"))


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
    token_weight: Optional[torch.Tensor],
    num_samples: int,
    fisher_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    prim = primitives(x.device, x.dtype) if x.shape[0] else _TORCH
    xl = x if x_lora is None else x_lora
    u = prim.shrink(xl, lora_a)
    if weight is None:  # adapters only: the caller adds its own (e.g. quantized) base
        y = prim.shrink(u, lora_b, scaling)
        return (y + bias if bias is not None else y), u
    y = prim.matmul_concat_k(x, weight.t(), u, lora_b.t(), scaling, bias)
    return y, u


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, x_lora, trainable_rows, fisher_a, fisher_b, token_weight, num_samples, fisher_scale):
    return x.new_empty(x.shape[0], lora_b.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


# ----------------------------------------------------------------------------- backward


@torch.library.custom_op("mage::lora_linear_backward", mutates_args=("fisher_a", "fisher_b"))
def _lora_linear_backward_op(
    grad_y: torch.Tensor,
    x_lora: torch.Tensor,
    weight: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    trainable_rows: List[int],
    separate_lora_input: bool,
    need_input_grad: bool,
    fisher_a: Optional[torch.Tensor],
    fisher_b: Optional[torch.Tensor],
    token_weight: Optional[torch.Tensor],
    num_samples: int,
    fisher_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prim = primitives(grad_y.device, grad_y.dtype) if grad_y.shape[0] else _TORCH
    runs = contiguous_runs(trainable_rows)
    need_g = need_input_grad or bool(runs)
    g = prim.shrink(grad_y, lora_b.t()) if need_g else None  # [M, R] = dY B
    dx, dx_lora = _empty(grad_y), _empty(grad_y)
    if need_input_grad:
        if weight is None:
            lora_dx = prim.shrink(g, lora_a.t(), scaling)  # s * G A
            dx, dx_lora = (grad_y.new_zeros(grad_y.shape[0], lora_a.shape[1]), lora_dx) if separate_lora_input else (lora_dx, dx_lora)
        elif separate_lora_input:
            dx = prim.matmul_concat_k(grad_y, weight)
            dx_lora = prim.shrink(g, lora_a.t(), scaling)  # s * G A
        else:
            dx = prim.matmul_concat_k(grad_y, weight, g, lora_a, scaling)
    d_a = torch.zeros_like(lora_a)
    d_b = torch.zeros_like(lora_b)
    # An empty batch has zero gradients and adds nothing to the Fisher (and has no samples to split).
    for start, stop in runs if grad_y.shape[0] else []:
        d_a[start:stop] = prim.weight_grad_with_fisher(
            g[:, start:stop], x_lora, num_samples, scaling,
            None if fisher_a is None else fisher_a[start:stop], token_weight, fisher_scale,
        )
        # dB[:, run] = s dY^T u[:, run]: the same primitive with the roles of g and x swapped.
        d_b[:, start:stop] = prim.weight_grad_with_fisher(
            grad_y, u[:, start:stop], num_samples, scaling,
            None if fisher_b is None else fisher_b[:, start:stop], token_weight, fisher_scale,
        )
    return dx, dx_lora, d_a, d_b


@_lora_linear_backward_op.register_fake
def _(grad_y, x_lora, weight, lora_a, lora_b, u, scaling, trainable_rows, separate_lora_input, need_input_grad,
      fisher_a, fisher_b, token_weight, num_samples, fisher_scale):
    m = grad_y.shape[0]
    k = lora_a.shape[1]
    dx = grad_y.new_empty(m, k) if need_input_grad else grad_y.new_empty(_EMPTY_SHAPE)
    dxl = grad_y.new_empty(m, k) if (need_input_grad and separate_lora_input) else grad_y.new_empty(_EMPTY_SHAPE)
    return dx, dxl, torch.empty_like(lora_a), torch.empty_like(lora_b)


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, scaling, x_lora, trainable_rows,
     fisher_a, fisher_b, token_weight, num_samples, fisher_scale) = inputs
    _, u = output
    separate = x_lora is not None
    ctx.save_for_backward(x_lora if separate else x, weight, lora_a, lora_b, u, token_weight)
    # The Fisher buffers are accumulators the backward writes into, not inputs whose value the
    # backward reads: keep them out of save_for_backward, whose version check would reject a
    # layer applied twice in one graph (both backwards add into the same buffer) or a reset.
    ctx.fisher_buffers = (fisher_a, fisher_b)
    ctx.scaling = scaling
    ctx.trainable_rows = list(trainable_rows)
    ctx.separate = separate
    ctx.num_samples = num_samples
    ctx.fisher_scale = fisher_scale


def _backward(ctx, grad_y, grad_u):
    xl, weight, lora_a, lora_b, u, token_weight = ctx.saved_tensors
    fisher_a, fisher_b = ctx.fisher_buffers
    need = ctx.needs_input_grad
    if need[1] or need[2]:
        raise NotImplementedError(
            "mage.lora_linear keeps the base weight and bias frozen; call requires_grad_(False) on them"
        )
    need_dx = bool(need[0] or (ctx.separate and need[6]))
    rows = ctx.trainable_rows if (need[3] or need[4]) else []
    dx, dxl, d_a, d_b = torch.ops.mage.lora_linear_backward(
        grad_y.contiguous(), xl, weight, lora_a, lora_b, u, ctx.scaling, rows, ctx.separate, need_dx,
        fisher_a, fisher_b, token_weight, ctx.num_samples, ctx.fisher_scale,
    )
    return (
        dx if need[0] else None, None, None,
        d_a if need[3] else None, d_b if need[4] else None,
        None,
        dxl if (ctx.separate and need[6]) else None,
        None, None, None, None, None, None,
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
    token_weight: Optional[torch.Tensor] = None,
    fisher_scale: float = 1.0,
) -> torch.Tensor:
    """Fused ``x W0^T + bias + scaling * (x_lora A^T) B^T`` with a kernel backward.

    Args:
        x: input ``[..., K]``; with Fisher buffers, ``[N, T, K]`` (or ``[N, K]``),
            one sample per leading index.
        weight, bias: the frozen base linear (``[N_out, K]``, ``[N_out]``).
        lora_a, lora_b: concatenated adapters ``[R, K]`` and ``[N_out, R]``.
        scaling: the LoRA scaling ``s``.
        x_lora: the adapters' (dropped-out) input, same shape as ``x``; ``None``
            means ``x`` and lets the backward fuse both input-gradient paths.
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
        token_weight: optional ``[N, T]`` per-token weight for the Fisher
            (0 for padding); the batch gradient is not affected.
        fisher_scale: factor turning the gradient reaching this op into a
            per-sample gradient (``N`` for a loss averaged over ``N`` samples).
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    num_samples = x.shape[0] if x.dim() >= 2 else 1
    x2 = x.reshape(-1, k)
    xl2 = None if x_lora is None else x_lora.reshape(-1, k)
    rows = list(range(lora_a.shape[0])) if trainable_rows is None else sorted(int(r) for r in trainable_rows)
    tw = None if token_weight is None else token_weight.reshape(-1)
    y, _ = torch.ops.mage.lora_linear(
        x2, weight, bias, lora_a, lora_b, float(scaling), xl2, rows,
        fisher_a, fisher_b, tw, int(num_samples), float(fisher_scale),
    )
    return y.reshape(*lead, lora_b.shape[0])
