"""Save and load MAGE adapters as a directory, the way PEFT does (``save_pretrained`` / ``from_pretrained``).

A directory written by :func:`save_pretrained` holds

* ``adapter_config.json`` -- the configuration (``r``, ``alpha``, ``num_adapters``,
  ``adapter_names``, ``dropout``, ``target_modules`` / ``exclude_modules`` as given
  to :func:`mage_kernels.inject`, ``layers``: the exact qualified names of the
  adapted linears, ``library_version``) and the continual-learning ``history``:
  one entry per task recorded by ``mk.for_task(model, inputs, output, task=...)``,
  in training order, each naming the adapters that task trained;
* ``adapter_model.safetensors`` -- every adapter tensor, frozen ones included, named
  as in :func:`mage_kernels.adapter_state_dict` (``<layer>.lora_A.<k>``, ``<layer>.lora_B.<k>``);
* optionally ``method_state.safetensors`` -- what a method needs to continue
  learning: a :class:`mage_kernels.PEMA` or :class:`mage_kernels.FixedEMA` (theta*),
  a :class:`mage_kernels.DEMA` (theta* and g_prev), or any ``{name: tensor}`` mapping (e.g. EWC importances,
  ``fisher.values()``); read it back with :func:`load_method_state`.

:func:`from_pretrained` is all or nothing: it reads and checks every file (JSON,
safetensors headers and values, names, shapes against the model's linears, the
method state) before it changes the model, injects where needed, loads, and on any
failure puts the model back exactly as it was (no half-injected model) and raises
one ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .ema import DEMA, PEMA, FixedEMA
from .inject import (
    _RECORD,
    _is_linear,
    _named_modules_outside_mage,
    _record,
    _replace_layers,
    adapter_parameters,
    adapter_state_dict,
    load_adapter_state_dict,
    mage_layers,
)
from .layer import ADAPTERS, MageLinear

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "METHOD_STATE_NAME",
    "MethodState",
    "save_pretrained",
    "from_pretrained",
    "load_method_state",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METHOD_STATE_NAME = "method_state.safetensors"
_FORMAT = "mage-kernels"
_FORMAT_VERSION = 1

#: What :func:`save_pretrained` accepts as ``method_state``.
MethodState = Union[PEMA, DEMA, FixedEMA, Mapping[str, torch.Tensor]]


def _version() -> str:
    from . import __version__

    return __version__


def adapter_names(num_adapters: int) -> List[str]:
    """The adapters' names: MAGE's four (``text_in`` ...) or ``adapter_<k>`` for another count."""
    return list(ADAPTERS) if num_adapters == len(ADAPTERS) else [f"adapter_{k}" for k in range(num_adapters)]


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # a dependency of the package; only a broken install lands here
        raise ImportError("save_pretrained/from_pretrained need the safetensors package (pip install safetensors)") from exc
    return st


def _write_atomic(path: str, write) -> None:
    """Write a file through a temporary name in the same directory, then rename it into place."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- save


def _layer_config(model: nn.Module) -> Tuple[List[str], Dict[str, Any]]:
    layers = list(mage_layers(model))
    if not layers:
        raise ValueError("the model has no MageLinear layers; call mage_kernels.inject(model) first")
    first = layers[0][1]
    keys = ("r", "alpha", "num_adapters", "dropout")
    want = {k: getattr(first, k) for k in keys}
    for name, layer in layers:
        got = {k: getattr(layer, k) for k in keys}
        if got != want:
            raise ValueError(f"layers differ in their adapter configuration ({layers[0][0] or '<root>'}: {want}, "
                             f"{name or '<root>'}: {got}); save_pretrained writes one configuration for all layers")
        if layer.merged:
            raise ValueError(f"layer {name or '<root>'} is merged; call unmerge() before saving the adapters")
    if any(not name for name, _ in layers):
        raise ValueError("save_pretrained needs a model containing MageLinear layers, not a MageLinear itself")
    return [n for n, _ in layers], want


def _method_tensors(state: MethodState) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Flatten a method state into safetensors tensors plus JSON-able metadata."""
    if isinstance(state, (PEMA, DEMA, FixedEMA)):
        sd = state.state_dict()
        kind = type(state).__name__
        tensors = {f"theta_star.{n}": e for n, e in zip(sd["names"], sd["emas"])}
        if kind == "DEMA":
            tensors.update({f"g_prev.{n}": g for n, g in zip(sd["names"], sd["prev_grads"])})
        meta: Dict[str, Any] = {"kind": kind, "names": list(sd["names"]), "steps": int(sd["steps"])}
        if kind == "PEMA":
            meta.update(lam=state.lam, beta_fallback=state.beta_fallback)
        elif kind == "DEMA":
            meta.update(alpha_fallback=state.alpha_fallback)
        else:
            meta.update(decay=state.decay)
        return tensors, meta
    if isinstance(state, Mapping):
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad or not state:
            raise TypeError("method_state must be a PEMA, a DEMA, a FixedEMA or a non-empty mapping str -> tensor"
                            + (f"; bad entries: {bad[:5]}" if bad else ""))
        return dict(state), {"kind": "tensors", "names": list(state)}
    raise TypeError(f"method_state must be a PEMA, a DEMA, a FixedEMA or a mapping str -> tensor; got {type(state).__name__}")


def save_pretrained(model: nn.Module, path: Union[str, os.PathLike], method_state: Optional[MethodState] = None) -> None:
    """Write the model's adapters, their configuration and history to the directory ``path``.

    Creates ``path`` if needed and replaces the files this library writes there
    (``adapter_config.json``, ``adapter_model.safetensors``, and
    ``method_state.safetensors`` when ``method_state`` is given -- a stale one is
    removed otherwise). ``method_state``: a :class:`mage_kernels.PEMA`, a
    :class:`mage_kernels.FixedEMA` or a :class:`mage_kernels.DEMA` (its theta*, and g_prev), or a ``{name: tensor}``
    mapping such as EWC importances. The base model is not written (save it with
    its own library). Raises ``ValueError`` when the layers have different
    configurations, a layer is merged, or a tensor holds NaN/inf.
    """
    path = os.fspath(path)
    names, cfg = _layer_config(model)
    weights = adapter_state_dict(model)
    for k, v in weights.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"adapter {k} holds non-finite values; refusing to save it")
    method = None
    if method_state is not None:
        tensors, meta = _method_tensors(method_state)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        method = (tensors, meta)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)

    rec = _record(model) or {}
    config = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "library_version": _version(),
        "r": cfg["r"],
        "alpha": cfg["alpha"],
        "num_adapters": cfg["num_adapters"],
        "adapter_names": adapter_names(cfg["num_adapters"]),
        "scaling": cfg["alpha"] / (cfg["num_adapters"] * cfg["r"]),
        "dropout": cfg["dropout"],
        "target_modules": rec.get("target_modules") or names,
        "exclude_modules": rec.get("exclude_modules"),
        "layers": names,
        "base_model_class": type(model).__name__,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "history": [dict(e) for e in rec.get("history", [])],
        "method_state": None,
    }
    st = _safetensors()
    _write_atomic(os.path.join(path, WEIGHTS_NAME), lambda f: st.save_file(weights, f, metadata={"format": "pt"}))
    state_file = os.path.join(path, METHOD_STATE_NAME)
    if method is not None:
        tensors, meta = method
        config["method_state"] = dict(meta, file=METHOD_STATE_NAME)
        _write_atomic(state_file, lambda f: st.save_file(tensors, f, metadata={"format": "pt"}))
    elif os.path.exists(state_file):
        os.unlink(state_file)
    text = json.dumps(config, indent=2) + "\n"

    def write_config(f: str) -> None:
        with open(f, "w", encoding="utf-8") as fh:
            fh.write(text)

    _write_atomic(os.path.join(path, CONFIG_NAME), write_config)


# ----------------------------------------------------------------------------- read and check


def _fail(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem}")


def read_config(path: str) -> Dict[str, Any]:
    """Read and check ``adapter_config.json`` of a directory written by :func:`save_pretrained`."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise _fail(path, "no such directory")
    if not os.path.isfile(file):
        raise _fail(path, f"no {CONFIG_NAME} (not a directory written by mage_kernels.save_pretrained)")
    try:
        with open(file, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(file, f"not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _fail(file, "not a JSON object")
    if cfg.get("format") != _FORMAT:
        if "peft_type" in cfg:
            raise _fail(file, "this is a PEFT adapter; load it with mage_kernels.integrations.peft.import_peft")
        raise _fail(file, f"'format' is {cfg.get('format')!r}, expected {_FORMAT!r}")
    if cfg.get("format_version") != _FORMAT_VERSION:
        raise _fail(file, f"format_version {cfg.get('format_version')!r} is not supported (this library reads "
                          f"{_FORMAT_VERSION})")

    def positive_int(key: str) -> int:
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _fail(file, f"{key!r} must be a positive integer; got {v!r}")
        return v

    positive_int("r")
    n = positive_int("num_adapters")
    alpha = cfg.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise _fail(file, f"'alpha' must be a positive finite number; got {alpha!r}")
    dropout = cfg.get("dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise _fail(file, f"'dropout' must be in [0, 1); got {dropout!r}")
    if cfg.get("adapter_names") != adapter_names(n):
        raise _fail(file, f"'adapter_names' {cfg.get('adapter_names')!r} do not match num_adapters={n}")
    layers = cfg.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) and x for x in layers) \
            or len(set(layers)) != len(layers):
        raise _fail(file, f"'layers' must be a non-empty list of distinct module names; got {layers!r}")
    history = cfg.get("history", [])
    if not isinstance(history, list) or not all(isinstance(e, dict) and isinstance(e.get("task"), str)
                                                for e in history):
        raise _fail(file, "'history' must be a list of {'task': ..., ...} objects")
    ms = cfg.get("method_state")
    if ms is not None and (not isinstance(ms, dict) or ms.get("kind") not in ("PEMA", "DEMA", "FixedEMA", "tensors")
                           or not isinstance(ms.get("names"), list) or ms.get("file") != METHOD_STATE_NAME):
        raise _fail(file, f"'method_state' is malformed: {ms!r}")
    return cfg


def _load_safetensors(file: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(file):
        raise _fail(os.path.dirname(file), f"missing {os.path.basename(file)}")
    try:
        return _safetensors().load_file(file, device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a corrupt/truncated file
        raise _fail(file, f"cannot be read as safetensors ({type(exc).__name__}: {exc}); the file is corrupt") from None


def _expected_shapes(model: nn.Module, cfg: Dict[str, Any], where: str) -> Dict[str, Tuple[int, ...]]:
    """``{adapter key: shape}`` for the layers the config names, checked against the model's modules."""
    modules = dict(_named_modules_outside_mage(model))
    r, n = cfg["r"], cfg["num_adapters"]
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name in cfg["layers"]:
        m = modules.get(name)
        if m is None:
            raise _fail(where, f"layer {name} is not a module of this {type(model).__name__} (the adapters were "
                               f"saved from a {cfg.get('base_model_class')}); wrong base model?")
        if not (isinstance(m, MageLinear) or _is_linear(m)):
            raise _fail(where, f"layer {name} is a {type(m).__name__} in this model, not a linear layer")
        for k in range(n):
            shapes[f"{name}.lora_A.{k}"] = (r, m.in_features)
            shapes[f"{name}.lora_B.{k}"] = (m.out_features, r)
    return shapes


def _check_tensors(state: Dict[str, torch.Tensor], shapes: Dict[str, Tuple[int, ...]], file: str) -> None:
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise _fail(file, f"tensors do not match the configuration: missing {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                          f"{'...' if len(unexpected) > 3 else ''}")
    for k, shape in shapes.items():
        v = state[k]
        if tuple(v.shape) != shape:
            raise _fail(file, f"{k} has shape {tuple(v.shape)} but this model needs {shape} (different base model?)")
        if not v.is_floating_point():
            raise _fail(file, f"{k} is {v.dtype}, not a floating-point tensor")
        if not torch.isfinite(v).all():
            raise _fail(file, f"{k} holds non-finite values; the file is corrupt")


def _check_existing(model: nn.Module, cfg: Dict[str, Any], where: str) -> bool:
    """True when the model already carries exactly the configured MageLinear layers, False when it has none."""
    have = dict(mage_layers(model))
    if not have:
        return False
    if set(have) != set(cfg["layers"]):
        extra, lacking = sorted(set(have) - set(cfg["layers"])), sorted(set(cfg["layers"]) - set(have))
        raise _fail(where, f"the model already has MageLinear layers that differ from the saved ones (not saved: "
                           f"{extra[:3]}, not in the model: {lacking[:3]}); load into the plain base model")
    for name, layer in have.items():
        for key in ("r", "alpha", "num_adapters", "dropout"):
            if getattr(layer, key) != cfg[key]:
                raise _fail(where, f"layer {name} has {key}={getattr(layer, key)!r} but the adapters were saved "
                                   f"with {key}={cfg[key]!r}")
        if layer.merged:
            raise _fail(where, f"layer {name} is merged; call unmerge() first")
    return True


def _read_method_state(path: str, cfg: Dict[str, Any], weights: Dict[str, torch.Tensor]) -> Optional[Dict[str, Any]]:
    ms = cfg.get("method_state")
    if ms is None:
        return None
    file = os.path.join(path, METHOD_STATE_NAME)
    tensors = _load_safetensors(file)
    names = ms["names"]
    if ms["kind"] == "tensors":
        if sorted(names) != sorted(tensors):
            raise _fail(file, f"tensors {sorted(tensors)[:3]} do not match the names in {CONFIG_NAME}")
        return {n: tensors[n] for n in names}
    prefixes = ("theta_star.", "g_prev.") if ms["kind"] == "DEMA" else ("theta_star.",)
    want = {p + n for p in prefixes for n in names}
    if set(tensors) != want:
        raise _fail(file, f"tensors do not match the {ms['kind']} names in {CONFIG_NAME}")
    for n in names:
        if n not in weights:
            raise _fail(file, f"{ms['kind']} tracks {n}, which is not an adapter tensor of {WEIGHTS_NAME}")
        for p in prefixes:
            if tensors[p + n].shape != weights[n].shape:
                raise _fail(file, f"{p}{n} has shape {tuple(tensors[p + n].shape)}, the adapter has "
                                  f"{tuple(weights[n].shape)}")
    out: Dict[str, Any] = {"kind": ms["kind"], "names": list(names), "emas": [tensors["theta_star." + n] for n in names],
                           "steps": int(ms.get("steps", 0))}
    if ms["kind"] == "DEMA":
        out["prev_grads"] = [tensors["g_prev." + n] for n in names]
    return out


def load_method_state(path: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The method state :func:`save_pretrained` wrote to ``path``, or ``None`` when it wrote none.

    For a saved PEMA/DEMA/FixedEMA: ``{"kind", "names", "emas", "steps"}`` (DEMA: also
    ``"prev_grads"``), which ``PEMA.load_state_dict`` / ``DEMA.load_state_dict`` take
    directly (create the PEMA after ``from_pretrained`` and ``for_task`` of the task to
    continue, so that it tracks the same tensors). For a saved mapping: the
    ``{name: tensor}`` mapping. Raises ``ValueError`` for a corrupt or inconsistent file.
    """
    path = os.fspath(path)
    cfg = read_config(path)
    weights = _load_safetensors(os.path.join(path, WEIGHTS_NAME))
    return _read_method_state(path, cfg, weights)


# ----------------------------------------------------------------------------- load


def _inject_and_load(
    model: nn.Module,
    layers: Sequence[str],
    r: int,
    alpha: float,
    dropout: float,
    num_adapters: int,
    state: Dict[str, torch.Tensor],
    record: Dict[str, Any],
    is_trainable: bool,
    already_injected: bool,
) -> nn.Module:
    """Inject (unless already injected), load ``state``, set the record; undo everything on any failure."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    old_record = model.__dict__.get(_RECORD)
    undo: List[Tuple[nn.Module, str, nn.Module]] = []
    previous = None if not already_injected else adapter_state_dict(model)
    try:
        if not already_injected:
            model.requires_grad_(False)
            undo = _replace_layers(model, layers, r, alpha, dropout, num_adapters)
        load_adapter_state_dict(model, state)
        for _, p in adapter_parameters(model, trainable_only=False):
            p.requires_grad_(is_trainable)
        model.__dict__[_RECORD] = record
        if not is_trainable:
            model.eval()
    except BaseException:
        for parent, attr, original in reversed(undo):
            setattr(parent, attr, original)
        if previous is not None:
            load_adapter_state_dict(model, previous)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        if old_record is None:
            model.__dict__.pop(_RECORD, None)
        else:
            model.__dict__[_RECORD] = old_record
        raise
    return model


def from_pretrained(model: nn.Module, path: Union[str, os.PathLike], is_trainable: bool = False) -> nn.Module:
    """Load adapters saved by :func:`save_pretrained` into ``model`` and return it (PEFT's ``from_pretrained``).

    ``model`` is the plain base model (the adapters are injected into the saved
    ``layers``, every other parameter frozen) or one already injected with the same
    layers and configuration (the adapters are overwritten). The task history is
    restored, so :func:`mage_kernels.for_task` with ``task=`` continues it.
    ``is_trainable=False`` (PEFT's default): every adapter frozen and the model put
    in eval mode; ``True``: every adapter trainable (call ``for_task`` next).
    The method state is read with :func:`load_method_state`.

    All or nothing: every file is read and checked first, and any failure leaves the
    model exactly as it was. Raises ``ValueError`` naming the file and the problem
    (missing or corrupt file, unknown format, config/shape/target mismatch).
    """
    path = os.fspath(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module; got {type(model).__name__}")
    cfg = read_config(path)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    shapes = _expected_shapes(model, cfg, os.path.join(path, CONFIG_NAME))
    weights = _load_safetensors(weights_file)
    _check_tensors(weights, shapes, weights_file)
    _read_method_state(path, cfg, weights)  # checked now, so that a bad file fails before the model changes
    already = _check_existing(model, cfg, path)
    record = {"target_modules": cfg.get("target_modules"), "exclude_modules": cfg.get("exclude_modules"),
              "history": [dict(e) for e in cfg.get("history", [])]}
    return _inject_and_load(model, cfg["layers"], cfg["r"], cfg["alpha"], cfg["dropout"], cfg["num_adapters"],
                            weights, record, is_trainable, already)
