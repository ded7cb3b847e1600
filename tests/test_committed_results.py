"""The committed continual-learning results are the driver's own output, and their README tables come from them.

For every ``bench/results/*/`` holding ``comparison.json`` files:

* every record's metrics are what ``mage_cl.metrics.summarize`` computes from its own accuracy and
  error matrices, and each matrix row is a distribution (accuracy + IUF + HAL + OTH = 100): the
  JSON was not edited by hand;
* a per-method ``results.json`` next to a comparison holds the same matrices as the comparison's
  record for that method;
* where the results README has a generated part (between ``bench/cl_report.py``'s markers), it is
  exactly what ``bench/cl_report.py`` renders from the committed JSON now.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from mage_cl import metrics as M

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
DIRS = sorted({p.parent.relative_to(RESULTS).parts[0] for p in RESULTS.rglob("comparison.json")})


def _report():
    spec = importlib.util.spec_from_file_location("cl_report", RESULTS.parent / "cl_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and (b is None or (isinstance(b, float) and math.isnan(b)))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("name", DIRS)
def test_records_are_consistent_driver_output(name):
    for path in sorted((RESULTS / name).rglob("comparison.json")):
        for r in json.loads(path.read_text()):
            if r.get("joint"):
                assert _close(r["metrics"]["Avg.ACC"], sum(r["acc"][-1]) / len(r["acc"][-1]))
                continue
            want = M.summarize(r["acc"], r["iuf"], r["hal"], r["oth"])
            for k, v in want.items():
                assert _close(r["metrics"][k], v), (path, r["method"], k)
            for j, row in enumerate(r["acc"]):
                for i, a in enumerate(row):
                    if a is not None:
                        total = a + r["iuf"][j][i] + r["hal"][j][i] + r["oth"][j][i]
                        assert math.isclose(total, 100.0, abs_tol=1e-6), (path, r["method"], j, i)
            own = path.parent / r["method"] / "results.json"
            if own.exists():
                mine = json.loads(own.read_text())
                for k in ("acc", "iuf", "hal", "oth"):
                    assert mine[k] == r[k], (own, k)


@pytest.mark.parametrize("name", [d for d in DIRS if _report().BEGIN in
                                  ((RESULTS / d / "README.md").read_text() if (RESULTS / d / "README.md").exists()
                                   else "")])
def test_readme_tables_are_generated_from_the_json(name):
    report = _report()
    text = (RESULTS / name / "README.md").read_text()
    committed = report.BEGIN + text.split(report.BEGIN, 1)[1].split(report.END, 1)[0] + report.END
    assert committed == report.render(RESULTS / name), (
        f"bench/results/{name}/README.md's tables differ from its JSON: run python bench/cl_report.py "
        f"bench/results/{name} --write")


def test_a_superseded_folder_stays_out_of_the_tables(tmp_path):
    """A folder holding SUPERSEDED.md (kept for the record) is not aggregated; its siblings are."""
    report = _report()
    src = next(p for p in sorted(RESULTS.rglob("comparison.json")))
    for sub in ("kept/seed0", "old/seed0", "old/deeper/seed0"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "comparison.json").write_text(src.read_text())
    n = len(json.loads(src.read_text()))
    with pytest.raises(ValueError, match="appears twice"):
        report.group(report.load(tmp_path))
    (tmp_path / "old" / report.SUPERSEDED).write_text("rerun on another machine\n")
    records = report.load(tmp_path)
    assert len(records) == n and {r["_source"] for r in records} == {"kept/seed0/comparison.json"}
    report.group(records)  # no duplicates left
