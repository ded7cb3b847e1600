"""The README's main job (``mage-cl run --method mage``, the default ``quick`` preset) shows learning.

Every task must be learned clearly above chance: its accuracy right after it was trained
(``a[i][i]``, the diagonal of the accuracy matrix) is compared with the zero-shot accuracy of the
same base model on the same test examples (the chance level of each task, measured, not
assumed). This can fail: a preset, model or task change that stops any task from being learned
breaks it.
"""

from __future__ import annotations

import pytest

from mage_cl.presets import DEFAULT_PRESET
from mage_cl.runner import RunOptions, compare

#: Points above the zero-shot accuracy that count as "clearly learned".
MARGIN = 10.0


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    import os

    old = os.environ.get("MAGE_CL_CACHE")
    os.environ["MAGE_CL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        out = tmp_path_factory.mktemp("runs") / "main"
        records, _, _ = compare(["zero-shot", "mage"], RunOptions(preset=DEFAULT_PRESET, out=str(out),
                                                                  progress=False, backend="torch"))
        yield {r["method"]: r for r in records}
    finally:
        if old is None:
            os.environ.pop("MAGE_CL_CACHE", None)
        else:
            os.environ["MAGE_CL_CACHE"] = old


def test_default_preset_is_the_learning_one():
    assert DEFAULT_PRESET == "quick"


def test_every_task_is_learned_clearly_above_chance(main_job):
    zs, mage = main_job["zero-shot"], main_job["mage"]
    chance = zs["acc"][-1]
    learned = [mage["acc"][i][i] for i in range(len(mage["tasks"]))]
    low = [(n, a, c) for n, a, c in zip(mage["paper_names"], learned, chance) if not a >= c + MARGIN]
    assert not low, f"tasks not learned {MARGIN} points above zero-shot (task, learned, zero-shot): {low}"
    assert mage["metrics"]["New.ACC"] >= zs["metrics"]["New.ACC"] + MARGIN
