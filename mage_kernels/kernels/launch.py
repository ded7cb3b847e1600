"""The one place the library launches a Triton kernel, and a recorder of launches.

Every wrapper in :mod:`mage_kernels.kernels` calls :func:`launch` instead of
``kernel[grid](...)``. Normally that is the launch itself. Inside
:func:`record_launches` nothing runs: each call is appended to a list as a
:class:`Launch` (the kernel -- a ``JITFunction`` or an ``Autotuner`` --, its
arguments and launch options), with the real wrappers' choices of block sizes
and flags. ``bench/aot_report.py`` uses it to compile, ahead of time and
without a GPU, exactly the kernels the library would launch for given shapes
(the wrappers can then be called with ``device="meta"`` tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

__all__ = ["Launch", "launch", "record_launches", "recording", "sm_override"]


@dataclasses.dataclass
class Launch:
    kernel: Any  # triton JITFunction or Autotuner
    grid: Any
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    label: str = ""


_recorder: Optional[List[Launch]] = None
_label: str = ""
_sms: Optional[int] = None


def sm_override() -> Optional[int]:
    """The SM count the grid heuristics assume inside :func:`record_launches` (``None`` outside)."""
    return _sms


def recording() -> bool:
    """True inside :func:`record_launches` (wrappers then skip work that needs real memory)."""
    return _recorder is not None


def launch(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or record the call inside :func:`record_launches`."""
    if _recorder is not None:
        _recorder.append(Launch(kernel, grid, args, kwargs, _label))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def record_launches(label: str = "", num_sms: int = 132) -> Iterator[List[Launch]]:
    """Record (do not run) every kernel launch in the block; ``num_sms`` is the SM count the
    wrappers' grid heuristics assume (132: an H100/H200 SXM)."""
    global _recorder, _label, _sms
    old, old_label, old_sms = _recorder, _label, _sms
    _recorder, _label, _sms = [], label, num_sms
    try:
        yield _recorder
    finally:
        _recorder, _label, _sms = old, old_label, old_sms


def set_label(label: str) -> Callable[[], None]:
    """Label the launches recorded from now on (for reports); returns a function restoring the old one."""
    global _label
    old = _label
    _label = label

    def restore() -> None:
        global _label
        _label = old

    return restore
