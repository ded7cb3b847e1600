"""Loader for the optional compiled CUDA extension ``mage_kernels._C``.

The extension registers its kernels as torch ops in the ``mage_cuda`` namespace
(``torch.ops.mage_cuda.<name>``) with the same schemas as the Python-side ops
of :mod:`mage_kernels`; :mod:`mage_kernels.backend` dispatches to them when the
``"cuda"`` backend is selected. Importing the package never fails because the
extension is missing: :func:`load` returns ``None`` and :func:`why_unavailable`
says why.
"""

from __future__ import annotations

from types import ModuleType
from typing import List, Optional

import torch

NAMESPACE = "mage_cuda"
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
    load()
    return _error or "available"


def op_names() -> List[str]:
    """Names of the ops the loaded extension registered (empty when not loaded)."""
    if load() is None:
        return []
    ns = getattr(torch.ops, NAMESPACE)
    return sorted(name for name in dir(ns) if not name.startswith("_") and name not in ("name", "default"))


def has_op(name: str) -> bool:
    return name in op_names()
