"""Shared set-up of the pytest-benchmark suite (run: ``pytest bench --benchmark-only``).

* Sizes are chosen from the hardware: with a CUDA GPU, a LLaMA-13B-like MLP
  projection (d=5120 -> ffn 13824, 8192 tokens, bf16); on CPU a small one
  (d=256 -> ffn 512, 512 tokens, fp32). Override with ``MAGE_BENCH_SIZE=cpu|gpu``.
* :class:`Results` collects each timed case's median; at the end of the session
  a table of medians and their ratio to the floor (the frozen base linear's
  forward + input-gradient) is printed for every group that has a floor, and
  written as Markdown to ``$MAGE_BENCH_RESULTS`` when that variable names a file.

Nothing here is specific to one benchmark file: other ``bench/test_*.py`` files
may use the ``bench_results`` fixture with their own group names, or ignore it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

import pytest
import torch


@dataclasses.dataclass(frozen=True)
class BenchSize:
    name: str
    device: str
    dtype: torch.dtype
    d_model: int
    d_ffn: int
    tokens: int
    rounds: int
    warmup_rounds: int


CPU_SIZE = BenchSize("cpu-small", "cpu", torch.float32, d_model=256, d_ffn=512, tokens=512, rounds=30,
                     warmup_rounds=3)
GPU_SIZE = BenchSize("llama13b-mlp", "cuda", torch.bfloat16, d_model=5120, d_ffn=13824, tokens=8192, rounds=20,
                     warmup_rounds=3)


def pick_size() -> BenchSize:
    want = os.environ.get("MAGE_BENCH_SIZE", "").lower()
    if want == "cpu":
        return CPU_SIZE
    if want == "gpu" or (not want and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise pytest.UsageError("MAGE_BENCH_SIZE=gpu but no CUDA device is available")
        return GPU_SIZE
    return CPU_SIZE


@dataclasses.dataclass
class Entry:
    group: str
    case: str
    median_s: float
    note: str = ""


class Results:
    """Medians by (group, case); the case named ``floor`` is each group's denominator."""

    FLOOR = "floor"

    def __init__(self) -> None:
        self.entries: List[Entry] = []
        self.headers: Dict[str, str] = {}

    def add(self, group: str, case: str, benchmark, note: str = "") -> Optional[float]:
        """Record ``benchmark``'s median (None when benchmarks are disabled); returns the ratio to the floor."""
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            return None
        median = float(stats.stats.median)
        self.entries.append(Entry(group, case, median, note))
        floor = self.floor(group)
        ratio = None if floor is None else median / floor
        benchmark.extra_info["median_s"] = median
        if ratio is not None:
            benchmark.extra_info["ratio_to_floor"] = round(ratio, 4)
        return ratio

    def floor(self, group: str) -> Optional[float]:
        for e in self.entries:
            if e.group == group and e.case == self.FLOOR:
                return e.median_s
        return None

    def table(self) -> List[str]:
        lines: List[str] = []
        for group in dict.fromkeys(e.group for e in self.entries):
            floor = self.floor(group)
            lines.append(f"### {group}")
            if group in self.headers:
                lines.append(self.headers[group])
            lines.append("")
            lines.append("| case | median (ms) | ratio to floor | note |")
            lines.append("|---|---:|---:|---|")
            for e in self.entries:
                if e.group != group:
                    continue
                ratio = f"{e.median_s / floor:.3f}" if floor else "n/a"
                lines.append(f"| {e.case} | {e.median_s * 1e3:.3f} | {ratio} | {e.note} |")
            lines.append("")
        return lines


_RESULTS = Results()


@pytest.fixture(scope="session")
def bench_size() -> BenchSize:
    return pick_size()


@pytest.fixture(scope="session")
def bench_results() -> Results:
    return _RESULTS


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    lines = _RESULTS.table()
    if not lines:
        return
    terminalreporter.write_sep("=", "benchmark medians and their ratio to each group's floor case")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get("MAGE_BENCH_RESULTS")
    if path:
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        terminalreporter.write_line(f"(written to {path})")
