"""PEMA as the authors' released code writes it: a dense ``d x d`` inverse per tensor (ALGORITHM.md §6).

A *reference baseline*, not the library's PEMA (:class:`mage_kernels.PEMA`, ALGORITHM.md §3),
kept to measure what the elementwise form saves and how the dense form behaves. For every
trained adapter tensor ``theta`` (``lora_A`` ``[r, d_in]`` or ``lora_B`` ``[d_out, r]``), at
every step, with the step's batch gradient ``g`` (after clipping) and ``theta*`` copied from
``theta`` at the task's start::

    D      = g * g                                   squares of the BATCH gradient
    C      = (theta - theta*)^T @ D + lam * I        [d_in, d_in] for A, [r, r] for B
    alpha  = (g + 1) @ inverse(C)                    same shape as theta, float32
    theta* = alpha * theta* + (1 - alpha) * theta    no clamp
    if anything raises: theta* = 0.99 theta* + 0.01 theta

The authors call it *before* ``optimizer.step()``; the driver's ``mage-authors`` method does
the same. Per tensor this builds and inverts a ``d x d`` matrix every step: O(d^2) memory and
O(d^3) time, against the elementwise form's O(r d). ``C`` has rank at most ``r`` plus the
damping, so most of its inverse is ``1 / lam``: ``alpha`` is typically far outside ``(0, 1)``.
The counters below make that visible.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .ema import GradSource, _TaskEMA
from .sharding import Sharding, WholeTensor

__all__ = ["authors_pema_update_", "AuthorsPEMA", "AuthorsPEMAStats"]


class AuthorsPEMAStats:
    """Counts of one or more updates: elements, alpha outside (0, 1), non-finite alphas / theta*, exceptions."""

    __slots__ = ("elements", "outside", "nonfinite_alpha", "nonfinite_ema", "exceptions")

    def __init__(self) -> None:
        self.elements = self.outside = self.nonfinite_alpha = self.nonfinite_ema = self.exceptions = 0

    def add(self, other: "AuthorsPEMAStats") -> None:
        for k in self.__slots__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return "AuthorsPEMAStats(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


def _alpha(theta: torch.Tensor, ema: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """``(g + 1) @ inverse((theta - theta*)^T @ (g * g) + lam I)`` in float32 (the authors' dtype)."""
    t, e, g = (x.detach().to(torch.float32) for x in (theta, ema, g))
    c = (t - e).transpose(-2, -1) @ (g * g)
    c = c + lam * torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    return (g + 1) @ torch.linalg.inv(c)


def authors_pema_update_(params: Sequence[torch.Tensor], emas: Sequence[torch.Tensor],
                         grads: Sequence[torch.Tensor], lam: float = 1e-5,
                         fallback: float = 0.99) -> AuthorsPEMAStats:
    """One step of the authors' PEMA, in place on ``emas`` (ALGORITHM.md §6).

    Every tensor must be 2-D (a LoRA factor). Returns the step's counts. Exceptions of the
    inverse (a singular ``C``) take the authors' fallback ``theta* = fallback theta* +
    (1 - fallback) theta`` for that tensor and are counted, as are alphas outside ``(0, 1)``,
    non-finite alphas and non-finite results (which are written, as the authors' code does).
    """
    if not (len(params) == len(emas) == len(grads)):
        raise ValueError(f"authors_pema_update_ needs lists of equal length; got {len(params)}, {len(emas)}, "
                         f"{len(grads)}")
    stats = AuthorsPEMAStats()
    with torch.no_grad():
        for i, (p, e, g) in enumerate(zip(params, emas, grads)):
            if p.dim() != 2 or e.shape != p.shape or g.shape != p.shape:
                raise ValueError(f"authors_pema_update_: tensor {i} must be 2-D with matching shapes; got "
                                 f"param {tuple(p.shape)}, ema {tuple(e.shape)}, grad {tuple(g.shape)}")
            stats.elements += p.numel()
            try:
                alpha = _alpha(p, e, g, lam)
            except (RuntimeError, torch.linalg.LinAlgError):
                stats.exceptions += 1
                e.mul_(fallback).add_(p.detach().to(e.dtype), alpha=1 - fallback)
                continue
            finite = torch.isfinite(alpha)
            stats.nonfinite_alpha += int((~finite).sum())
            stats.outside += int((finite & ((alpha <= 0) | (alpha >= 1))).sum())
            new = alpha * e.to(torch.float32) + (1 - alpha) * p.detach().to(torch.float32)
            stats.nonfinite_ema += int((~torch.isfinite(new)).sum())
            e.copy_(new.to(e.dtype))
    return stats


class AuthorsPEMA(_TaskEMA):
    """The authors' PEMA over a model's trainable adapters, with :class:`mage_kernels.PEMA`'s interface.

    Call :meth:`update` after ``backward()`` (and gradient clipping) and BEFORE
    ``optimizer.step()``, as the authors do. Under FSDP2 or DeepSpeed ZeRO it needs
    ``sharding=mage_kernels.sharding.Gathered()`` (whole ``theta*`` on every rank, whole
    ``theta`` gathered each step) and the whole gradients passed to :meth:`update`; a
    sharding that splits the tensors is refused. ``stats`` accumulates the counts of the task
    (:class:`AuthorsPEMAStats`); :meth:`finish_task` sets ``theta <- theta*`` except for tensors
    whose average is not finite.
    """

    def __init__(self, model: nn.Module, lam: float = 1e-5, fallback: float = 0.99,
                 sharding: Optional[Sharding] = None) -> None:
        if not lam > 0:
            raise ValueError(f"lam must be positive; got {lam}")
        if not 0 < fallback < 1:
            raise ValueError(f"fallback must be in (0, 1); got {fallback}")
        self.lam = float(lam)
        self.fallback = float(fallback)
        self.stats = AuthorsPEMAStats()
        super().__init__(model, sharding)

    def start_task(self, sharding: Optional[Sharding] = None) -> None:
        super().start_task(sharding)
        if any(part.sharded for part in self.parts):
            raise ValueError(
                "AuthorsPEMA needs whole tensors (its d x d matrix mixes every row of theta): under FSDP2 or "
                "DeepSpeed ZeRO pass sharding=mage_kernels.sharding.Gathered() and the whole gradients, "
                "update(grads={name: grad})"
            )
        self.stats = AuthorsPEMAStats()

    def update(self, fisher: object = None, grads: Optional[GradSource] = None) -> AuthorsPEMAStats:
        """One step (the ``fisher`` argument is ignored: this form uses batch-gradient squares).

        With :class:`mage_kernels.sharding.Gathered` every call gathers the whole ``theta``
        of each tensor (a collective under FSDP2 / ZeRO-3) and ``grads`` must hold whole gradients.
        """
        grad_list = self._gradients(grads)
        whole = all(isinstance(part, WholeTensor) for part in self.parts)
        thetas = self.params if whole else [part.theta() for part in self.parts]
        step = authors_pema_update_(thetas, self.emas, grad_list, self.lam, self.fallback)
        self.stats.add(step)
        self.steps += 1
        return step

    def persistent_tensors(self) -> List[torch.Tensor]:
        return list(self.emas)
