"""The README's first command -- the main job -- learns every task (issue 9).

This runs the ``mage-cl run ...`` of the README's first bash block as written (the CLI's own
parser and entry point; only ``--out`` is added, into a temporary directory), then the
``zero-shot`` row of the same preset, seed and order, and asserts that the accuracy on each task
right after learning it (the diagonal of the accuracy matrix, whose mean is New.ACC) is at least
:data:`MARGIN` points above that task's zero-shot accuracy. The assertion can fail: a method that
does not learn a task, or a preset too small to learn in, stays at its zero-shot rate.

It is the suite's longest test (the ``cpu`` preset: several minutes on one core), so
``tests/conftest.py`` schedules it first.
"""

from __future__ import annotations

import json

from mage_cl.cli import main
from test_readme import blocks, mage_cl_commands

#: Points above zero-shot each task must reach right after it is learned. With the ``cpu``
#: preset's 300 test examples per task, one standard error of an accuracy near 50 % is 2.9 points.
MARGIN = 5.0


def first_command() -> list:
    """The argv (after ``mage-cl``) of the first ``mage-cl run`` in the README's first bash block."""
    runs = [argv for argv in mage_cl_commands(blocks("bash")[:1]) if argv[:1] == ["run"]]
    assert runs, "the README's first bash block has no `mage-cl run` command"
    return runs[0]


def test_the_first_command_is_a_mage_run_of_a_preset_that_learns():
    argv = first_command()
    assert argv[:1] == ["run"] and "--method" in argv and "--preset" in argv
    assert argv[argv.index("--preset") + 1] != "smoke", "the smoke preset is a plumbing check, not the main job"


def _flag(argv: list, name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def test_the_main_job_learns_every_task_above_zero_shot(tmp_path, capsys):
    argv = first_command()
    assert main(argv + ["--out", str(tmp_path / "main")]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert "plumbing check" not in out
    assert last.startswith("mage-cl: ") and "New.ACC" in last and str(tmp_path / "main") in last
    zero = ["run", "--method", "zero-shot", "--preset", _flag(argv, "--preset", "smoke"),
            "--order", _flag(argv, "--order", "default"), "--seed", _flag(argv, "--seed", "0"),
            "--out", str(tmp_path / "zero")]
    assert main(zero) == 0
    run = json.loads((tmp_path / "main" / "results.json").read_text())
    base = json.loads((tmp_path / "zero" / "results.json").read_text())
    assert run["complete"] and run["tasks"] == base["tasks"]
    learned = [run["acc"][j][j] for j in range(len(run["tasks"]))]
    before = base["acc"][-1]
    short = [f"{name}: {a:.1f} after learning vs {b:.1f} zero-shot"
             for name, a, b in zip(run["paper_names"], learned, before) if a < b + MARGIN]
    assert not short, f"tasks not learned {MARGIN} points above zero-shot: {'; '.join(short)}"
    assert abs(run["metrics"]["New.ACC"] - sum(learned) / len(learned)) < 1e-9
