"""Continual-learning metrics of ALGORITHM.md §5 (paper Eq. 5-10).

``a[j][i]`` is the accuracy (0-100) on task ``i`` after training task ``j`` (0-based here,
``T`` tasks, rows = training stages, columns = tasks in training order). Entries with
``i > j`` (tasks not trained yet) are ignored and may be ``None``/``NaN``.

    Avg.ACC    = mean_i      a[T-1][i]
    New.ACC    = mean_i      a[i][i]
    Forgetting = mean_{i<T-1} (a[i][i] - a[T-1][i])
    Avg.IUF    = mean_{i<T-1} (iuf[T-1][i] - iuf[i][i])      (likewise Avg.HAL, Avg.OTH)

where ``iuf``, ``hal``, ``oth`` are the per-cell rates (0-100) of each error type. Because
every test answer is exactly one of correct / IUF / HAL / OTH (:mod:`mage_cl.error_types`),
``acc + iuf + hal + oth = 100`` in every cell and ``Forgetting = Avg.IUF + Avg.HAL + Avg.OTH``.

The paper reports values rounded to 2 decimals half-up (e.g. LoRA's stage-2 Avg.ACC
``(20.10 + 65.19) / 2 = 42.645 -> 42.65``); :func:`round_half_up` reproduces that.
With a single task, Forgetting and the error averages are 0 (nothing could be forgotten).
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Dict, List, Optional, Sequence

import numpy as np

Matrix = Sequence[Sequence[Optional[float]]]

SUMMARY_KEYS = ("Avg.ACC", "Forgetting", "New.ACC", "Avg.IUF", "Avg.HAL", "Avg.OTH")


def _lower_triangle(a: Matrix, name: str = "accuracy matrix", square: bool = True) -> np.ndarray:
    """Validate ``a`` and return it as float ``[rows, T]`` with NaN above the diagonal."""
    rows = [list(r) for r in a]
    if not rows:
        raise ValueError(f"{name} is empty")
    T = len(rows[0])
    if any(len(r) != T for r in rows):
        raise ValueError(f"{name} rows have different lengths: {[len(r) for r in rows]}")
    if square and len(rows) != T:
        raise ValueError(f"{name} must be square (one row per training stage), got {len(rows)}x{T}")
    if len(rows) > T:
        raise ValueError(f"{name} has more rows ({len(rows)}) than tasks ({T})")
    out = np.full((len(rows), T), np.nan)
    for j, row in enumerate(rows):
        for i in range(j + 1):
            v = row[i]
            if v is None or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise ValueError(f"{name}[{j}][{i}] must be a finite number (task {i} after stage {j}), got {v!r}")
            if not -1e-9 <= float(v) <= 100 + 1e-9:
                raise ValueError(f"{name}[{j}][{i}] = {v} is outside [0, 100]")
            out[j, i] = float(v)
    return out


def round_half_up(x: float, ndigits: int = 2) -> float:
    """Round like the paper's tables: half away from zero at ``ndigits`` (float noise removed first)."""
    if not math.isfinite(x):
        return x
    d = Decimal(repr(round(x, 10)))
    return float(d.quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def avg_acc(a: Matrix) -> float:
    """Mean accuracy over all tasks after the last stage (Eq. 5)."""
    m = _lower_triangle(a)
    return float(np.mean(m[-1]))


def new_acc(a: Matrix) -> float:
    """Mean accuracy on each task right after training it (Eq. 7)."""
    m = _lower_triangle(a)
    return float(np.mean(np.diag(m)))


def forgetting(a: Matrix) -> float:
    """Mean drop from just-trained to final accuracy over all but the last task (Eq. 6)."""
    m = _lower_triangle(a)
    T = m.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(np.diag(m)[:-1] - m[-1, :-1]))


def avg_error_rate(rates: Matrix) -> float:
    """Mean rise of one error type's rate from just-trained to final over all but the last task (Eq. 8-10)."""
    m = _lower_triangle(rates, name="error-rate matrix")
    T = m.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(m[-1, :-1] - np.diag(m)[:-1]))


def stage_avg_acc(a: Matrix) -> List[float]:
    """Avg.ACC after each stage ``j``: mean of ``a[j][0..j]`` (the Avg.ACC column of Tables 7-14).

    ``a`` may have fewer rows than tasks (a run still in progress).
    """
    m = _lower_triangle(a, square=False)
    return [float(np.mean(m[j, : j + 1])) for j in range(m.shape[0])]


def stage_forgetting(a: Matrix) -> List[float]:
    """Forgetting after each stage ``j >= 1`` over the tasks seen before it (0 at stage 0)."""
    m = _lower_triangle(a, square=False)
    d = np.diag(m[:, : m.shape[0]])
    return [0.0] + [float(np.mean(d[:j] - m[j, :j])) for j in range(1, m.shape[0])]


def summarize(acc: Matrix, iuf: Optional[Matrix] = None, hal: Optional[Matrix] = None,
              oth: Optional[Matrix] = None) -> Dict[str, float]:
    """All ALGORITHM.md §5 metrics: keys ``Avg.ACC, Forgetting, New.ACC, Avg.IUF, Avg.HAL, Avg.OTH``.

    Error averages are NaN when their matrix is not given. Values are not rounded.
    """
    T = len(acc)
    out = {"Avg.ACC": avg_acc(acc), "Forgetting": forgetting(acc), "New.ACC": new_acc(acc)}
    for key, rates in (("Avg.IUF", iuf), ("Avg.HAL", hal), ("Avg.OTH", oth)):
        if rates is not None and len(rates) != T:
            raise ValueError(f"{key}: error-rate matrix has {len(rates)} rows, accuracy matrix {T}")
        out[key] = avg_error_rate(rates) if rates is not None else float("nan")
    return out
