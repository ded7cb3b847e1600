"""The results directory of a run or a comparison: matrices, tables, plots.

For one run (``write_run``)::

    results.json        everything below plus the configuration, timings and memory
    accuracy.csv        the accuracy matrix a[j][i] (rows: after training task j; "" = not trained yet)
    errors_{iuf,hal,oth}.csv   the error-rate matrices (SPEC section 5)
    table.md            a Table-1-style row: final accuracy per task + the six metrics + memory, speed
    accuracy_matrix.png heatmap of a[j][i]
    stage_avg_acc.png   Avg.ACC after each stage

For a comparison (``write_comparison``): ``comparison.md`` (one combined table plus the
MAGE-vs-CIA memory line), ``comparison.json``, ``comparison.csv`` and
``stage_avg_acc.png`` with one curve per method.

Memory columns: ``state`` is the method's persistent continual-learning state measured
on its tensors (``mk.persistent_state_bytes`` for PEMA / DEMA); ``peak`` is
``torch.cuda.max_memory_allocated`` on GPU, and on CPU the bytes of the tensors a
training step keeps alive (parameters, gradients, optimizer state, Fisher buffers,
method state; activations are not counted).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import metrics as M

__all__ = ["build_record", "write_run", "write_comparison", "markdown_table", "memory_line"]

Matrix = List[List[Optional[float]]]


def _matrix(stages: Sequence[dict], names: Sequence[str], key: str) -> Matrix:
    return [[st[key].get(n) for n in names] for st in stages]


def build_record(method: str, names: Sequence[str], paper_names: Sequence[str], stages: Sequence[dict],
                 joint: bool, meta: Dict[str, object]) -> Dict[str, object]:
    """A JSON-able summary of a finished run (``stages``: ``StageResult`` as dicts)."""
    T = len(names)
    if joint:
        last = stages[-1]
        pad: Matrix = [[None] * T for _ in range(T - 1)]
        acc = pad + [[last["acc"][n] for n in names]]
        iuf = pad + [[last["iuf"][n] for n in names]]
        hal = pad + [[last["hal"][n] for n in names]]
        oth = pad + [[last["oth"][n] for n in names]]
        summary = {k: float("nan") for k in M.SUMMARY_KEYS}
        summary["Avg.ACC"] = sum(acc[-1]) / T
        per_stage: List[float] = []
    else:
        acc, iuf, hal, oth = (_matrix(stages, names, k) for k in ("acc", "iuf", "hal", "oth"))
        if len(stages) == T:
            summary = M.summarize(acc, iuf, hal, oth)
        else:
            summary = {k: float("nan") for k in M.SUMMARY_KEYS}
        per_stage = M.stage_avg_acc(acc)
    train_s = sum(st["train_seconds"] for st in stages)
    tokens = sum(st["train_tokens"] for st in stages)
    return {
        "method": method,
        "tasks": list(names),
        "paper_names": list(paper_names),
        "joint": joint,
        "complete": len(stages) == (1 if joint else T),
        "acc": acc, "iuf": iuf, "hal": hal, "oth": oth,
        "metrics": summary,
        "stage_avg_acc": per_stage,
        "method_state_bytes": max((st["method_state_bytes"] for st in stages), default=0),
        "peak_bytes": max((st["peak_bytes"] for st in stages), default=0),
        "train_tokens": tokens,
        "train_seconds": train_s,
        "eval_seconds": sum(st["eval_seconds"] for st in stages),
        "tokens_per_second": tokens / train_s if train_s > 0 else float("nan"),
        "final_loss": [st["final_loss"] for st in stages],
        "diagnostics": [st.get("extra", {}) for st in stages],
        **meta,
    }


def _fmt(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{M.round_half_up(float(v)):.2f}"


def _mb(b: int) -> str:
    return f"{b / 2**20:.3f}" if b else "-"


def markdown_table(records: Sequence[Dict[str, object]]) -> str:
    """Table 1 of the paper in miniature: final per-task accuracy, the metrics, memory and speed."""
    names = records[0]["paper_names"]
    head = (["Method"] + list(names) + list(M.SUMMARY_KEYS)
            + ["state MiB", "peak MiB", "train tok/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        final = r["acc"][-1]
        row = [r["method"]] + [_fmt(v) for v in final] + [_fmt(r["metrics"][k]) for k in M.SUMMARY_KEYS]
        tps = r["tokens_per_second"]
        row += [_mb(r["method_state_bytes"]), _mb(r["peak_bytes"]),
                "-" if (tps is None or math.isnan(tps)) else f"{tps:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def memory_line(records: Sequence[Dict[str, object]]) -> Optional[str]:
    """The MAGE (PEMA) vs CIA (DEMA) persistent-state comparison, when both ran."""
    by = {r["method"]: r for r in records}
    if "mage" not in by or "cia" not in by:
        return None
    a, b = by["mage"]["method_state_bytes"], by["cia"]["method_state_bytes"]
    rel = "below" if a < b else ("equal to" if a == b else "ABOVE")
    return (f"Persistent method state, measured on the tensors (mk.persistent_state_bytes): MAGE/PEMA {a} B "
            f"({a / 2**20:.3f} MiB) is {rel} CIA/DEMA {b} B ({b / 2**20:.3f} MiB); "
            f"peak: MAGE {by['mage']['peak_bytes'] / 2**20:.3f} MiB, CIA {by['cia']['peak_bytes'] / 2**20:.3f} MiB.")


def _write_csv(path: Path, names: Sequence[str], m: Matrix) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["after_task"] + list(names))
        for j, row in enumerate(m):
            w.writerow([names[j]] + ["" if v is None else f"{v:.4f}" for v in row])


def _json_safe(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _plots(out: Path, record: Dict[str, object]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = record["paper_names"]
    m = np.array([[np.nan if v is None else v for v in row] for row in record["acc"]], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), [f"after {n}" for n in names])
    for j in range(m.shape[0]):
        for i in range(m.shape[1]):
            if not np.isnan(m[j, i]):
                ax.text(i, j, f"{m[j, i]:.0f}", ha="center", va="center", color="w" if m[j, i] < 60 else "k", fontsize=8)
    ax.set_title(f"{record['method']}: accuracy a[j][i] (%)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "accuracy_matrix.png", dpi=110)
    plt.close(fig)
    if record["stage_avg_acc"]:
        _stage_plot(out / "stage_avg_acc.png", [record])


def _stage_plot(path: Path, records: Sequence[Dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = plt.get_cmap("tab20").colors  # twelve methods: no two share a color
    markers = "os^vD<>pPX*h"
    for i, r in enumerate(records):
        if r["stage_avg_acc"]:
            ax.plot(range(1, len(r["stage_avg_acc"]) + 1), r["stage_avg_acc"], marker=markers[i % len(markers)],
                    color=colors[(2 * i) % 20 + (i // 10) % 2], label=r["method"],
                    linewidth=2.2 if r["method"] == "mage" else 1.2)
    names = records[0]["paper_names"]
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set_ylabel("Avg.ACC over seen tasks (%)")
    ax.set_title("Avg.ACC per stage")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run(out: Path, record: Dict[str, object]) -> None:
    """Write one run's results directory (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(record), indent=1))
    names = record["tasks"]
    _write_csv(out / "accuracy.csv", names, record["acc"])
    for k in ("iuf", "hal", "oth"):
        _write_csv(out / f"errors_{k}.csv", names, record[k])
    (out / "table.md").write_text(markdown_table([record]))
    _plots(out, record)


def write_comparison(out: Path, records: Sequence[Dict[str, object]], header: str = "") -> str:
    """Write the combined table, JSON, CSV and Avg.ACC-per-stage plot; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = header + markdown_table(records)
    line = memory_line(records)
    if line:
        md += "\n" + line + "\n"
    (out / "comparison.md").write_text(md)
    (out / "comparison.json").write_text(json.dumps(_json_safe(list(records)), indent=1))
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.writer(f)
        names = records[0]["tasks"]
        w.writerow(["method"] + list(names) + list(M.SUMMARY_KEYS) + ["method_state_bytes", "peak_bytes",
                                                                     "tokens_per_second"])
        for r in records:
            w.writerow([r["method"]] + [("" if v is None else f"{v:.4f}") for v in r["acc"][-1]]
                       + [("" if (v is None or math.isnan(v)) else f"{v:.4f}") for v in
                          (r["metrics"][k] for k in M.SUMMARY_KEYS)]
                       + [r["method_state_bytes"], r["peak_bytes"], f"{r['tokens_per_second']:.1f}"])
    _stage_plot(out / "stage_avg_acc.png", records)
    return md
