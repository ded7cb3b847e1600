"""The results directory of a run or a comparison: matrices, tables, plots.

For one run (``write_run``)::

    results.json        everything below plus the configuration, timings and memory
    accuracy.csv        the accuracy matrix a[j][i] (rows: after training task j; "" = not trained yet)
    errors_{iuf,hal,oth}.csv   the error-rate matrices (ALGORITHM.md §5)
    table.md            a Table-1-style row: final accuracy per task + the six metrics + memory, speed
    accuracy_matrix.png heatmap of a[j][i]
    stage_avg_acc.png   Avg.ACC after each stage

For a comparison (``write_comparison``): ``comparison.md`` (one combined table plus the
MAGE-vs-CIA memory line), ``comparison.json``, ``comparison.csv``, and
``stage_avg_acc.png`` / ``stage_forgetting.png`` with one curve per method (the multitask
upper bound as a reference line). Accuracy axes are fixed to 0-100.

Memory columns: ``state`` is the method's persistent continual-learning state measured
on its tensors (``mk.persistent_state_bytes`` for PEMA / DEMA / FixedEMA); ``peak`` is
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

__all__ = ["build_record", "write_run", "write_comparison", "markdown_table", "memory_line", "fmt",
           "has_results", "remove_results", "RUN_FILES", "COMPARISON_FILES"]

#: The files :func:`write_run` writes.
RUN_FILES = ("results.json", "accuracy.csv", "errors_iuf.csv", "errors_hal.csv", "errors_oth.csv", "table.md",
             "accuracy_matrix.png", "stage_avg_acc.png")
#: The files :func:`write_comparison` writes.
COMPARISON_FILES = ("comparison.md", "comparison.json", "comparison.csv", "stage_avg_acc.png",
                    "stage_forgetting.png")


def has_results(out: Path) -> bool:
    """Whether ``out`` holds a finished run's or a comparison's results."""
    return (Path(out) / "results.json").is_file() or (Path(out) / "comparison.json").is_file()


def remove_results(out: Path) -> List[str]:
    """Delete the result files of a run or comparison in ``out`` (nothing else); returns the names removed."""
    gone = []
    for name in dict.fromkeys(RUN_FILES + COMPARISON_FILES):
        path = Path(out) / name
        if path.is_file():
            path.unlink()
            gone.append(name)
    return gone

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


def fmt(v: Optional[float]) -> str:
    """A table cell: ``-`` for missing / NaN, else two decimals (rounded half up, like the paper)."""
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
        row = [r["method"]] + [fmt(v) for v in final] + [fmt(r["metrics"][k]) for k in M.SUMMARY_KEYS]
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plots(out: Path, record: Dict[str, object]) -> None:
    import numpy as np

    plt = _pyplot()
    names = record["paper_names"]
    m = np.array([[np.nan if v is None else v for v in row] for row in record["acc"]], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), [f"after {n}" for n in names])
    ax.set_xlabel("evaluated task i")
    ax.set_ylabel("after training task j")
    for j in range(m.shape[0]):
        for i in range(m.shape[1]):
            if not np.isnan(m[j, i]):
                ax.text(i, j, f"{m[j, i]:.0f}", ha="center", va="center", color="w" if m[j, i] < 60 else "k", fontsize=8)
    ax.set_title(f"{record['method']}: accuracy a[j][i] (%)")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_matrix.png", dpi=110)
    plt.close(fig)
    if record["stage_avg_acc"]:
        stage_plot(out / "stage_avg_acc.png", [record])


def _method_style(i: int, method: str) -> Dict[str, object]:
    plt = _pyplot()
    colors = plt.get_cmap("tab20").colors  # up to twenty methods: no two share a colour
    markers = "os^vD<>pPX*h"
    return {"marker": markers[i % len(markers)], "color": colors[(2 * i) % 20 + (i // 10) % 2],
            "linewidth": 2.2 if method == "mage" else 1.2}


def stage_plot(path: Path, records: Sequence[Dict[str, object]], metric: str = "Avg.ACC",
               bands: Optional[Dict[str, Sequence[float]]] = None) -> None:
    """Per-stage ``Avg.ACC`` (or ``Forgetting``) of each sequential method, like the paper's Fig. 9.

    The y axis is fixed to 0-100 (so runs are comparable at a glance); each multitask upper
    bound among ``records`` is drawn as a dashed (dotted, ...) reference line (it has no stages).
    ``bands`` (optional) maps a method to the per-stage standard deviation over seeds, drawn
    as a shaded band around its curve.
    """
    plt = _pyplot()
    key = "stage_avg_acc" if metric == "Avg.ACC" else "stage_forgetting"
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    names = next(r for r in records)["paper_names"]
    stages = range(1, len(names) + 1)
    low = 0.0
    bounds = 0  # the upper bounds drawn so far (multitask, multitask-tokens, multitask-sqrt): one line style each
    for i, r in enumerate(records):
        curve = r.get(key) or (M.stage_forgetting(r["acc"]) if key == "stage_forgetting" and r["stage_avg_acc"]
                              else None)
        if r.get("joint"):
            if metric == "Avg.ACC" and r["metrics"].get("Avg.ACC") is not None:
                ax.axhline(r["metrics"]["Avg.ACC"], color="0.4", linestyle=("--", ":", "-.")[bounds % 3],
                           linewidth=1.0, label=f"{r['method']} (upper bound)")
                bounds += 1
            continue
        if not curve:
            continue
        style = _method_style(i, r["method"])
        xs = list(stages)[: len(curve)]
        low = min(low, min(curve))
        ax.plot(xs, curve, label=r["method"], **style)
        if bands and r["method"] in bands:
            lo = [c - b for c, b in zip(curve, bands[r["method"]])]
            hi = [c + b for c, b in zip(curve, bands[r["method"]])]
            ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
    ax.set_xticks(list(stages), [f"{k}: {n}" for k, n in zip(stages, names)], rotation=30, ha="right")
    ax.set_xlim(0.7, len(names) + 0.3)
    ax.set_ylim(0 if metric == "Avg.ACC" else min(0.0, 5 * math.floor((low - 2) / 5)), 100)
    ax.set_xlabel("stage (task just trained)")
    ax.set_ylabel(f"{metric} over the tasks seen (%)" if metric == "Avg.ACC"
                  else "Forgetting of the earlier tasks (points)")
    ax.set_title(f"{metric} after each stage")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    else:  # e.g. the Forgetting of a comparison of upper bounds only: nothing has stages
        ax.text(0.5, 0.5, "no method with stages in this comparison", transform=ax.transAxes,
                ha="center", va="center", color="0.4")
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
    stage_plot(out / "stage_avg_acc.png", records)
    stage_plot(out / "stage_forgetting.png", records, "Forgetting")
    return md
