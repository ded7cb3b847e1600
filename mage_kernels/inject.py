"""Put :class:`MageLinear` into an existing model and manage its adapters model-wide.

``inject(model, target_modules=["q_proj", "v_proj", ...])`` replaces every
``nn.Linear`` (or bitsandbytes linear) whose attribute name is in
``target_modules`` by a ``MageLinear`` wrapping it, freezes everything else,
and returns the model. The helpers below act on all injected layers at once.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from .layer import AdapterRef, MageLinear
from .sharding import full_shape, full_tensor, load_full_

__all__ = [
    "LLAMA_TARGETS",
    "inject",
    "mage_layers",
    "set_trainable",
    "for_task",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "adapter_parameters",
]

#: The linears of a LLaMA block: attention q/k/v/o and MLP gate/up/down.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__module__.startswith("bitsandbytes") and hasattr(m, "in_features")


def inject(
    model: nn.Module,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    r: int = 8,
    alpha: float = 32,
    dropout: float = 0.05,
    num_adapters: int = 4,
    freeze_base: bool = True,
) -> nn.Module:
    """Replace the named linears of ``model`` with :class:`MageLinear` and return ``model``.

    A module is replaced when the last component of its qualified name is in
    ``target_modules`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``)
    or its full qualified name is. With ``freeze_base`` every other parameter
    of the model is frozen too. Raises ``ValueError`` when nothing matched.
    """
    targets = set(target_modules)
    if freeze_base:
        model.requires_grad_(False)
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, MageLinear) or not _is_linear(child):
                continue
            if child_name in targets or full in targets:
                layer = MageLinear(
                    child.in_features, child.out_features, r=r, alpha=alpha, dropout=dropout,
                    base=child, num_adapters=num_adapters,
                )
                setattr(module, child_name, layer)
                replaced += 1
    if replaced == 0:
        raise ValueError(f"no linear layer of the model is named any of {sorted(targets)}")
    return model


def mage_layers(model: nn.Module) -> Iterator[Tuple[str, MageLinear]]:
    """``(qualified name, layer)`` for every :class:`MageLinear` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, MageLinear):
            yield name, m


def _layers_or_raise(model: nn.Module) -> List[Tuple[str, MageLinear]]:
    layers = list(mage_layers(model))
    if not layers:
        raise ValueError("the model has no MageLinear layers; call mage_kernels.inject(model) first")
    return layers


def set_trainable(model: nn.Module, adapters: Iterable[AdapterRef]) -> None:
    """Train exactly these adapters in every MageLinear of ``model``."""
    adapters = list(adapters)
    for _, layer in _layers_or_raise(model):
        layer.set_trainable(adapters)


def for_task(model: nn.Module, inputs: Iterable[str] = ("image", "text"), output: str = "text") -> List[int]:
    """MAGE's modality freezing for a task, model-wide; returns the trained adapter indices."""
    inputs = list(inputs)
    chosen: List[int] = []
    for _, layer in _layers_or_raise(model):
        chosen = layer.for_task(inputs, output)
    return chosen


def adapter_parameters(model: nn.Module, trainable_only: bool = True) -> Iterator[Tuple[str, nn.Parameter]]:
    """Named adapter parameters (``...lora_A.k`` / ``...lora_B.k``) of every MageLinear."""
    for name, layer in _layers_or_raise(model):
        for pname, p in layer.named_parameters(recurse=True):
            if not pname.startswith("lora_"):
                continue
            if trainable_only and not p.requires_grad:
                continue
            yield (f"{name}.{pname}" if name else pname), p


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapters' tensors (all of them, frozen included), detached whole copies on CPU.

    Under a sharding engine (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions) each tensor is
    gathered whole (ALGORITHM.md §7): a collective, so every rank calls it and gets the
    same dict; let rank 0 write it. It loads into a sharded or a single-process model.
    """
    return {k: full_tensor(v).cpu().clone() for k, v in adapter_parameters(model, trainable_only=False)}


def load_adapter_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load adapters saved by :func:`adapter_state_dict`, all or nothing.

    Every entry is checked first -- names (when ``strict``), types, shapes, and that the
    values are finite once converted to the parameter's dtype -- and only then are the
    tensors copied, so a bad entry anywhere leaves the model unchanged. Raises
    ``KeyError`` for missing/unexpected keys, ``ValueError`` for a shape mismatch or a
    non-finite value (a corrupt checkpoint), naming the first offending key.

    The entries are whole tensors; in a sharded model (FSDP2, DeepSpeed ZeRO) each rank
    writes the part it holds (and, under DeepSpeed, the optimizer's fp32 master copy),
    so every rank loads the same dict.
    """
    own = dict(adapter_parameters(model, trainable_only=False))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"adapter state mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    staged = []
    for k, p in own.items():
        if k not in state:
            continue
        v = state[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(full_shape(p)):
            raise ValueError(f"adapter {k}: expected shape {tuple(full_shape(p))}, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if not v.is_floating_point():
            raise ValueError(f"adapter {k}: expected a floating-point tensor, got {v.dtype}")
        v = v.detach().to(device=p.device, dtype=p.dtype)
        if not torch.isfinite(v).all():
            raise ValueError(f"adapter {k} holds non-finite values (in {p.dtype}); the checkpoint is corrupt")
        staged.append((p, v))
    with torch.no_grad():  # nothing below can fail on a validated entry
        for p, v in staged:
            load_full_(p, v)
