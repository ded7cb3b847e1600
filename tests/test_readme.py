"""The README's code runs as written.

* Every ```python block is executed, in order, in one fresh interpreter (blocks may build on
  the ones before them, as a reader runs them), on the CPU with the sizes the README shows;
  the multi-process scripts (first line ``# name.py``) are run by ``tests/test_scale_readme.py``.
* Every ``mage-cl ...`` line of a ```bash block is parsed by the real argument parser, so a
  renamed flag or a removed choice in the README fails here. (The long runs themselves are not
  executed here; the smoke preset's whole sequence is run by ``tests/test_driver_smoke.py``.)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(lang: str):
    return [m.group(2) for m in FENCE.finditer(README.read_text()) if m.group(1) == lang]


def test_the_readme_has_python_and_bash_blocks():
    assert blocks("python") and blocks("bash")


#: A block whose first line names a script file (``# train_ddp.py``) is a multi-process script;
#: ``tests/test_scale_readme.py`` runs those with their README launch commands.
SCRIPT = re.compile(r"^# \w+\.py\s*$")


def test_python_blocks_run_as_written(tmp_path):
    inline = [b for b in blocks("python") if not SCRIPT.match(b.splitlines()[0] if b else "")]
    assert len(inline) < len(blocks("python")), "the README's launch scripts are no longer recognized"
    code = "\n\n".join(f"# --- README python block {i}\n{b}" for i, b in enumerate(inline))
    script = tmp_path / "readme_blocks.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "python"),
                                                        os.environ.get("PYTHONPATH", "")]),
               MAGE_CL_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"README python blocks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _commands(line: str):
    """Split one shell line into its simple commands (quotes respected, ``;``/``&&``/``|`` split)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    words: list[str] = []
    for tok in lex:
        if tok and set(tok) <= set(";&|"):
            yield words
            words = []
        else:
            words.append(tok)
    yield words


def mage_cl_commands(bash_blocks=None):
    """The argv (after ``mage-cl``) of every ``mage-cl`` command in ``bash_blocks`` (default: all of the README's)."""
    for b in blocks("bash") if bash_blocks is None else bash_blocks:
        for line in b.replace("\\\n", " ").splitlines():
            if "mage-cl" not in line and "mage_cl.cli" not in line:
                continue  # other shell lines (pip, multi-line python -c strings) are not parsed here
            for words in _commands(line.split(" #", 1)[0].strip()):
                while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                    words = words[1:]
                if words[:1] == ["mage-cl"]:
                    yield words[1:]
                elif words[:3] == ["python", "-m", "mage_cl.cli"]:
                    yield words[3:]
                elif words[:1] == ["torchrun"] and "mage_cl.cli" in words:
                    yield words[words.index("mage_cl.cli") + 1:]


@pytest.mark.parametrize("argv", list(mage_cl_commands()), ids=lambda a: " ".join(a)[:60])
def test_mage_cl_commands_in_the_readme_parse(argv, monkeypatch):
    from mage_cl.cli import _parser

    if "--distributed" in argv:  # a torchrun line: the engines need WORLD_SIZE > 1 (nothing is launched here)
        monkeypatch.setenv("WORLD_SIZE", "2")
    args = _parser().parse_args(argv)  # exits (SystemExit 2, one line) on an unknown flag or bad number
    from mage_cl import runner

    if args.command in ("run", "compare"):
        from mage_cl.cli import _methods, _options

        opts = _options(args)
        for m in _methods(args.methods) if args.command == "compare" else [opts.method]:
            try:
                runner._validate(runner.RunOptions(**{**opts.__dict__, "method": m}))
            except runner.UsageError as e:
                # the README downloads (or builds) the checkpoint in the line before; only that may be missing
                # (and the --deepspeed-config file is written by the README's line before)
                made = [argv[argv.index(f) + 1] for f in ("--model", "--deepspeed-config") if f in argv]
                if not any(str(e).startswith(path + ": no such") or f" {path}: no such" in str(e) for path in made):
                    raise
