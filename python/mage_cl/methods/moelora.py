"""MoELoRA baseline (Chen et al., NeurIPS'24 / CoIN): four rank-8 LoRA experts mixed by a per-token router.

ALGORITHM.md section 1: ``y = x W0^T + s * sum_k g_k(x) B_k A_k drop(x)`` with
``g(x) = softmax(x R^T)``, ``R: [4, d_in]`` (trainable, initialized N(0, 0.01^2),
so the gates start near 1/4). EW (:mod:`mage_cl.methods.mage`) is this with the
router replaced by equal weights. The gated sum cannot use the fused equal-weight
op, so :class:`MoELoRALinear` computes it with plain PyTorch ops; all four experts
and the router train on every task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mage_kernels as mk

from .base import Method

__all__ = ["MoELoRALinear", "MoELoRA"]


class MoELoRALinear(mk.MageLinear):
    """A :class:`mage_kernels.MageLinear` whose adapters are weighted per token by a softmax router."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        a0 = self.lora_A[0]
        self.router = nn.Parameter(torch.empty(self.num_adapters, self.in_features, device=a0.device, dtype=a0.dtype))
        with torch.no_grad():
            self.router.normal_(0.0, 0.01)

    @classmethod
    def from_mage(cls, layer: mk.MageLinear) -> "MoELoRALinear":
        new = cls(layer.in_features, layer.out_features, r=layer.r, alpha=layer.alpha, dropout=layer.dropout,
                  base=layer.base, num_adapters=layer.num_adapters)
        with torch.no_grad():
            for k in range(layer.num_adapters):
                new.lora_A[k].copy_(layer.lora_A[k])
                new.lora_B[k].copy_(layer.lora_B[k])
        return new

    def set_trainable(self, adapters) -> None:
        super().set_trainable(adapters)
        self.router.requires_grad_(True)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights ``softmax(x R^T)``: ``[..., num_adapters]``."""
        return torch.softmax(x @ self.router.t(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y = F.linear(x, self.base.weight, self.base.bias)
        xd = F.dropout(x, self.dropout, training=self.training) if self.dropout > 0 else x
        a, b = self.lora_weights()  # [4r, K], [N, 4r]
        u = xd @ a.t()  # [..., 4r]
        g = self.gates(x).repeat_interleave(self.r, dim=-1)  # [..., 4r]
        return y + self.scaling * ((u * g) @ b.t())


class MoELoRA(Method):
    name = "moelora"
    summary = "MoELoRA: four rank-8 experts mixed by a per-token softmax router"
    num_adapters = 4

    def setup(self, model: nn.Module, prepare=None) -> None:
        super().setup(model)  # the adapters; the engine's prepare (FSDP2's sharding) runs after the routers
        for name, layer in list(mk.mage_layers(model)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MoELoRALinear.from_mage(layer))
        if prepare is not None:
            prepare(model)
