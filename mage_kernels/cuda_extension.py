"""Loader for the optional compiled CUDA extension ``mage_kernels._C``.

The extension (sources in ``csrc/``; built by ``setup.py`` when a CUDA build of
torch and nvcc are present) registers its kernels as torch ops in the
``mage_cuda`` namespace:

``torch.ops.mage_cuda.pema_update_``
    the PEMA multi-tensor update (ALGORITHM.md §3) in one kernel launch;
``torch.ops.mage_cuda.weight_grad_with_fisher``
    the LoRA weight gradient with the in-place per-sample Fisher accumulation
    (ALGORITHM.md §2).

Each has exactly the schema of the Python-side op of the same name in the
``mage`` namespace (``torch.ops.mage.<name>``), which dispatches to it when the
``"cuda"`` backend is selected (:mod:`mage_kernels.backends`);
:func:`schema_mismatches` checks that. Importing the package never fails
because the extension is missing: :func:`load` returns ``None`` and
:func:`why_unavailable` says why.

The CUDA path has been compiled (nvcc, sm_90) and its registration/schemas
checked on a CPU machine, but see the README for its hardware verification
status.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import List, Optional, Tuple

import torch

__all__ = [
    "NAMESPACE",
    "OPS",
    "load",
    "why_unavailable",
    "op_names",
    "has_op",
    "schema_mismatches",
]

NAMESPACE = "mage_cuda"

#: The ops the extension implements, and the Python modules that register
#: their ``mage::`` twins (imported by :func:`schema_mismatches`).
OPS: Tuple[str, ...] = ("pema_update_", "weight_grad_with_fisher")
_PYTHON_OP_MODULES: Tuple[str, ...] = ("mage_kernels.ema", "mage_kernels.weight_grad_op")

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def load() -> Optional[ModuleType]:
    """Import ``mage_kernels._C`` once; ``None`` when it is not built or fails to load."""
    global _module, _error, _tried
    if _tried:
        return _module
    _tried = True
    try:
        from . import _C  # type: ignore[attr-defined]

        _module = _C
    except ImportError as exc:
        _error = (
            "the extension was not built (install with a CUDA build of torch and nvcc on PATH, "
            f"e.g. `pip install --no-build-isolation .`): {exc}"
        )
    except OSError as exc:  # pragma: no cover - broken shared library
        _error = f"the extension exists but failed to load: {exc}"
    return _module


def why_unavailable() -> str:
    """``"available"``, or why :func:`load` could not import the extension."""
    load()
    return _error or "available"


def _registered(namespace: str) -> List[str]:
    prefix = namespace + "::"
    names = {n[len(prefix):].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}
    return sorted(names)


def op_names() -> List[str]:
    """Names of the ops the loaded extension registered (empty when it is not loaded)."""
    if load() is None:
        return []
    return _registered(NAMESPACE)


def has_op(name: str) -> bool:
    """True when the loaded extension implements ``name`` (e.g. ``"pema_update_"``)."""
    return name in op_names()


def _describe(schema: "torch._C.FunctionSchema") -> List[str]:
    """One comparable line per argument/return: name, type, mutation, default, keyword-only."""
    lines = []
    for a in schema.arguments:
        write = bool(a.alias_info is not None and a.alias_info.is_write)
        lines.append(
            f"arg {a.name}: {a.type}{' (mutated)' if write else ''}"
            f"{'' if a.default_value is None else f' = {a.default_value!r}'}{' (keyword-only)' if a.kwarg_only else ''}"
        )
    for i, r in enumerate(schema.returns):
        lines.append(f"return {i}: {r.type}")
    return lines


def schema_mismatches(namespace: str = NAMESPACE, reference_namespace: str = "mage") -> List[str]:
    """Differences between each ``mage_cuda::<op>`` schema and its Python twin ``mage::<op>``.

    Compares argument names, types (``SymInt`` and ``int`` are the same type
    to the dispatcher's Python callers), mutation annotations, defaults and
    return types; the namespace is ignored. Returns one human-readable line per
    problem, so ``[]`` means "identical semantics at the call boundary". An op
    the extension does not register is reported as a problem too (call this
    with the extension loaded; :func:`why_unavailable` says why it is not).
    The namespaces are parameters only so that the comparison itself can be tested.
    """
    load()
    for mod in _PYTHON_OP_MODULES:  # registers the mage:: ops
        importlib.import_module(mod)
    problems: List[str] = []
    cuda_ops = set(_registered(namespace))
    python_ops = set(_registered(reference_namespace))
    for name in OPS:
        if name not in cuda_ops:
            problems.append(f"{namespace}::{name} is not registered ({why_unavailable()})")
            continue
        if name not in python_ops:
            problems.append(f"{reference_namespace}::{name} is not registered (the Python op is missing)")
            continue
        ours = _describe(getattr(getattr(torch.ops, namespace), name).default._schema)
        theirs = _describe(getattr(getattr(torch.ops, reference_namespace), name).default._schema)
        if ours != theirs:
            diff = [f"{namespace}: {a} | {reference_namespace}: {b}" for a, b in zip(ours, theirs) if a != b]
            if len(ours) != len(theirs):
                diff.append(f"{len(ours)} vs {len(theirs)} arguments/returns")
            problems.append(f"{name}: " + "; ".join(diff))
    for name in sorted(cuda_ops - set(OPS)):
        problems.append(f"{namespace}::{name} is registered but not listed in cuda_extension.OPS")
    return problems
