"""RegLoRA baseline (SEFE, Chen et al., ICML'25) on one rank-32 LoRA.

Paper 9.4: RegLoRA "identifies important LoRA parameters and applies dynamic
regularization masks to limit disruptive updates". Reading used here (following
SEFE, where the key elements are those of the LoRA weight update ``dW = s B A``):
after each task, in every adapted layer the ``top_fraction`` (default 2%) of the
elements of ``dW`` with the largest magnitude are marked important (the masks of
all earlier tasks are kept: a union), and ``dW`` at that moment is stored as the
reference. On later tasks

    loss += lambda * sum_layers sum_{masked (i, j)} (dW_ij - dW_ref_ij)^2

so the key elements of the earlier tasks' updates are held in place while the rest
of ``dW`` (and the low-rank factors) stay free. State: one bool mask and one
reference value per masked element (stored densely here: ``d_out x d_in`` each).

The penalty needs whole ``A`` and ``B``. Where every rank holds them whole between forwards
(one process, DDP, DeepSpeed ZeRO-1/2) it joins the loss; under FSDP2 and ZeRO-3 each step
gathers the adapters, differentiates the same penalty on the whole copies and adds that
gradient to the engine's (:meth:`~mage_cl.engines.TaskSteps.set_full_grad`) before clipping.
Masks and references are whole on every rank under every engine.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

import mage_kernels as mk
from mage_kernels.sharding import full_tensor

from .base import Method, tensor_bytes

__all__ = ["RegLoRA"]


def _factors(layer, whole: Callable[[nn.Parameter], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``layer.lora_weights()`` -- the concatenated ``(A, B)`` -- made of ``whole(p)`` for each adapter tensor."""
    return torch.cat([whole(p) for p in layer.lora_A], 0), torch.cat([whole(p) for p in layer.lora_B], 1)


class RegLoRA(Method):
    name = "reglora"
    summary = "RegLoRA: regularizes the largest elements of earlier tasks' LoRA updates"

    def __init__(self, config=None, lam: float = 1e3, top_fraction: float = 0.02) -> None:
        super().__init__(config)
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1]; got {top_fraction}")
        self.lam = lam
        self.top_fraction = top_fraction
        self.mask: Dict[str, torch.Tensor] = {}
        self.ref: Dict[str, torch.Tensor] = {}

    def _penalty(self, weights: Callable[[nn.Module], Tuple[torch.Tensor, torch.Tensor]]) -> Optional[torch.Tensor]:
        """``lam * sum (dW - dW_ref)^2`` over the masked elements, ``dW = s B A`` from ``weights(layer) = (A, B)``."""
        total = None
        for name, layer in mk.mage_layers(self.model):
            m = self.mask.get(name)
            if m is None:
                continue
            a, b = weights(layer)
            diff = (layer.scaling * (b @ a) - self.ref[name])[m]
            term = diff.pow(2).sum()
            total = term if total is None else total + term
        return None if total is None else self.lam * total

    def _in_loss(self) -> bool:
        return self.steps is None or self.steps.whole_params

    def loss_extra(self, model) -> Optional[torch.Tensor]:
        if not self.mask or not self._in_loss():
            return None
        return self._penalty(lambda layer: layer.lora_weights())

    def after_backward(self) -> None:
        """FSDP2 / ZeRO-3: the penalty's gradient on whole (gathered) copies, added to the engine's gradients."""
        if not self.mask or self._in_loss():
            return
        leaves: Dict[int, Tuple[nn.Parameter, torch.Tensor]] = {}

        def leaf(p):
            leaves[id(p)] = (p, full_tensor(p).clone().requires_grad_(p.requires_grad))
            return leaves[id(p)][1]

        with torch.enable_grad():
            total = self._penalty(lambda layer: _factors(layer, leaf))
        if total is None:
            return
        pairs = [(p, leaf) for p, leaf in leaves.values() if p.requires_grad]
        grads = torch.autograd.grad(total, [leaf for _, leaf in pairs], allow_unused=True)
        for (p, _), g in zip(pairs, grads):
            base = self.steps.full_grad(p)
            if base is not None and g is not None:
                self.steps.set_full_grad(p, base + g)

    @torch.no_grad()
    def after_task(self, task, train_batches) -> None:
        for name, layer in mk.mage_layers(self.model):
            a, b = _factors(layer, full_tensor)  # whole tensors under every engine
            dw = layer.scaling * (b @ a)
            k = max(1, int(round(self.top_fraction * dw.numel())))
            thresh = dw.abs().flatten().kthvalue(dw.numel() - k + 1).values
            new = dw.abs() >= thresh
            self.mask[name] = self.mask[name] | new if name in self.mask else new
            self.ref[name] = dw.detach().clone()

    def state_bytes(self) -> int:
        return tensor_bytes(self.mask.values()) + tensor_bytes(self.ref.values())

    def state_dict(self):
        return {"mask": {k: v.cpu() for k, v in self.mask.items()}, "ref": {k: v.cpu() for k, v in self.ref.items()}}

    def load_state_dict(self, state) -> None:
        dev = next(self.model.parameters()).device
        self.mask = {k: v.to(dev) for k, v in state.get("mask", {}).items()}
        self.ref = {k: v.to(dev) for k, v in state.get("ref", {}).items()}
