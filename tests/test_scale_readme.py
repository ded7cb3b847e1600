"""The README's "Training at scale" scripts run as written, with their launch commands (2 gloo ranks, CPU).

Each script is taken from its README code block, written to a temporary directory
and launched with the README's command (``torchrun`` is ``python -m
torch.distributed.run``). The DeepSpeed one goes through a launcher (``scale_harness.write_launcher``) that
turns off the shared-memory all-reduce kernel DeepSpeed would otherwise JIT-compile
on its first start (about a minute on 2 cores; gloo does the same job), then runs the
script unchanged. The whole adapters each script saves must load (strictly) into a
single-process model built the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mage_kernels as mk
import scale_harness

README = Path(__file__).resolve().parents[1] / "README.md"

COMMANDS = {
    "train_ddp.py": "torchrun --standalone --nproc_per_node 2 train_ddp.py",
    "train_fsdp.py": "torchrun --standalone --nproc_per_node 2 train_fsdp.py",
    "train_deepspeed.py": "DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 train_deepspeed.py",
}
OUTPUT = {"train_ddp.py": "adapters.pt", "train_fsdp.py": "fsdp_checkpoint.pt", "train_deepspeed.py": "adapters.pt"}



def _readme_scripts():
    text = README.read_text(encoding="utf-8")
    return text, {m.group(2): m.group(1) for m in re.finditer(r"```python\n(# (train_\w+\.py)\n.*?)```", text, re.S)}


def test_the_readme_has_the_three_scripts_and_their_commands():
    text, scripts = _readme_scripts()
    assert sorted(scripts) == sorted(COMMANDS)
    flat = " ".join(text.split())
    for cmd in COMMANDS.values():
        assert f"`{cmd}`" in flat, cmd


def _model_like_the_readme():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4))
    return mk.inject(model)


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_readme_script_runs_as_written(tmp_path, script):
    _, scripts = _readme_scripts()
    path = tmp_path / script
    path.write_text(scripts[script], encoding="utf-8")
    env_part, _, rest = COMMANDS[script].rpartition("torchrun ")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for assignment in env_part.split():
        key, value = assignment.split("=", 1)
        env[key] = value
    args = rest.split()
    if script == "train_deepspeed.py":
        launcher = scale_harness.write_launcher(tmp_path / "no_shm_launch.py", target="script")
        args = args[:-1] + [launcher, script]
    cmd = [sys.executable, "-m", "torch.distributed.run"] + args
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    name = script[len("train_"):-len(".py")]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"{name}: PEMA fell back on ")]
    assert len(lines) == 1, proc.stdout[-2000:]  # rank 0 alone printed it
    saved = torch.load(tmp_path / OUTPUT[script], weights_only=True)
    adapters = saved["adapters"] if "adapters" in saved else saved
    model = _model_like_the_readme()
    mk.load_adapter_state_dict(model, adapters)  # strict: every adapter, whole shapes
    if "pema" in saved:  # FSDP2: theta* saved whole equals the adapters after finish_task
        trained = [n for n, p in mk.adapter_parameters(model, trainable_only=False) if n in saved["pema"]["names"]]
        assert trained and saved["pema"]["names"] == trained
        for n, e in zip(saved["pema"]["names"], saved["pema"]["emas"]):
            assert torch.equal(e, adapters[n]), n
