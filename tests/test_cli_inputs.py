"""``mage-cl`` refuses bad input up front, handles Ctrl-C, ``--overwrite`` and the default results directory.

Every bad input must give exit code 2 and ONE line ``mage-cl: error: ...`` (no traceback), and
nothing may be built or trained before the error: the base-model cache stays empty and the
results directory is not created.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mage_cl.cli import main

FAST = ["--preset", "smoke", "--steps-per-task", "2", "--no-progress", "--backend", "torch"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A fresh base-model cache: after an up-front error it must still be empty (nothing pretrained)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MAGE_CL_CACHE", str(cache))
    return cache


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("mage-cl: error: "), err[0]
    assert "Traceback" not in captured.err + captured.out
    return err[0]


def _refused(capsys, argv, *words, cache=None, out=None):
    with pytest.raises(SystemExit) as exc:  # argparse-level errors exit from inside parse_args
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2, exc.value.code
    line = _one_error_line(capsys)
    for w in words:
        assert w in line, (w, line)
    if cache is not None:
        assert list(cache.iterdir()) == [], "something was pretrained before the error"
    if out is not None:
        assert not (Path(out) / "checkpoint.json").exists()
    return line


@pytest.mark.parametrize("flag, value, words", [
    ("--steps-per-task", "0", ["--steps-per-task", "must be >= 1, got 0"]),
    ("--steps-per-task", "-3", ["--steps-per-task", "must be >= 1, got -3"]),
    ("--steps-per-task", "ten", ["--steps-per-task", "must be an integer, got 'ten'"]),
    ("--max-stages", "0", ["--max-stages", "must be >= 1, got 0"]),
    ("--max-stages", "-1", ["--max-stages", "must be >= 1, got -1"]),
    ("--seed", "-1", ["--seed", "must be in [0, 2147483647], got -1"]),
    ("--seed", "99999999999", ["--seed", "got 99999999999"]),
    ("--lr", "0", ["--lr", "must be a finite number > 0, got 0"]),
    ("--lr", "-0.001", ["--lr", "must be a finite number > 0, got -0.001"]),
    ("--lr", "nan", ["--lr", "must be a finite number > 0, got nan"]),
    ("--lr", "inf", ["--lr", "must be a finite number > 0, got inf"]),
    ("--lr", "fast", ["--lr", "must be a number, got 'fast'"]),
    ("--lr-schedule", "linear", ["--lr-schedule", "invalid choice: 'linear'"]),
])
def test_numbers_out_of_range_are_refused_before_any_work(capsys, empty_cache, tmp_path, flag, value, words):
    out = tmp_path / "out"
    _refused(capsys, ["run", "--method", "lora", flag, value, "--out", str(out)] + FAST, *words,
             cache=empty_cache, out=out)
    assert not out.exists()


def test_demo_and_jobs_numbers_are_refused(capsys):
    _refused(capsys, ["demo", "--steps", "-5"], "--steps", "must be in [1, 100000], got -5")
    _refused(capsys, ["compare", "--methods", "lora", "--jobs", "0"] + FAST, "--jobs", "must be >= 1, got 0")


def test_unknown_names_list_the_choices(capsys, empty_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _refused(capsys, ["run", "--method", "nope"] + FAST, "unknown method 'nope'", "mage", "ew-ga",
                    cache=empty_cache)
    assert "multitask" in line
    _refused(capsys, ["run"] + FAST + ["--backend", "gpu"], "unknown backend 'gpu'", "triton", cache=empty_cache)
    _refused(capsys, ["compare", "--methods", "lora,lora"] + FAST, "names a method twice", cache=empty_cache)
    _refused(capsys, ["run", "--resume", "--overwrite"] + FAST, "not allowed with argument")


def test_out_that_is_a_file_or_unwritable_is_refused_before_training(capsys, empty_cache, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(capsys, ["run", "--out", str(afile)] + FAST, "is a file, not a directory", cache=empty_cache)
    _refused(capsys, ["run", "--out", str(afile / "sub")] + FAST, "cannot be created", str(afile),
             cache=empty_cache)
    # /proc accepts no new files, even for root (a read-only place like a read-only mount)
    _refused(capsys, ["run", "--out", "/proc/mage-cl-test-out"] + FAST, "is not writable", cache=empty_cache)
    _refused(capsys, ["compare", "--methods", "lora,mage", "--out", str(afile)] + FAST, "is a file",
             cache=empty_cache)


def test_existing_run_needs_resume_or_overwrite_and_the_advice_works(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGE_CL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", "--method", "lora", "--out", str(out), "--max-stages", "1"] + FAST) == 0
    capsys.readouterr()
    line = _refused(capsys, ["run", "--method", "lora", "--out", str(out)] + FAST, "already holds a run",
                    "--resume", "--overwrite")
    # a different configuration: the advice names the three ways out, and each one works
    line = _refused(capsys, ["run", "--method", "lora", "--out", str(out), "--resume", "--seed", "1"] + FAST,
                    "different configuration", "differs in: ", "seed", "--overwrite")
    assert "drop --resume" not in line
    assert main(["run", "--method", "lora", "--out", str(out), "--resume", "--max-stages", "2"] + FAST) == 0
    err = capsys.readouterr().err
    assert f"resuming {out}: 1 of 6 stage(s) finished (vqa); continuing with stage 2 (classification)" in err
    assert json.loads((out / "checkpoint.json").read_text())["stages_done"] == 2
    assert main(["run", "--method", "lora", "--out", str(out), "--overwrite", "--seed", "1",
                 "--max-stages", "1"] + FAST) == 0
    err = capsys.readouterr().err
    assert "--overwrite: removed the previous run" in err and "checkpoint.pt" in err
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["config"]["seed"] == 1 and meta["stages_done"] == 1


def test_default_results_directory_and_final_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGE_CL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--method", "ew"] + FAST) == 0
    out = Path("runs") / "ew-smoke-default-seed0"
    rec = json.loads((out / "results.json").read_text())
    assert rec["complete"] and rec["out"] == str(out)
    learned, note, last = capsys.readouterr().out.strip().splitlines()[-3:]
    diag = ", ".join(f"{name} {rec['acc'][j][j]:.1f}" for j, name in enumerate(rec["paper_names"]))
    assert learned == f"mage-cl: accuracy right after learning each task (New.ACC is their mean): {diag}"
    assert note.startswith("mage-cl: note: the smoke preset is a plumbing check") and "--preset cpu" in note
    assert last.startswith("mage-cl: ew (smoke preset, default order, seed 0): Avg.ACC ")
    assert "Forgetting" in last and "New.ACC" in last and last.endswith(f"results in {out}/")
    for name in ("accuracy.csv", "table.md", "accuracy_matrix.png", "stage_avg_acc.png"):
        assert (out / name).is_file(), name


def test_help_lists_methods_orders_presets_backends_with_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    from mage_cl.methods import METHODS
    from mage_cl.presets import PRESETS
    from mage_cl.tasks import ORDERS

    width = max(map(len, METHODS))  # one column for every method's summary, however long the names
    for name, cls in METHODS.items():
        assert f"\n  {name:<{width}} {cls.summary}\n" in text
    for name in ORDERS:
        assert f"  {name:<13} " in text
    for name, p in PRESETS.items():
        assert p.description and f"  {name:<6} {p.description}" in text
    for name in ("auto", "torch", "triton", "cuda"):
        assert f"  {name:<7} " in text
    flat = " ".join(text.split())  # argparse wraps the option help
    assert "(default: mage)" in flat and "(default: default)" in flat and "(default: 0)" in flat
    assert "ALGORITHM.md" in text


def _sigint_ignored() -> str:
    """Whether this process ignores or blocks SIGINT at the OS level (a child inherits both)."""
    with open("/proc/self/status") as f:
        masks = {ln.split(":")[0]: int(ln.split()[1], 16) for ln in f if ln.startswith(("SigIgn:", "SigBlk:"))}
    return ", ".join(f"{k} {bool(v & (1 << (signal.SIGINT - 1)))}" for k, v in masks.items())


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _child(args, cwd, cache):
    env = dict(os.environ, MAGE_CL_CACHE=str(cache), PYTHONPATH=os.pathsep.join(
        [str(REPO), str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    # as from a terminal: the child starts with SIGINT's default action and unblocked even where
    # the test runner's process ignores or blocks SIGINT (both are inherited across exec; in full
    # suite runs every SIGINT sent to the child was lost)
    return subprocess.Popen([sys.executable, "-m", "mage_cl.cli"] + args, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def test_ctrl_c_keeps_the_checkpoint_and_resume_reaches_the_same_results(tmp_path):
    cache = tmp_path / "cache"
    args = ["run", "--method", "mage"] + FAST[:2] + ["--steps-per-task", "6"] + FAST[4:]
    # the uninterrupted reference (it also fills the base-model cache)
    ref = _child(args + ["--out", str(tmp_path / "ref")], tmp_path, cache)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    out = tmp_path / "cut"
    child = _child(args + ["--out", str(out)], tmp_path, cache)
    meta = out / "checkpoint.json"
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        if meta.exists() and json.loads(meta.read_text() or "{}").get("stages_done", 0) >= 2:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it could be interrupted"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, f"SIGINT in this test process: {_sigint_ignored()}; {err}"
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mage-cl: interrupted during stage ") and " of 6 (" in lines[0]
    assert "rerun with --resume to continue" in lines[0]
    done = json.loads(meta.read_text())["stages_done"]
    assert 2 <= done < 6
    import torch

    first_process = torch.load(out / "checkpoint.pt", weights_only=True)["elapsed_seconds"]
    resumed = _child(args + ["--out", str(out), "--resume"], tmp_path, cache)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming {out}: {done} of 6 stage(s) finished" in err
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    for key in ("acc", "iuf", "hal", "oth", "metrics", "final_loss"):
        assert a[key] == b[key], key
    assert b["processes"] == 2
    # wall time accumulates over both processes: the first one's share is part of the total
    assert b["wall_seconds"] > first_process > 0


def test_stage_lines_name_the_task_just_learned_first(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGE_CL_CACHE", str(tmp_path / "cache"))
    argv = [a for a in FAST if a != "--no-progress"]
    assert main(["run", "--method", "lora", "--tasks", "vqa,ocr", "--out", str(tmp_path / "run")] + argv) == 0
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " finished (" in ln]
    (a, b), acc = lines, rec["acc"]
    assert a.startswith("mage-cl: stage 1/2 finished (") and a.endswith(f"VQAv2 {acc[0][0]:.1f} right after learning it")
    assert b.startswith("mage-cl: stage 2/2 finished (")
    assert b.endswith(f"OCRVQA {acc[1][1]:.1f} right after learning it; earlier tasks now: VQAv2 {acc[1][0]:.1f}")


def test_zero_shot_prints_no_learning_lines(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGE_CL_CACHE", str(tmp_path / "cache"))
    argv = [a for a in FAST if a != "--no-progress"]
    assert main(["run", "--method", "zero-shot", "--out", str(tmp_path / "run")] + argv) == 0
    captured = capsys.readouterr()
    assert " finished (" not in captured.err and "right after learning" not in captured.out
