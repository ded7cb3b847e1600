r"""Put :class:`MageLinear` into an existing model and manage its adapters model-wide.

``inject(model, target_modules=[...])`` replaces every ``nn.Linear`` (or
bitsandbytes linear) that ``target_modules`` selects by a ``MageLinear``
wrapping it, freezes every other parameter of ``model``, and returns the model.
The targets are matched as PEFT matches them (:func:`find_target_modules`):

* a list of names: a module is selected when its qualified name equals an
  entry or ends with ``"." + entry`` -- ``"q_proj"`` selects
  ``model.layers.0.self_attn.q_proj``, ``"to_out.0"`` selects
  ``...attn1.to_out.0``;
* a single string: a regular expression that must match the WHOLE qualified
  name (``re.fullmatch``), e.g. ``r"model\.language_model\..*\.(q_proj|v_proj)"``;
* ``exclude_modules``: the same two forms, applied first.

Pass the whole model and scope by pattern: ``inject`` freezes every parameter of
the module it is given, so calling it on a submodule (``model.language_model``)
would leave the rest of the model (vision tower, heads) trainable.

The helpers below act on all injected layers at once. :func:`for_task` with
``task=`` also records which task trained which adapters (:func:`task_history`),
the continual-learning history that :func:`mage_kernels.save_pretrained` writes.
:func:`merge_and_unload` folds the adapters back into plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .layer import ADAPTERS, AdapterRef, MageLinear
from .sharding import full_shape, full_tensor, load_full_

__all__ = [
    "LLAMA_TARGETS",
    "TargetSpec",
    "find_target_modules",
    "inject",
    "mage_layers",
    "set_trainable",
    "for_task",
    "task_history",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "adapter_parameters",
    "merge_and_unload",
]

#: The linears of a LLaMA block: attention q/k/v/o and MLP gate/up/down.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: ``target_modules`` / ``exclude_modules``: a list of names (exact or dotted suffix) or one full-match regex.
TargetSpec = Union[str, Sequence[str]]

# What the library remembers on the model itself (a plain attribute: survives deepcopy and pickling).
_RECORD = "_mage_kernels_record"


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__module__.startswith("bitsandbytes") and hasattr(m, "in_features")


def _check_spec(spec: Any, what: str) -> Union[str, Tuple[str, ...]]:
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as exc:
            raise ValueError(f"{what} {spec!r} is not a valid regular expression: {exc}") from None
        return spec
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(t, str) and t for t in spec):
        if not spec:
            raise ValueError(f"{what} is empty")
        return tuple(sorted(spec)) if isinstance(spec, (set, frozenset)) else tuple(spec)
    raise TypeError(f"{what} must be a regex string or a list of module names; got {spec!r}")


def _entry_matches(entry: str, key: str) -> bool:
    return key == entry or key.endswith("." + entry)


def _spec_matches(spec: Union[str, Tuple[str, ...]], key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(_entry_matches(e, key) for e in spec)


def _named_modules_outside_mage(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``model.named_modules()`` without the root and without what lies inside a MageLinear (its ``base``)."""
    out, inside = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        out.append((name, m))
        if isinstance(m, MageLinear):
            inside.append(name + ".")
    return out


def find_target_modules(
    model: nn.Module,
    target_modules: TargetSpec = LLAMA_TARGETS,
    exclude_modules: Optional[TargetSpec] = None,
) -> List[str]:
    """Qualified names of the linear layers :func:`inject` would replace, in model order.

    Matching is PEFT's (see the module docstring): list entries match a qualified
    name exactly or as a dotted suffix, a string is a full-match regex, and
    ``exclude_modules`` (same forms) removes modules first. Raises ``ValueError``
    naming the problem when a list entry (of either argument) matches no module of
    the model, when a selected module is not a linear layer (or is already a
    MageLinear), or when nothing is selected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module; got {type(model).__name__}")
    targets = _check_spec(target_modules, "target_modules")
    excludes = None if exclude_modules is None else _check_spec(exclude_modules, "exclude_modules")
    modules = _named_modules_outside_mage(model)
    for spec, what in ((targets, "target_modules"), (excludes, "exclude_modules")):
        if spec is None:
            continue
        if isinstance(spec, str):
            if not any(_spec_matches(spec, k) for k, _ in modules):
                raise ValueError(f"{what} regex {spec!r} matches no module of the model (it must match the whole "
                                 "qualified name, e.g. 'model.layers.0.self_attn.q_proj')")
        else:
            unmatched = [e for e in spec if not any(_entry_matches(e, k) for k, _ in modules)]
            if unmatched:
                raise ValueError(f"{what} entries {unmatched} match no module of the model (an entry matches a "
                                 "qualified name exactly or as a dotted suffix, e.g. 'q_proj' or 'to_out.0')")
    chosen, bad = [], []
    for key, m in modules:
        if excludes is not None and _spec_matches(excludes, key):
            continue
        if not _spec_matches(targets, key):
            continue
        if isinstance(m, MageLinear):
            bad.append(f"{key} (already a MageLinear)")
        elif _is_linear(m):
            chosen.append(key)
        else:
            bad.append(f"{key} ({type(m).__name__})")
    if bad:
        raise ValueError(f"target_modules selects {len(bad)} module(s) that cannot take adapters: "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; only nn.Linear and bitsandbytes "
                         "linears can (narrow the pattern or use exclude_modules)")
    if not chosen:
        shown = targets if isinstance(targets, str) else list(targets)
        raise ValueError(f"no linear layer of the model is named any of {shown}"
                         + (f" outside exclude_modules={excludes!r}" if excludes is not None else ""))
    return chosen


def _record(model: nn.Module, create: bool = False) -> Optional[Dict[str, Any]]:
    """The library's record on the model (target patterns, task history); unwraps DDP/DataParallel."""
    root = model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
    rec = root.__dict__.get(_RECORD)
    if rec is None and create:
        rec = {"target_modules": None, "exclude_modules": None, "history": []}
        root.__dict__[_RECORD] = rec
    return rec


def _spec_to_json(spec: Optional[TargetSpec]) -> Union[None, str, List[str]]:
    if spec is None or isinstance(spec, str):
        return spec
    return list(spec)


def _replace_layers(
    model: nn.Module, names: Sequence[str], r: int, alpha: float, dropout: float, num_adapters: int,
) -> List[Tuple[nn.Module, str, nn.Module]]:
    """Wrap each named linear in a MageLinear; returns ``(parent, attribute, original)`` to undo it.

    Every MageLinear is built before any is put into the model, so a bad argument
    (MageLinear validates r, alpha, dropout) leaves the model untouched.
    """
    plan = []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, attr)
        layer = MageLinear(child.in_features, child.out_features, r=r, alpha=alpha, dropout=dropout,
                           base=child, num_adapters=num_adapters)
        plan.append((parent, attr, child, layer))
    for parent, attr, _, layer in plan:
        setattr(parent, attr, layer)
    return [(parent, attr, child) for parent, attr, child, _ in plan]


def inject(
    model: nn.Module,
    target_modules: TargetSpec = LLAMA_TARGETS,
    r: int = 8,
    alpha: float = 32,
    dropout: float = 0.05,
    num_adapters: int = 4,
    freeze_base: bool = True,
    exclude_modules: Optional[TargetSpec] = None,
) -> nn.Module:
    """Replace the selected linears of ``model`` with :class:`MageLinear` and return ``model``.

    ``target_modules`` / ``exclude_modules`` select modules as PEFT does (see
    :func:`find_target_modules`: names match exactly or as a dotted suffix, a string
    is a full-match regex). With ``freeze_base`` every other parameter of ``model``
    is frozen: pass the whole model and scope by pattern, not a submodule. Raises
    ``ValueError`` (model unchanged) when the patterns select nothing, select a
    module that is not a linear layer, or have a list entry that matches nothing.
    """
    names = find_target_modules(model, target_modules, exclude_modules)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if freeze_base:
        model.requires_grad_(False)
    try:
        _replace_layers(model, names, r, alpha, dropout, num_adapters)
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    rec = _record(model, create=True)
    if rec["target_modules"] is None and len(names) == len(list(mage_layers(model))):
        rec["target_modules"] = _spec_to_json(target_modules)
        rec["exclude_modules"] = _spec_to_json(exclude_modules)
    else:  # a second inject call: the exact layer names are the only faithful description
        rec["target_modules"] = [n for n, _ in mage_layers(model)]
        rec["exclude_modules"] = None
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


def for_task(
    model: nn.Module, inputs: Iterable[str] = ("image", "text"), output: str = "text", task: Optional[str] = None,
) -> List[int]:
    """MAGE's modality freezing for a task, model-wide; returns the trained adapter indices.

    With ``task`` (a name, e.g. ``"vqa"``) the call is also appended to the model's
    continual-learning history (:func:`task_history`): ``{"task", "inputs", "output",
    "adapters"}``, in call order; calling it again for the task that is already last
    adds nothing. :func:`mage_kernels.save_pretrained` writes the history and
    :func:`mage_kernels.from_pretrained` restores it, so it grows across sessions.
    Without ``task`` nothing is recorded.
    """
    if task is not None and (not isinstance(task, str) or not task):
        raise ValueError(f"task must be a non-empty string naming the task; got {task!r}")
    inputs = sorted(set(inputs))
    chosen: List[int] = []
    for _, layer in _layers_or_raise(model):
        chosen = layer.for_task(inputs, output)
    if task is not None:
        history = _record(model, create=True)["history"]
        entry = {"task": task, "inputs": inputs, "output": output,
                 "adapters": [ADAPTERS[k] for k in chosen]}
        if not history or history[-1] != entry:
            history.append(entry)
    return chosen


def task_history(model: nn.Module) -> List[Dict[str, Any]]:
    """The tasks recorded by :func:`for_task` with ``task=`` (and restored by ``from_pretrained``), in order.

    Each entry is ``{"task": name, "inputs": [...], "output": modality, "adapters": [adapter names]}``.
    Returns a copy; an empty list when nothing was recorded.
    """
    rec = _record(model)
    return [dict(e) for e in rec["history"]] if rec else []


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


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and put back plain ``nn.Linear`` layers; returns the model.

    Every :class:`MageLinear` is replaced by its base ``nn.Linear`` holding
    ``W0 + s * B A`` (computed in float64, rounded once to the weight's dtype; a layer
    already merged with :meth:`MageLinear.merge` is just unwrapped), so the model has
    the vanilla architecture again and saves/loads as such (``model.save_pretrained``
    writes ``...q_proj.weight``, not ``...q_proj.base.weight``). PEFT's
    ``merge_and_unload`` does the same. When ``model`` is itself a MageLinear the
    merged linear is returned. All or nothing: a layer with a quantized
    (bitsandbytes) base, or with a :class:`mage_kernels.Fisher` still attached,
    raises ``ValueError`` naming it before anything changes.
    """
    layers = _layers_or_raise(model)
    for name, layer in layers:
        where = name or "<root>"
        if layer.quantized or not isinstance(layer.base, nn.Linear):
            raise ValueError(f"merge_and_unload: layer {where} has a {type(layer.base).__name__} base; a quantized "
                             "base cannot hold W0 + s*B*A (dequantize it to nn.Linear first, or keep the adapters)")
        if layer.fisher_a is not None:
            raise ValueError(f"merge_and_unload: a Fisher is attached to layer {where}; call fisher.remove() first")
    with torch.no_grad():
        for name, layer in layers:
            w = layer.base.weight
            if not layer.merged:
                a, b = layer.lora_weights()
                wide = torch.float64 if w.device.type != "mps" else torch.float32
                merged = w.to(wide) + layer.scaling * (b.to(wide) @ a.to(wide))
                w.copy_(merged.to(w.dtype))
            if not name:
                return layer.base
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, layer.base)
    root = model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
    root.__dict__.pop(_RECORD, None)
    return model
