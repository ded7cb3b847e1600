"""Whole-tensor access to DeepSpeed parameters (ZeRO 1, 2 and 3): gather one, or write one everywhere.

Kept apart from :mod:`mage_kernels.integrations.deepspeed` so that :mod:`mage_kernels.sharding`
can use them without importing the integration (which builds on ``sharding``). ``deepspeed``
itself is imported only when a ZeRO-3 parameter is gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_full", "load_full_"]


def gather_full(p: torch.Tensor) -> torch.Tensor:
    """The whole value of a ZeRO-3 parameter (a collective over its group), detached; other params as they are."""
    if not hasattr(p, "ds_id"):
        return p.detach()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Still gathered by a module (e.g. right after a backward): releasing it here would break that module.
    # The status is the same on every rank (the ranks run the same modules in the same order), so every
    # rank skips the collective below together.
    if p.ds_status == ZeroParamStatus.AVAILABLE:
        return p.data.detach().clone().view(p.ds_shape)
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.data.detach().clone().view(p.ds_shape)


def load_full_(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole tensor ``value`` into a DeepSpeed parameter: the model's copy and the optimizer's fp32 master.

    No collective: every rank passes the same ``value`` and writes what it holds.
    """
    v = value.detach().reshape(-1)
    with torch.no_grad():
        if hasattr(p, "ds_id"):  # ZeRO-3
            size = int(p.ds_tensor.ds_numel)
            group = getattr(p, "ds_process_group", None)
            start = dist.get_rank(group=group) * size
            n = max(0, min(size, int(p.ds_numel) - start))
            own = v.narrow(0, start, n)
            p.ds_tensor.data.view(-1).narrow(0, 0, n).copy_(own)
            if p.data.numel() == p.ds_numel:
                p.data.copy_(value.view(p.data.shape))
            zero = getattr(p, "_z3_optimizer", None)
            if zero is not None and p.requires_grad and zero.get_param_id(p) in zero.grad_position:
                group_idx, dest, _ = zero.grad_position[zero.get_param_id(p)]
                zero.fp32_partitioned_groups_flat[group_idx].narrow(0, int(dest), n).copy_(own)
            return
        p.data.copy_(value.view(p.shape))  # ZeRO 1 / 2: the model's copy is whole
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            addr = mapping.lp_fragment_address
            mapping.hp_fragment.copy_(v.narrow(0, addr.start, addr.numel))
