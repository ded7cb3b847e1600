"""PEFT interop: export MAGE adapters as PEFT LoRA directories and import PEFT LoRA directories.

The four equally weighted adapters of a :class:`mage_kernels.MageLinear` are one
LoRA of rank ``R = num_adapters * r`` (``A = cat(A_k)``, ``B = cat(B_k, dim=1)``)
with PEFT's scaling ``lora_alpha / R = alpha / (num_adapters * r)``: so

* :func:`export_peft` (default ``separate=False``) writes ONE PEFT LoRA of rank
  ``R`` with ``lora_alpha = alpha`` -- what PEFT's
  ``add_weighted_adapter(combination_type="cat")`` of the four would give;
  ``peft.PeftModel.from_pretrained(base, path)`` loads it and gives the same outputs;
* ``separate=True`` writes the adapters as PEFT adapters of rank ``r`` with
  ``lora_alpha = alpha / num_adapters`` each, in sub-directories named after them
  (``text_in/``, ``image_in/``, ``text_out/``, ``image_out/``: PEFT's own layout for
  several named adapters); loaded with ``PeftModel.from_pretrained`` +
  ``load_adapter`` and all activated (``model.base_model.set_adapter([...])``) they
  give the same outputs.

:func:`import_peft` reads a PEFT LoRA directory (one adapter) into MageLinear
layers with ``num_adapters=1`` (plain LoRA of rank ``r``), or with
``num_adapters=4`` into MAGE's four adapters by splitting a rank-``R`` LoRA
(``R % 4 == 0``, e.g. a "cat" export) into four rank-``R/4`` ones; a directory in
the ``separate`` layout is read back into four adapters. Supported: LoRA on
``nn.Linear`` (or bitsandbytes) layers, ``bias="none"``, plain scaling, the same
rank everywhere, weights in ``adapter_model.safetensors``. Refused with a clear
error: DoRA, rsLoRA, ``rank_pattern`` / ``alpha_pattern``, ``modules_to_save``,
trainable bias (``bias``, ``lora_bias``), ``fan_in_fan_out`` (GPT-2 Conv1D),
embedding/conv LoRA, ``layers_to_transform``, ``layer_replication``,
``target_parameters``, initializations that change the base weights (PiSSA,
OLoRA, LoftQ, CorDA...), and any other option set away from its default.
Loading is all or nothing, like :func:`mage_kernels.from_pretrained`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..inject import _named_modules_outside_mage, _record, _spec_matches, mage_layers
from ..pretrained import (
    WEIGHTS_NAME,
    _check_existing,
    _expected_shapes,
    _fail,
    _inject_and_load,
    _layer_config,
    _load_safetensors,
    _safetensors,
    _write_atomic,
    adapter_names,
)

__all__ = ["export_peft", "import_peft"]

CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<layer>.+)\.lora_(?P<ab>[AB])\.weight$")

# PEFT LoraConfig fields that do not change what a loaded LoRA computes.
_BENIGN = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "init_lora_weights", "layers_pattern", "megatron_core", "qalora_group_size", "ensure_weight_tying",
}
# init_lora_weights values that leave the base weights as they were.
_PLAIN_INITS = (True, False, "gaussian")


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError("export_peft needs the peft package (pip install peft)") from exc
    return peft


def _compact_targets(model: nn.Module, layers: List[str]) -> List[str]:
    """The shortest target list PEFT would match to exactly ``layers``: last name parts if they suffice."""
    keys = [k for k, _ in _named_modules_outside_mage(model)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if {k for k in keys if _spec_matches(tuple(suffixes), k)} == set(layers):
        return suffixes
    return list(layers)


def _lora_config(peft, r: int, lora_alpha: float, targets: List[str], dropout: float,
                 base_model_name_or_path: Optional[str], task_type: Optional[str]):
    return peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=dropout, bias="none",
        base_model_name_or_path=base_model_name_or_path, task_type=task_type, inference_mode=True,
    )


def export_peft(
    model: nn.Module,
    path: Union[str, os.PathLike],
    separate: bool = False,
    task_type: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
) -> None:
    """Write the model's adapters as a PEFT LoRA directory (see the module docstring).

    ``separate=False``: one LoRA of rank ``num_adapters * r`` with ``lora_alpha = alpha``
    in ``path``. ``separate=True``: one LoRA per adapter (rank ``r``, ``lora_alpha =
    alpha / num_adapters``) in ``path/<adapter name>/``. ``task_type`` (e.g.
    ``"CAUSAL_LM"``) is written to the config, so that ``PeftModel.from_pretrained``
    builds the matching ``PeftModelFor...`` class; ``base_model_name_or_path``
    defaults to the model's ``config._name_or_path``. Needs ``peft`` installed.
    """
    peft = _peft()
    path = os.fspath(path)
    layers, cfg = _layer_config(model)
    r, alpha, n, dropout = cfg["r"], cfg["alpha"], cfg["num_adapters"], cfg["dropout"]
    mage = dict(mage_layers(model))
    for name, layer in mage.items():
        for t in list(layer.lora_A) + list(layer.lora_B):
            if not torch.isfinite(t).all():
                raise ValueError(f"the adapters of {name} hold non-finite values; refusing to export them")
    targets = _compact_targets(model, layers)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory")
    st = _safetensors()

    def write(directory: str, tensors: Dict[str, torch.Tensor], rank: int, lora_alpha: float) -> None:
        os.makedirs(directory, exist_ok=True)
        _write_atomic(os.path.join(directory, WEIGHTS_NAME),
                      lambda f: st.save_file(tensors, f, metadata={"format": "pt"}))
        conf = _lora_config(peft, rank, lora_alpha, targets, dropout, base_model_name_or_path, task_type)
        conf.save_pretrained(directory)

    with torch.no_grad():
        if not separate:
            tensors = {}
            for name, layer in mage.items():
                a, b = layer.lora_weights()
                tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous().clone()
                tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous().clone()
            write(path, tensors, n * r, alpha)
            return
        for k, adapter in enumerate(adapter_names(n)):
            tensors = {}
            for name, layer in mage.items():
                tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A[k].detach().cpu().contiguous().clone()
                tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B[k].detach().cpu().contiguous().clone()
            write(os.path.join(path, adapter), tensors, r, alpha / n)


# ----------------------------------------------------------------------------- import


def _falsy(v: Any) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


def _read_peft_config(directory: str) -> Dict[str, Any]:
    file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(file):
        raise _fail(directory, f"no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        with open(file, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(file, f"not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _fail(file, "not a JSON object")
    if cfg.get("format") == "mage-kernels":
        raise _fail(file, "this is a mage-kernels adapter; load it with mage_kernels.from_pretrained")
    if cfg.get("peft_type") != "LORA":
        raise _fail(file, f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    named = {"use_dora": "DoRA", "use_rslora": "rsLoRA (scaling alpha/sqrt(r))", "modules_to_save": "modules_to_save",
             "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern", "lora_bias": "lora_bias",
             "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)"}
    for key, what in named.items():
        if not _falsy(cfg.get(key)):
            raise _fail(file, f"{what} is not supported ({key}={cfg[key]!r}); only plain LoRA on linear layers")
    if cfg.get("bias", "none") != "none":
        raise _fail(file, f"bias={cfg['bias']!r} is not supported (MageLinear trains no bias); only bias='none'")
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise _fail(file, f"init_lora_weights={init!r} is not supported: it changes the base weights in PEFT, so the "
                          "adapter is not relative to the plain base model")
    for key, value in cfg.items():
        if key not in _BENIGN and key not in named and key != "bias" and not _falsy(value):
            raise _fail(file, f"option {key}={value!r} is not supported (only plain LoRA on linear layers)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise _fail(file, f"r must be a positive integer; got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise _fail(file, f"lora_alpha must be a positive finite number; got {alpha!r}")
    dropout = cfg.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise _fail(file, f"lora_dropout must be in [0, 1); got {dropout!r}")
    return cfg


def _read_peft_weights(directory: str, rank: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A [rank, in], B [out, rank])}`` from a PEFT adapter file."""
    file = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(file) and os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        raise _fail(directory, "only adapter_model.safetensors is supported, not the pickled adapter_model.bin "
                               "(re-save it with PEFT's save_pretrained(safe_serialization=True))")
    tensors = _load_safetensors(file)
    found: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise _fail(file, f"tensor {key} is not a LoRA A/B weight of a linear layer (embedding, conv, DoRA "
                              "magnitude, bias and modules_to_save tensors are not supported)")
        found.setdefault(m["layer"], {})[m["ab"]] = t
    if not found:
        raise _fail(file, "holds no LoRA weights")
    out = {}
    for layer, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise _fail(file, f"layer {layer} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise _fail(file, f"layer {layer}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank "
                              f"r={rank} of {CONFIG_NAME} (per-layer ranks are not supported)")
        out[layer] = (a, b)
    return out


def import_peft(
    model: nn.Module,
    path: Union[str, os.PathLike],
    num_adapters: Optional[int] = None,
    is_trainable: bool = False,
) -> nn.Module:
    """Load a PEFT LoRA directory into ``model`` as MageLinear layers; returns the model.

    ``num_adapters=1`` (the default for a single PEFT adapter): a rank-``r`` LoRA with
    ``lora_alpha`` becomes ``MageLinear(r=r, alpha=lora_alpha, num_adapters=1)``.
    ``num_adapters=4``: a rank-``R`` LoRA is split into MAGE's four adapters of rank
    ``R/4`` (``alpha = lora_alpha``, same outputs); ``R`` must be divisible by 4. A
    directory in :func:`export_peft`'s ``separate`` layout (no config at the top, one
    sub-directory per adapter) is read into four adapters (``num_adapters`` None or 4).
    ``model`` is the plain base model the LoRA was trained on (or one already injected
    with the same layers and configuration); ``is_trainable`` as in
    :func:`mage_kernels.from_pretrained`. All or nothing; unsupported PEFT options
    raise ``ValueError`` naming them (see the module docstring).
    """
    path = os.fspath(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module; got {type(model).__name__}")
    if not os.path.isdir(path):
        raise _fail(path, "no such directory")
    names4 = adapter_names(4)
    separate = not os.path.isfile(os.path.join(path, CONFIG_NAME)) and all(
        os.path.isfile(os.path.join(path, a, CONFIG_NAME)) for a in names4)
    if num_adapters is not None and (isinstance(num_adapters, bool) or num_adapters not in (1, 4)):
        raise ValueError(f"num_adapters must be 1 or 4; got {num_adapters!r}")

    if separate:
        if num_adapters not in (None, 4):
            raise _fail(path, "holds four separate adapters (text_in/ ... image_out/); import them with num_adapters=4")
        cfgs = [_read_peft_config(os.path.join(path, a)) for a in names4]
        first = cfgs[0]
        for a, c in zip(names4[1:], cfgs[1:]):
            for key in ("r", "lora_alpha", "lora_dropout"):
                if c.get(key, 0.0) != first.get(key, 0.0):
                    raise _fail(os.path.join(path, a), f"{key}={c.get(key)!r} differs from text_in's "
                                                       f"{first.get(key)!r}; the four adapters must share it")
        r = first["r"]
        weights = [_read_peft_weights(os.path.join(path, a), r) for a in names4]
        if any(set(w) != set(weights[0]) for w in weights[1:]):
            raise _fail(path, "the four adapters do not cover the same layers")
        layers = list(weights[0])
        n, alpha = 4, 4 * float(first["lora_alpha"])  # per-adapter scaling lora_alpha / r = alpha / (4 r)
        state = {}
        for k, w in enumerate(weights):
            for layer, (a, b) in w.items():
                state[f"{layer}.lora_A.{k}"], state[f"{layer}.lora_B.{k}"] = a, b
        cfg = first
    else:
        cfg = _read_peft_config(path)
        rank = cfg["r"]
        found = _read_peft_weights(path, rank)
        n = 1 if num_adapters is None else num_adapters
        if rank % n:
            raise _fail(path, f"a rank-{rank} LoRA cannot be split into {n} equal adapters (r % {n} != 0)")
        r, alpha = rank // n, float(cfg["lora_alpha"])  # scaling alpha / (n r) = lora_alpha / rank
        layers = list(found)
        state = {}
        for layer, (a, b) in found.items():
            for k in range(n):
                state[f"{layer}.lora_A.{k}"] = a[k * r:(k + 1) * r].contiguous()
                state[f"{layer}.lora_B.{k}"] = b[:, k * r:(k + 1) * r].contiguous()
    dropout = float(cfg.get("lora_dropout", 0.0))
    # model order, so that the layers are listed as the model has them
    order = {name: i for i, (name, _) in enumerate(_named_modules_outside_mage(model))}
    layers.sort(key=lambda x: order.get(x, len(order)))
    mage_cfg = {"r": r, "alpha": alpha, "num_adapters": n, "dropout": dropout, "layers": layers}
    shapes = _expected_shapes(model, mage_cfg, path)
    for key, shape in shapes.items():
        v = state[key]
        if tuple(v.shape) != shape:
            raise _fail(path, f"{key} has shape {tuple(v.shape)} but this model needs {shape} (different base model?)")
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise _fail(path, f"{key} is not a finite floating-point tensor; the file is corrupt")
    already = _check_existing(model, mage_cfg, path)
    old = _record(model) or {}
    record = {"target_modules": cfg.get("target_modules") or layers, "exclude_modules": cfg.get("exclude_modules"),
              "history": list(old.get("history", [])) if already else []}
    return _inject_and_load(model, layers, r, alpha, dropout, n, state, record, is_trainable, already)
