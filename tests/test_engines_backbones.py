"""A real backbone (``--model``) under ``torchrun``: FSDP2 and DeepSpeed ZeRO-2 end where DDP ends.

A tiny random Janus (``backbone_fakes``) trains MAGE on VQAv2 then Flickr30k (text -> image),
2 steps per task, with 2 gloo processes. FSDP2 shards only the decoder layers that hold adapters
(the frozen towers stay whole: the backbone calls them outside the root's forward) and evaluates
in lock-step. To drive the lock-step image path, the launcher makes rank 0 answer every image
prompt with the image-start token and rank 1 none: rank 1 must then run the image generation
with rank 0 (on a stand-in prompt it drops) or the ranks would deadlock. DDP runs the same patch.
Each engine must end at DDP's adapters (float tolerance) with DDP's accuracy matrices, and FSDP2
and ZeRO-2 hold half of DDP's PEMA state per rank. Emu3 and Chameleon were checked by hand the
same way (README); ZeRO-3 with a ``--model`` is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scale_harness
from backbone_fakes import make_clip, make_data, make_janus
from mage_cl import runner
from mage_cl.runner import RunOptions, UsageError

#: The launched script: rank 0's image prompts are answered with the image start, rank 1's never.
_SCRIPT = """import os, sys
from mage_cl.backbones.hf import HFBackbone
orig = HFBackbone._greedy_text
def greedy(self, model, prompts, pixels, max_new_tokens, lockstep=False):
    outs = orig(self, model, prompts, pixels, max_new_tokens, lockstep)
    if max_new_tokens == self.options.max_text_answer:
        return [[self.image_start_id] if os.environ.get("RANK", "0") == "0" else [] for _ in outs]
    return outs
HFBackbone._greedy_text = greedy
from mage_cl.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines_backbones")
    model, clip = make_janus(root / "janus"), make_clip(root / "clip")
    data = make_data(root / "data", ["VQAv2", "Flickr30k"])
    script = root / "patched_cli.py"
    script.write_text(_SCRIPT)
    launcher = scale_harness.write_launcher(root / "launch.py", target="script")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    out = {}
    for name, extra in (("ddp", []), ("fsdp", ["--distributed", "fsdp"]), ("zero2", ["--distributed", "deepspeed"])):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", launcher,
                str(script), "run", "--method", "mage", "--model", str(model), "--data-dir", str(data),
                "--clip", str(clip), "--preset", "smoke", "--steps-per-task", "2", "--no-progress",
                "--backend", "torch", "--out", str(root / name), *extra]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[name] = proc
    return root, out


def _load(root: Path, name: str):
    return (torch.load(root / name / "checkpoint.pt", weights_only=False),
            json.loads((root / name / "results.json").read_text()))


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_a_real_backbone_under_the_engine_ends_where_ddp_ends(runs, engine):
    root, procs = runs
    ref, ref_res = _load(root, "ddp")
    got, res = _load(root, engine)
    assert got["stages_done"] == ref["stages_done"] == 2
    moved = 0
    for k, v in ref["adapters"].items():
        torch.testing.assert_close(got["adapters"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        moved += int(".lora_B." in k and v.abs().sum() > 0)
    assert moved > 0
    for key in ("acc", "iuf", "hal", "oth"):
        assert res[key] == ref_res[key], key
    assert res["engine"] == ("fsdp" if engine == "fsdp" else "deepspeed") and res["world_size"] == 2
    assert res["method_state_bytes"] * 2 == ref_res["method_state_bytes"]
    # rank 0 answered Flickr30k with images (judged by CLIP), rank 1 with nothing: the lock-step image path ran
    assert "clip_score" in res["diagnostics"][1]
    assert res["diagnostics"][1]["clip_score"] == pytest.approx(ref_res["diagnostics"][1]["clip_score"], abs=1e-5)


def test_a_model_under_zero3_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    z3 = tmp_path / "z3.json"
    z3.write_text('{"zero_optimization": {"stage": 3}}')
    model = make_janus(tmp_path / "janus")
    with pytest.raises(UsageError, match="a --model runs under ZeRO stage 1 or 2, --distributed fsdp or ddp"):
        runner._validate(RunOptions(model_path=str(model), distributed="deepspeed", deepspeed_config=str(z3),
                                    data_dir=str(make_data(tmp_path / "data", ["VQAv2"]))))
