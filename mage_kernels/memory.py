"""Persistent memory of the continual-learning state, measured on the tensors actually held.

:func:`persistent_state_bytes` answers "how many bytes does this method keep
alive between steps?" for :class:`~mage_kernels.PEMA` (``theta*``: one copy per
trained tensor; :class:`~mage_kernels.FixedEMA` the same), :class:`~mage_kernels.DEMA` (``theta*`` and ``g_prev``: two
copies), :class:`~mage_kernels.Fisher` (its sum buffers), any ``nn.Module``
(its buffers, plus the Fisher buffers attached to its :class:`MageLinear`
layers), a tensor, or a list / dict of these. It does not compute a formula:
it walks the tensors the object holds and adds the size of every distinct
storage once (two views of one buffer count once; a tensor that shares the
storage of a parameter still counts, since the object keeps it alive).
"""

from __future__ import annotations

from typing import Iterable, List, Mapping

import torch
from torch import nn

__all__ = ["persistent_state_bytes", "held_tensors"]


def held_tensors(obj: object) -> List[torch.Tensor]:
    """The tensors ``obj`` keeps alive, as :func:`persistent_state_bytes` counts them."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if hasattr(obj, "persistent_tensors") and callable(obj.persistent_tensors):
        return list(obj.persistent_tensors())
    if isinstance(obj, nn.Module):
        from .layer import MageLinear

        out = list(obj.buffers())
        for m in obj.modules():
            if isinstance(m, MageLinear):
                out += [t for t in (m.fisher_a, m.fisher_b, m.fisher_token_weight) if t is not None]
        return out
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in held_tensors(v)]
    if isinstance(obj, (list, tuple, set)):
        return [t for v in obj for t in held_tensors(v)]
    raise TypeError(
        f"persistent_state_bytes does not know what a {type(obj).__name__} holds; pass a PEMA, DEMA, FixedEMA, Fisher, "
        "nn.Module, tensor, or a list/dict of them"
    )


def _unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen = set()
    total = 0
    for t in tensors:
        if t.is_meta:
            total += t.numel() * t.element_size()
            continue
        st = t.untyped_storage()
        key = (t.device.type, t.device.index, st.data_ptr())
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def persistent_state_bytes(obj: object) -> int:
    """Bytes of the distinct storages held by ``obj`` (see the module docstring)."""
    return _unique_storage_bytes(held_tensors(obj))
