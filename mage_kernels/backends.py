"""Explicit, inspectable choice of the kernel backend.

Three backends compute the same ops with the same semantics:

``"triton"``
    The fused Triton kernels in :mod:`mage_kernels.kernels`. Needs CUDA tensors,
    or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests).
``"cuda"``
    The hand-written CUDA C++ kernels of the ``mage_kernels._C`` extension
    (built by ``pip install`` when a CUDA torch and nvcc are present) for the
    PEMA update and the Fisher weight gradient; the LoRA GEMMs run in cuBLAS and
    the dropout kernels in Triton (:func:`mage_kernels.lora_linear_path`).
``"torch"``
    The plain-PyTorch reference path (:mod:`mage_kernels.reference`). Works on
    every device; it is what ``"auto"`` uses for CPU tensors.

Choose with :func:`set_backend`, the ``backend=`` context manager
:func:`use_backend`, or the environment variable ``MAGE_BACKEND``
(``auto`` | ``triton`` | ``cuda`` | ``torch``). ``"auto"`` (the default)
resolves per call from the tensors' device and dtype: CUDA tensors of a dtype
the Triton kernels support (float16, bfloat16, float32) -> ``"triton"`` (the
kernel family of the non-GEMM kernels: PEMA, Fisher, dropout); anything else ->
``"torch"``. For ``mage::lora_linear`` the base GEMMs then run in cuBLAS; only
an explicit ``"triton"`` request runs them in the Triton concatenated-K kernel.
:func:`mage_kernels.lora_linear_path` states the whole rule per call.
In particular ``"auto"`` runs float64 LoRA ops on the torch reference (the Triton GEMMs have no float64 path), while an explicit
``"triton"`` request with float64 tensors raises a ``TypeError`` naming the
dtype. (The PEMA op passes no dtype: its Triton kernel handles float64 too.)
The tests run the Triton kernels on CPU tensors by requesting ``"triton"``
explicitly under ``TRITON_INTERPRET=1``.
An explicitly requested backend that cannot run on the given tensors raises
:class:`BackendUnavailableError`; the library never silently swaps in a
different implementation.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend",
    "set_backend",
    "use_backend",
    "resolve_backend",
    "backend_info",
    "triton_available",
    "triton_interpreter",
    "TRITON_DTYPES",
]

BACKENDS = ("auto", "triton", "cuda", "torch")
#: The dtypes the Triton LoRA / weight-gradient kernels support; ``"auto"`` picks
#: ``"torch"`` for any other dtype passed to :func:`resolve_backend`.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ENV = "MAGE_BACKEND"
_requested: Optional[str] = None  # set by set_backend(); None -> environment / "auto"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the call (no silent fallback)."""


def _check(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def backend() -> str:
    """The requested backend: ``set_backend``'s value, else ``$MAGE_BACKEND``, else ``"auto"``."""
    if _requested is not None:
        return _requested
    return _check(os.environ.get(_ENV, "auto") or "auto")


def set_backend(name: Optional[str]) -> None:
    """Select the backend for all later calls; ``None`` goes back to ``$MAGE_BACKEND`` / ``"auto"``."""
    global _requested
    _requested = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend for the enclosed calls."""
    global _requested
    old = _requested
    _requested = _check(name)
    try:
        yield
    finally:
        _requested = old


def triton_interpreter() -> bool:
    """True when ``TRITON_INTERPRET=1`` (Triton kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency
        return False
    return True


def resolve_backend(device: torch.device, op: str = "", dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend (``"triton"``, ``"cuda"`` or ``"torch"``) for tensors on ``device``.

    ``op`` names the op, so that an explicit ``"cuda"`` request for an op the
    extension lacks is answered with ``"triton"`` only where
    :func:`backend_info` documents it (never a change of numerics beyond the
    kernels' documented tolerance). ``dtype`` (optional) is the op's compute
    dtype: under ``"auto"`` a dtype outside :data:`TRITON_DTYPES` (e.g.
    float64) resolves to ``"torch"``; explicit requests ignore it (the kernel
    then rejects an unsupported dtype with a ``TypeError``).
    """
    want = backend()
    is_cuda = device.type == "cuda"
    if want == "auto":
        dtype_ok = dtype is None or dtype in TRITON_DTYPES
        return "triton" if (is_cuda and dtype_ok and triton_available()) else "torch"
    if want == "torch":
        return "torch"
    if want == "triton":
        if not triton_available():
            raise BackendUnavailableError("backend 'triton' requested but triton is not installed")
        if not is_cuda and not triton_interpreter():
            raise BackendUnavailableError(
                f"backend 'triton' requested for tensors on {device}; Triton needs CUDA tensors "
                "or TRITON_INTERPRET=1. Use backend 'torch' (or 'auto') for CPU tensors."
            )
        return "triton"
    # want == "cuda"
    if not is_cuda:
        raise BackendUnavailableError(f"backend 'cuda' requested for tensors on {device}")
    from . import cuda_extension

    if cuda_extension.load() is None:
        raise BackendUnavailableError(
            "backend 'cuda' requested but the mage_kernels._C extension is not built: "
            + cuda_extension.why_unavailable()
        )
    if op and not cuda_extension.has_op(op):
        return "triton"
    return "cuda"


def backend_info() -> Dict[str, object]:
    """A dictionary describing what each backend can do on this machine."""
    from . import cuda_extension

    return {
        "requested": backend(),
        "env": os.environ.get(_ENV),
        "triton_installed": triton_available(),
        "triton_interpreter": triton_interpreter(),
        "cuda_device": torch.cuda.is_available(),
        "cuda_extension": cuda_extension.load() is not None,
        "cuda_extension_ops": cuda_extension.op_names(),
        "cuda_extension_note": None if cuda_extension.load() is not None else cuda_extension.why_unavailable(),
        "resolved_cpu": _safe_resolve(torch.device("cpu")),
        "resolved_cuda": _safe_resolve(torch.device("cuda")) if torch.cuda.is_available() else None,
    }


def _safe_resolve(device: torch.device) -> str:
    try:
        return resolve_backend(device)
    except BackendUnavailableError as exc:
        return f"unavailable: {exc}"
