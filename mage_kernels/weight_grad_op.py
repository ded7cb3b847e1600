"""The ``mage::weight_grad_with_fisher`` custom op and its backend dispatch (ALGORITHM.md §2).

``torch.ops.mage.weight_grad_with_fisher(g, x, num_samples, scale, fisher, token_weight, fisher_scale)``
returns the batch weight gradient ``scale * g^T x`` and, when the float32
``fisher`` buffer is given, adds the per-sample squared gradients into it in
place::

    fisher += sum_n (fisher_scale * scale * g_n^T diag(w_n) x_n) ** 2

Semantics are exactly :func:`mage_kernels.reference.weight_grad_with_fisher`.

This module imports no Triton: the op (with its fake implementation for
``torch.compile``) is registered by a plain ``import mage_kernels`` and works
with the ``"torch"`` backend on machines without Triton. The Triton kernel
(:func:`mage_kernels.kernels.weight_grad.weight_grad_with_fisher`) is imported
only when the ``"triton"`` backend is chosen, and the CUDA extension's
``torch.ops.mage_cuda.weight_grad_with_fisher`` only for ``"cuda"``.

:func:`weight_grad_impl` is the one place that maps a backend name to an
implementation; both this op and the weight-gradient primitive of
:mod:`mage_kernels.lora_op` use it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import reference
from .backends import resolve_backend

__all__ = ["OP_SCHEMA", "OP_NAME", "weight_grad_impl", "weight_grad_with_fisher_op"]

#: Name of the op in :func:`mage_kernels.backends.resolve_backend` and in the CUDA extension.
OP_NAME = "weight_grad_with_fisher"

#: Schema of ``mage::weight_grad_with_fisher`` (the CUDA extension's
#: ``mage_cuda::weight_grad_with_fisher`` has the same one).
OP_SCHEMA = (
    "(Tensor g, Tensor x, int num_samples, float scale, Tensor(a!)? fisher, "
    "Tensor? token_weight, float fisher_scale) -> Tensor"
)

WeightGradFn = Callable[..., torch.Tensor]


def weight_grad_impl(backend_name: str) -> WeightGradFn:
    """The weight-gradient implementation of a concrete backend (``"torch"`` | ``"triton"`` | ``"cuda"``).

    All three take ``(g, x, num_samples, scale, fisher, token_weight, fisher_scale)``
    positionally and have the semantics of :func:`mage_kernels.reference.weight_grad_with_fisher`.
    Triton and the CUDA extension are imported here, lazily, only when asked for.
    """
    if backend_name == "torch":
        return reference.weight_grad_with_fisher
    if backend_name == "triton":
        from .kernels import weight_grad as triton_weight_grad

        return triton_weight_grad.weight_grad_with_fisher
    if backend_name == "cuda":
        from . import cuda_extension

        cuda_extension.load()  # registers torch.ops.mage_cuda.*
        return torch.ops.mage_cuda.weight_grad_with_fisher
    raise ValueError(f"weight_grad_impl: unknown concrete backend {backend_name!r} (torch, triton or cuda)")


@torch.library.custom_op("mage::" + OP_NAME, mutates_args=("fisher",), schema=OP_SCHEMA)
def _weight_grad_with_fisher_op(
    g: torch.Tensor,
    x: torch.Tensor,
    num_samples: int,
    scale: float,
    fisher: Optional[torch.Tensor],
    token_weight: Optional[torch.Tensor],
    fisher_scale: float,
) -> torch.Tensor:
    fn = weight_grad_impl(resolve_backend(g.device, OP_NAME, g.dtype))
    # Every implementation returns a fresh tensor (a custom op's output may not alias its inputs).
    return fn(g, x, num_samples, scale, fisher, token_weight, fisher_scale)


@_weight_grad_with_fisher_op.register_fake
def _(g, x, num_samples, scale, fisher, token_weight, fisher_scale):
    return g.new_empty((g.shape[1], x.shape[1]))


def weight_grad_with_fisher_op(
    g: torch.Tensor,
    x: torch.Tensor,
    num_samples: int,
    scale: float,
    fisher: Optional[torch.Tensor] = None,
    token_weight: Optional[torch.Tensor] = None,
    fisher_scale: float = 1.0,
) -> torch.Tensor:
    """``torch.ops.mage.weight_grad_with_fisher`` with keyword defaults; backend chosen per call.

    Args:
        g: ``[M, P]``; x: ``[M, Q]`` (same dtype), ``M = num_samples * T`` tokens.
        num_samples: ``N`` (only used with ``fisher``; ``M % N`` must be 0).
        scale: the LoRA scaling ``s``.
        fisher: optional float32 ``[P, Q]`` buffer, updated in place.
        token_weight: optional ``[M]`` per-token Fisher weight (0 for padding).
        fisher_scale: factor turning the incoming gradient into a per-sample one.

    Returns:
        The batch gradient ``scale * g^T x`` (``[P, Q]``, ``g.dtype``).
    """
    return torch.ops.mage.weight_grad_with_fisher(
        g, x, int(num_samples), float(scale), fisher, token_weight, float(fisher_scale)
    )
