"""Plain-PyTorch reference implementations of every kernel in the library.

These are the ground truth the Triton and CUDA kernels are tested against, and
the ``"torch"`` backend of the ops (see :mod:`mage_kernels.backends`). They favour
clarity over speed. Formulas follow ``ALGORITHM.md`` (the project's algorithm spec):

* §1: the four-adapter LoRA sum ``y = x W0^T + b + s * sum_k B_k A_k drop(x)``, and the
  dropout mask of the ``torch`` backend (:func:`dropout_keep_mask`);
* §2: per-sample squared-gradient Fisher diagonal;
* §3: PEMA, the damped elementwise EMA update;
* §4: DEMA (CIA), the layer-wise EMA baseline.

Notation used throughout: ``M`` tokens (rows of ``x``), ``K`` the input width
``d_in``, ``N`` the output width ``d_out``, ``R = num_adapters * r`` the total
rank. ``lora_a`` is the concatenation ``cat(A_0..A_3)`` with shape ``[R, K]`` and
``lora_b`` is ``cat(B_0..B_3, dim=1)`` with shape ``[N, R]``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "lora_linear",
    "dropout_keep_mask",
    "dropout",
    "shrink",
    "matmul_concat_k",
    "weight_grad_with_fisher",
    "pema_update_",
    "pema_update_foreach_",
    "dema_update_",
    "dema_step_",
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
    """Differentiable reference of the MAGE forward (ALGORITHM.md §1).

    ``y = x W0^T (+ bias) + scaling * (x_lora A^T) B^T``; ``x_lora`` is the
    dropped-out input of the adapters (``None`` means ``x`` itself). Autograd of
    this function is the reference for every backward kernel.
    """
    xl = x if x_lora is None else x_lora
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y + scaling * ((xl @ lora_a.t()) @ lora_b.t())


def dropout_keep_mask(m: int, k: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The ``torch`` backend's ``[m, k]`` bool keep-mask for the int64 ``seed`` (ALGORITHM.md §1).

    ``keep = U >= p`` with ``U`` float32 uniforms drawn by a ``torch.Generator`` of the
    seed's device seeded with ``seed``: the same seed gives the same mask, kept
    fraction ``1 - p`` (:func:`mage_kernels.lora_linear` on a CPU draws it once per forward and
    keeps it for the backward). The Triton
    kernels draw their mask from the same seed with Philox in the kernel
    (:mod:`mage_kernels.kernels.dropout`): same semantics and distribution, but NOT
    the same bits, so the two backends drop different elements for one seed.
    """
    gen = torch.Generator(device=seed.device)
    gen.manual_seed(int(seed.reshape(-1)[0].item()))
    return torch.rand((m, k), generator=gen, device=seed.device, dtype=torch.float32) >= p


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``drop(x) = keep * x / (1 - p)`` for a 2-D ``x`` (``keep`` defaults to :func:`dropout_keep_mask`)."""
    if keep is None:
        keep = dropout_keep_mask(x.shape[0], x.shape[1], p, seed)
    return torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))


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
    caller divides by the number of samples seen (ALGORITHM.md §2).
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


def _pema_compute_view(t: torch.Tensor) -> torch.Tensor:
    """PEMA computes in float32 for half-precision tensors, else in the tensor's own dtype."""
    return t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t


def pema_update_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    lam: float = 1e-5,
    beta_fallback: float = 0.99,
) -> torch.Tensor:
    """PEMA (ALGORITHM.md §3), the readable per-tensor reference, in place on ``emas``.

    Per element: ``beta = (g + 1) / (F * (theta - theta*) + lam)``; where
    ``beta`` is not strictly inside ``(0, 1)`` (NaN and inf included) it becomes
    ``beta_fallback``; ``new = beta theta* + (1 - beta) theta``; where ``new``
    is not finite, ``theta*`` is kept (so it never turns NaN). Half-precision
    tensors are computed in float32. Returns an int64 tensor ``[2]`` on the
    EMAs' device: (fallback elements, non-finite skips).
    :func:`pema_update_foreach_` is the same computation with ``torch._foreach``
    ops (the ``"torch"`` backend of ``torch.ops.mage.pema_update_``).
    """
    counts = torch.zeros(2, dtype=torch.int64, device=emas[0].device if len(emas) else "cpu")
    for p, e, g, f in zip(params, emas, grads, fishers):
        pf, ef, gf, ff = (_pema_compute_view(t) for t in (p, e, g, f))
        beta = (gf + 1) / (ff * (pf - ef) + lam)
        ok = (beta > 0) & (beta < 1)
        counts[0] += (~ok).sum()
        beta = torch.where(ok, beta, torch.full_like(beta, beta_fallback))
        new = beta * ef + (1 - beta) * pf
        finite = torch.isfinite(new)
        counts[1] += (~finite).sum()
        e.copy_(torch.where(finite, new, ef).to(e.dtype))
    return counts


def pema_update_foreach_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    lam: float = 1e-5,
    beta_fallback: float = 0.99,
) -> torch.Tensor:
    """PEMA (ALGORITHM.md §3) with ``torch._foreach_*`` multi-tensor ops, in place on ``emas``.

    Exactly the semantics (and, element by element, the same floating-point
    operations in the same order, hence bitwise the same results) as
    :func:`pema_update_`; it is the ``"torch"`` backend of
    ``torch.ops.mage.pema_update_``. The arithmetic runs as a handful of
    multi-tensor launches over all tensors; PyTorch has no ``_foreach``
    compare/select ops, so the two masked selections (``beta`` fallback, keeping
    ``theta*`` where ``new`` is not finite) and their counts are one
    ``torch.where`` per tensor.

    Returns an int64 tensor ``[2]`` on the EMAs' device: (fallback elements,
    non-finite skips). No host synchronization.
    """
    n = len(emas)
    if not (len(params) == len(grads) == len(fishers) == n):
        raise ValueError(
            f"pema_update_foreach_ needs lists of equal length; got params={len(params)}, emas={n}, "
            f"grads={len(grads)}, fishers={len(fishers)}"
        )
    if n == 0:
        return torch.zeros(2, dtype=torch.int64)
    pf = [_pema_compute_view(t) for t in params]
    ef = [_pema_compute_view(t) for t in emas]
    gf = [_pema_compute_view(t) for t in grads]
    ff = [_pema_compute_view(t) for t in fishers]
    # beta = (g + 1) / (F * (theta - theta*) + lam); out-of-place ops keep the per-pair type promotion.
    den = torch._foreach_mul(ff, torch._foreach_sub(pf, ef))
    torch._foreach_add_(den, lam)
    beta = torch._foreach_div(torch._foreach_add(gf, 1), den)
    del den
    oks = [(b > 0) & (b < 1) for b in beta]
    beta = [torch.where(ok, b, torch.full_like(b, beta_fallback)) for ok, b in zip(oks, beta)]
    # new = beta * theta* + (1 - beta) * theta
    one_minus_beta = torch._foreach_add(torch._foreach_neg(beta), 1)
    new = torch._foreach_add(torch._foreach_mul(beta, ef), torch._foreach_mul(one_minus_beta, pf))
    del beta, one_minus_beta
    finites = [torch.isfinite(t) for t in new]
    kept = [torch.where(fin, t, e) for fin, t, e in zip(finites, new, ef)]
    torch._foreach_copy_(list(emas), kept)  # copy_ casts back to each EMA's dtype
    fallbacks = torch.stack([(~ok).sum() for ok in oks]).sum()
    skipped = torch.stack([(~fin).sum() for fin in finites]).sum()
    return torch.stack([fallbacks, skipped]).to(torch.int64)


def dema_step_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    prev_grads: Sequence[torch.Tensor],
    alpha_fallback: float = 0.01,
    reduce_norms: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DEMA / CIA (ALGORITHM.md §4), one scalar per tensor, in place on ``emas`` and ``prev_grads``.

    ``a = |theta - theta*|_1, b = |g|_1, c = |g - g_prev|_1`` (all three in
    float64, from the tensors' exact values: no rounding to the parameter
    dtype), ``alpha = 2 (1 + b) / (a c)``, ``alpha_fallback`` unless
    ``0 < alpha < 1`` (NaN included); ``theta* <- (1 - alpha) theta* + alpha
    theta`` computed in float64 and rounded once to the EMA's dtype;
    ``g_prev <- g``.

    Returns ``(alphas, counts)`` on the EMAs' device, without host
    synchronization: the float64 alphas used (one per tensor) and int64 ``[2]``
    (tensors that used the fallback, tensors whose ``a``, ``b`` or ``c`` was not
    finite). This is the one implementation behind :class:`mage_kernels.DEMA`.

    ``reduce_norms``, when given, receives the float64 ``[3, n]`` stack of the
    tensors' partial norms ``(a, b, c)`` and returns their whole-tensor values:
    under sharding each rank passes its parts and sums the norms over the ranks
    (ALGORITHM.md §7), so every rank computes the same alphas.
    """
    n = len(emas)
    if not (len(params) == len(grads) == len(prev_grads) == n):
        raise ValueError(
            f"dema_step_ needs lists of equal length; got params={len(params)}, emas={n}, "
            f"grads={len(grads)}, prev_grads={len(prev_grads)}"
        )
    if n == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)
    device = emas[0].device
    # One tensor at a time, so the float64 temporaries never exceed one tensor's size.
    norms: List[torch.Tensor] = []
    for p, e, g, gp in zip(params, emas, grads, prev_grads):
        p64, e64, g64 = p.detach().double(), e.double(), g.detach().double()
        norms.append(torch.stack([
            (p64 - e64).abs().sum(),  # a
            g64.abs().sum(),  # b
            (g64 - gp.double()).abs().sum(),  # c
        ]).to(device))
    stacked = torch.stack(norms, dim=1)
    if reduce_norms is not None:
        stacked = reduce_norms(stacked)
    a, b, c = stacked
    raw = 2 * (1 + b) / (a * c)
    ok = (raw > 0) & (raw < 1)
    alphas = torch.where(ok, raw, torch.full_like(raw, alpha_fallback))
    for i, (p, e) in enumerate(zip(params, emas)):
        alpha = alphas[i]
        e.copy_(((1 - alpha) * e.double() + alpha * p.detach().double()).to(e.dtype))
    for g, gp in zip(grads, prev_grads):
        gp.copy_(g.detach())
    finite = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(c)
    counts = torch.stack([(~ok).sum(), (~finite).sum()]).to(torch.int64)
    return alphas, counts


def dema_update_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    prev_grads: Sequence[torch.Tensor],
    alpha_fallback: float = 0.01,
) -> torch.Tensor:
    """DEMA / CIA (ALGORITHM.md §4) in place; returns the float64 alphas used (see :func:`dema_step_`)."""
    return dema_step_(params, emas, grads, prev_grads, alpha_fallback)[0]
