"""Plain-PyTorch reference implementations of every kernel in the library.

These are the ground truth the Triton and CUDA kernels are tested against, and
the ``"torch"`` backend of the ops (see :mod:`mage_kernels.backends`). They favour
clarity over speed. Formulas follow ``SPEC.md`` (the project's algorithm spec):

* section 1: the four-adapter LoRA sum ``y = x W0^T + b + s * sum_k B_k A_k x``;
* section 2: per-sample squared-gradient Fisher diagonal;
* section 3: PEMA, the damped elementwise EMA update;
* section 4: DEMA (CIA), the layer-wise EMA baseline.

Notation used throughout: ``M`` tokens (rows of ``x``), ``K`` the input width
``d_in``, ``N`` the output width ``d_out``, ``R = num_adapters * r`` the total
rank. ``lora_a`` is the concatenation ``cat(A_0..A_3)`` with shape ``[R, K]`` and
``lora_b`` is ``cat(B_0..B_3, dim=1)`` with shape ``[N, R]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "lora_linear",
    "shrink",
    "matmul_concat_k",
    "weight_grad_with_fisher",
    "per_sample_fisher",
    "pema_update_",
    "dema_update_",
]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Differentiable reference of the MAGE forward (SPEC section 1).

    ``y = x W0^T (+ bias) + scaling * (x_lora A^T) B^T``; ``x_lora`` is the
    dropped-out input of the adapters (``None`` means ``x`` itself). Autograd of
    this function is the reference for every backward kernel.
    """
    xl = x if x_lora is None else x_lora
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y + scaling * ((xl @ lora_a.t()) @ lora_b.t())


def shrink(x: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ a^T``: the LoRA shrink GEMM (``u = x A^T``; also ``G = dY B``)."""
    return scale * (x @ a.t()) if scale != 1.0 else x @ a.t()


def matmul_concat_k(
    a1: torch.Tensor,
    b1: torch.Tensor,
    a2: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
    scale2: float = 1.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``a1 @ b1 + scale2 * a2 @ b2 (+ bias)``: one GEMM over the concatenated K.

    The forward uses it as ``[x | s u] @ [W0 | B]^T`` and the input-gradient as
    ``[dY | s G] @ [W0 ; A]``.
    """
    out = a1 @ b1
    if a2 is not None:
        out = out + scale2 * (a2 @ b2)
    if bias is not None:
        out = out + bias
    return out


def weight_grad_with_fisher(
    g: torch.Tensor,
    x: torch.Tensor,
    num_samples: int,
    scale: float,
    fisher: Optional[torch.Tensor] = None,
    token_weight: Optional[torch.Tensor] = None,
    fisher_scale: float = 1.0,
) -> torch.Tensor:
    """Reference of the fused weight-gradient + Fisher kernel.

    ``g: [M, P]``, ``x: [M, Q]`` with ``M = num_samples * T`` tokens, each sample
    a contiguous block of ``T`` rows. Returns the batch gradient
    ``scale * g^T x`` (``[P, Q]``) and, when ``fisher`` is given, adds in place

        fisher += sum_n (fisher_scale * scale * g_n^T diag(w_n) x_n) ** 2

    where ``w`` is the optional per-token weight (``[M]``; 0 for padding). The
    caller divides by the number of samples seen (SPEC section 2).
    """
    grad = scale * (g.t() @ x)
    if fisher is not None:
        m, p = g.shape
        if m % num_samples:
            raise ValueError(f"{m} tokens do not split into {num_samples} samples")
        t = m // num_samples
        gw = g if token_weight is None else g * token_weight.reshape(m, 1).to(g.dtype)
        per_sample = torch.einsum("ntp,ntq->npq", gw.reshape(num_samples, t, p), x.reshape(num_samples, t, -1))
        fisher.add_(((fisher_scale * scale) * per_sample).pow(2).sum(0).to(fisher.dtype))
    return grad


def per_sample_fisher(per_sample_grads: torch.Tensor) -> torch.Tensor:
    """``F = mean_n g_n^2`` from materialized per-sample gradients ``[N, ...]``."""
    return per_sample_grads.pow(2).mean(0)


def pema_update_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    lam: float = 1e-5,
    beta_fallback: float = 0.99,
) -> torch.Tensor:
    """PEMA (SPEC section 3), ``torch._foreach``-style reference, in place on ``emas``.

    Per element: ``beta = (g + 1) / (F * (theta - theta*) + lam)``; where
    ``beta`` is not strictly inside ``(0, 1)`` (NaN and inf included) it becomes
    ``beta_fallback``; ``theta* <- beta theta* + (1 - beta) theta``. An element
    whose ``theta`` or ``theta*`` is not finite keeps its ``theta*`` untouched.
    Returns an int64 tensor ``[2]``: (fallback elements, non-finite skips).
    """
    counts = torch.zeros(2, dtype=torch.int64, device=emas[0].device if len(emas) else "cpu")
    for p, e, g, f in zip(params, emas, grads, fishers):
        pf, ef, gf, ff = (t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t for t in (p, e, g, f))
        beta = (gf + 1) / (ff * (pf - ef) + lam)
        ok = (beta > 0) & (beta < 1)
        counts[0] += (~ok).sum()
        beta = torch.where(ok, beta, torch.full_like(beta, beta_fallback))
        new = beta * ef + (1 - beta) * pf
        finite = torch.isfinite(new)
        counts[1] += (~finite).sum()
        e.copy_(torch.where(finite, new, ef).to(e.dtype))
    return counts


def dema_update_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    prev_grads: Sequence[torch.Tensor],
    alpha_fallback: float = 0.01,
) -> torch.Tensor:
    """DEMA / CIA (SPEC section 4), one scalar per tensor, in place.

    ``a = |theta - theta*|_1, b = |g|_1, c = |g - g_prev|_1``,
    ``alpha = 2 (1 + b) / (a c)``, fallback ``alpha_fallback`` unless
    ``0 < alpha < 1``; ``theta* <- (1 - alpha) theta* + alpha theta``;
    ``g_prev <- g``. Returns the float64 tensor of the alphas used.
    """
    alphas = []
    for p, e, g, gp in zip(params, emas, grads, prev_grads):
        p, g = p.detach(), g.detach()
        a = (p.double() - e.double()).abs().sum()
        b = g.double().abs().sum()
        c = (g.double() - gp.double()).abs().sum()
        alpha = 2 * (1 + b) / (a * c)
        if not (0 < float(alpha) < 1):
            alpha = torch.tensor(alpha_fallback, dtype=torch.float64)
        e.copy_(((1 - alpha) * e.double() + alpha * p.double()).to(e.dtype))
        gp.copy_(g)
        alphas.append(alpha.to(torch.float64))
    return torch.stack(alphas) if alphas else torch.zeros(0, dtype=torch.float64)
