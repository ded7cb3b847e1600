"""The README's usage examples for adapters, targets, save/load, PEFT and Trainer run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")

# The headings whose first python block is a self-contained example.
EXAMPLES = [
    "## Using the library",
    "**Choosing the layers**",
    "**Saving, loading, merging**",
    "**PEFT interop**",
    "**With the Hugging Face `Trainer`**",
    "**A quantized base with `Trainer`.**",
]


def _block_after(text: str, heading: str) -> str:
    start = text.index(heading)
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert m is not None, heading
    return m.group(1)


@pytest.mark.parametrize("heading", EXAMPLES)
def test_readme_example_runs(heading, tmp_path, monkeypatch, capsys):
    with open(README, encoding="utf-8") as f:
        code = _block_after(f.read(), heading)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md ({heading})", "exec"), {"__name__": "__readme__"})
