"""``mage-cl run --model`` on tiny random Janus / Emu3 / Chameleon checkpoints built here (the real CLI path).

Per family: a text-output and an image-output task (Chameleon: two text-output tasks, and the
refusal of an image-output one) with MAGE and LoRA. Checked: only the language model's adapters
train, frozen adapters and every non-adapter parameter are bit-identical afterwards, the
results directory holds the accuracy matrix, resume continues from the checkpoint; and every
user error is one ``mage-cl: error:`` line (exit 2) before any training.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import mage_kernels as mk
from backbone_fakes import make_chameleon, make_clip, make_data, make_emu3, make_janus
from mage_cl import runner
from mage_cl.cli import main
from mage_cl.trainer import Sequencer

warnings.filterwarnings("ignore", category=FutureWarning)

FAST = ["--preset", "smoke", "--steps-per-task", "2", "--no-progress", "--backend", "torch"]
LM = {"janus": "hf.model.language_model.layers.", "emu3": "hf.model.text_model.layers.", "chameleon": "hf.model.layers."}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_bb")
    return {
        "janus": make_janus(root / "janus"), "emu3": make_emu3(root / "emu3"),
        "chameleon": make_chameleon(root / "chameleon"), "clip": make_clip(root / "clip"),
        "data_janus": make_data(root / "data_janus", ["VQAv2", "Flickr30k"]),
        "data_emu3": make_data(root / "data_emu3", ["VQAv2", "HQEdit"]),
        "data_cham": make_data(root / "data_cham", ["VQAv2", "RefCOCO"]),
        "root": root,
    }


class Spy:
    """Records the trained model, its parameters when training starts, and what is trainable per stage."""

    def __init__(self, monkeypatch):
        self.model = None
        self.start = {}
        self.trainable = []
        spy = self

        class SpySequencer(Sequencer):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                spy.model = self.model
                spy.start = {n: p.detach().clone() for n, p in self.model.named_parameters()}
                before = self.method.before_task

                def before_task(task, j):
                    before(task, j)
                    spy.trainable.append(sorted(n for n, p in self.model.named_parameters() if p.requires_grad))

                self.method.before_task = before_task

        monkeypatch.setattr(runner, "Sequencer", SpySequencer)

    def params(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


def _is_adapter(name):
    return ".lora_A." in name or ".lora_B." in name


def _adapter_index(name):
    return int(name.rsplit(".", 1)[-1])


def _assert_checkpoint_weights_unchanged(model, path):
    """Every non-adapter parameter equals the checkpoint's, freshly loaded from disk, bit for bit."""
    from mage_cl.backbones import open_backbone

    fresh = dict(open_backbone(str(path)).load_model().named_parameters())
    own = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not _is_adapter(n)}
    assert set(own) == set(fresh)
    for n, p in own.items():
        assert torch.equal(p.detach().cpu(), fresh[n].detach()), n


def _run(args):
    return main(["run"] + args + FAST)


def _results(out):
    rec = json.loads((out / "results.json").read_text())
    for f in ("accuracy.csv", "errors_iuf.csv", "errors_hal.csv", "errors_oth.csv", "table.md"):
        assert (out / f).is_file(), f
    return rec


def _force_image_answers(monkeypatch):
    """The random models answer with text; make their first answer token the image start on image tasks,
    so the image decoding, the VQ decoder and the CLIP judge run through the CLI too."""
    from mage_cl.backbones.hf import HFBackbone

    orig = HFBackbone._greedy_text

    def greedy(self, model, prompts, pixels, max_new_tokens, lockstep=False):
        if max_new_tokens == self.options.max_text_answer:
            return [[self.image_start_id] for _ in prompts]
        return orig(self, model, prompts, pixels, max_new_tokens, lockstep)

    monkeypatch.setattr(HFBackbone, "_greedy_text", greedy)


def test_janus_mage_trains_only_lm_adapters_and_resumes(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mage"
    args = ["--method", "mage", "--model", str(env["janus"]), "--data-dir", str(env["data_janus"]),
            "--clip", str(env["clip"]), "--out", str(out)]
    spy = Spy(monkeypatch)
    assert _run(args + ["--max-stages", "1"]) == 0
    assert "continue with --resume" in capsys.readouterr().out
    start, after1 = spy.start, spy.params()
    # stage 1 = VQAv2 (image + text -> text): adapters 0, 1, 2 of the LM train, nothing else
    (tr,) = spy.trainable
    assert tr and all(n.startswith(LM["janus"]) and _is_adapter(n) for n in tr)
    assert {_adapter_index(n) for n in tr} == {0, 1, 2}
    for n, p in after1.items():
        if not _is_adapter(n) or _adapter_index(n) == 3:
            assert torch.equal(p, start[n]), n  # frozen adapters and every base parameter: bit-identical
    assert any(not torch.equal(after1[n], start[n]) for n in tr)
    assert not any(n.startswith(("hf.model.vision_model", "hf.model.vqmodel", "hf.model.generation", "hf.model.aligner"))
                   for n, _ in mk.mage_layers(spy.model))
    ck = json.loads((out / "checkpoint.json").read_text())
    assert ck["stages_done"] == 1 and ck["config"]["backbone"] == "janus"

    spy2 = Spy(monkeypatch)
    assert _run(args + ["--resume"]) == 0
    for n, p in spy2.start.items():  # the resumed run starts from the stage-1 adapters
        assert torch.equal(p, after1[n]), n
    after2 = spy2.params()
    (tr2,) = spy2.trainable  # stage 2 only = Flickr30k (text -> image): adapters 0 and 3
    assert {_adapter_index(n) for n in tr2} == {0, 3} and all(n.startswith(LM["janus"]) for n in tr2)
    for n, p in after2.items():
        if not _is_adapter(n) or _adapter_index(n) in (1, 2):
            assert torch.equal(p, after1[n]), n
    _assert_checkpoint_weights_unchanged(spy2.model, env["janus"])
    rec = _results(out)
    assert rec["tasks"] == ["vqa", "generation"] and rec["paper_names"] == ["VQAv2", "Flickr30k"]
    assert len(rec["acc"]) == 2 and rec["acc"][0][1] is None and rec["acc"][1][1] is not None
    assert rec["backbone"] == "janus" and rec["clip_threshold"]["generation"]["how"].startswith("auto")
    for j, row in enumerate(rec["acc"]):  # every answer is correct or exactly one error type
        for i, a in enumerate(row):
            if a is not None:
                assert a + rec["iuf"][j][i] + rec["hal"][j][i] + rec["oth"][j][i] == pytest.approx(100.0)


def test_janus_lora_and_image_answers_through_the_cli(env, tmp_path, monkeypatch):
    _force_image_answers(monkeypatch)
    spy = Spy(monkeypatch)
    out = tmp_path / "lora"
    assert _run(["--method", "lora", "--model", str(env["janus"]), "--data-dir", str(env["data_janus"]),
                 "--clip", str(env["clip"]), "--out", str(out), "--clip-threshold", "0"]) == 0
    assert len(spy.trainable) == 2
    for tr in spy.trainable:  # one rank-32 adapter on the LM's q/k/v/o/gate/up/down, both stages
        assert tr and all(n.startswith(LM["janus"]) and _is_adapter(n) and _adapter_index(n) == 0 for n in tr)
        assert len(tr) == 2 * 7 * 2  # layers x linears x (A, B)
    after = spy.params()
    for n, p in after.items():
        if not _is_adapter(n):
            assert torch.equal(p, spy.start[n]), n
    rec = _results(out)
    assert rec["acc"][1][1] == 100.0  # threshold 0: every decoded image counts
    assert 0.0 <= rec["diagnostics"][1]["clip_score"]["generation"] <= 100.0
    assert rec["clip_threshold"]["generation"] == {"tau": 0.0, "how": "fixed"}


@pytest.mark.parametrize("method", ["mage", "lora"])
def test_emu3_with_micro_batches_and_gradient_checkpointing(env, tmp_path, monkeypatch, method):
    _force_image_answers(monkeypatch)
    spy = Spy(monkeypatch)
    out = tmp_path / method
    assert _run(["--method", method, "--model", str(env["emu3"]), "--data-dir", str(env["data_emu3"]),
                 "--clip", str(env["clip"]), "--out", str(out), "--image-size", "16", "--max-batch-tokens", "200",
                 "--gradient-checkpointing"]) == 0
    first, second = spy.trainable  # VQAv2 then HQEdit (image + text -> image)
    assert all(n.startswith(LM["emu3"]) and _is_adapter(n) for n in first + second)
    if method == "mage":
        assert {_adapter_index(n) for n in first} == {0, 1, 2}
        assert {_adapter_index(n) for n in second} == {0, 1, 3}
    else:
        assert {_adapter_index(n) for n in first + second} == {0}
    assert not any(n.startswith("hf.model.vqmodel") for n, _ in mk.mage_layers(spy.model))
    _assert_checkpoint_weights_unchanged(spy.model, env["emu3"])
    rec = _results(out)
    assert rec["tasks"] == ["vqa", "editing"] and rec["gradient_checkpointing"] is True
    assert "clip_score" in rec["diagnostics"][1] and rec["train_tokens"] > 0
    assert json.loads((out / "checkpoint.json").read_text())["config"]["train"]["max_batch_tokens"] == 200


@pytest.mark.parametrize("method", ["mage", "lora"])
def test_chameleon_text_tasks(env, tmp_path, monkeypatch, method):
    spy = Spy(monkeypatch)
    out = tmp_path / method
    assert _run(["--method", method, "--model", str(env["chameleon"]), "--data-dir", str(env["data_cham"]),
                 "--out", str(out)]) == 0
    assert all(n.startswith(LM["chameleon"]) and _is_adapter(n) for tr in spy.trainable for n in tr)
    if method == "mage":
        assert [{_adapter_index(n) for n in tr} for tr in spy.trainable] == [{0, 1, 2}, {0, 1, 2}]
    _assert_checkpoint_weights_unchanged(spy.model, env["chameleon"])
    rec = _results(out)
    assert rec["paper_names"] == ["VQAv2", "RefCOCO"] and rec["backbone"] == "chameleon"


# ---------------------------------------------------------------------------------------- errors


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("mage-cl: error: ")
    return err[0]


def _refuse(capsys, monkeypatch, args, *words):
    trained = []
    monkeypatch.setattr(runner, "Sequencer", lambda *a, **k: trained.append(1))
    assert main(["run"] + args + FAST) == 2
    line = _error_line(capsys)
    for w in words:
        assert w in line, line
    assert not trained  # refused before any training


def test_chameleon_refuses_an_image_output_task_before_training(env, capsys, monkeypatch):
    data = make_data(env["root"] / "data_cham_img", ["VQAv2", "Flickr30k"])
    _refuse(capsys, monkeypatch, ["--model", str(env["chameleon"]), "--data-dir", str(data), "--clip", str(env["clip"])],
            "Flickr30k", "infinite loss", "--tasks")
    # the text tasks alone run (the refusal names the way out)
    _refuse(capsys, monkeypatch, ["--model", str(env["chameleon"]), "--data-dir", str(data), "--tasks", "vqa,ocr"],
            "--tasks ocr", "no OCRVQA/")


def test_user_errors_are_one_line_before_training(env, tmp_path, capsys, monkeypatch):
    j, d = str(env["janus"]), str(env["data_janus"])
    clip = str(env["clip"])
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", d], "Flickr30k are judged by CLIP score", "--clip DIR")
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", d, "--clip", str(tmp_path)], "--clip", "no config.json")
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", d, "--clip", j], "--clip", "not a CLIPModel")
    (tmp_path / "empty").mkdir()
    _refuse(capsys, monkeypatch, ["--model", str(tmp_path / "empty"), "--data-dir", d], "not a transformers checkpoint")
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    _refuse(capsys, monkeypatch, ["--model", str(vit), "--data-dir", d], "'vit' is not supported")
    noproc = tmp_path / "noproc"
    noproc.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(env["janus"] / f, noproc / f)
    _refuse(capsys, monkeypatch, ["--model", str(noproc), "--data-dir", d], "no usable Janus processor")
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", d, "--backbone", "emu3"], "model_type 'janus'")
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", d, "--attn-implementation", "flash_attention_2"],
            "flash-attn")
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", d, "--clip", clip, "--max-batch-tokens", "20"],
            "does not fit --max-batch-tokens 20", "train.jsonl:1")
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", d, "--clip", clip, "--clip-threshold", "high"],
            "--clip-threshold")
    _refuse(capsys, monkeypatch, ["--dtype", "bf16"], "--dtype applies to a --model checkpoint")
    _refuse(capsys, monkeypatch, ["--tasks", "vqa,coco"], "--tasks", "unknown task 'coco'")
    # a sample longer than the model's context (the tiny models have 512 positions)
    long = make_data(tmp_path / "long", ["VQAv2"])
    recs = (long / "VQAv2" / "train.jsonl").read_text().splitlines()
    recs[1] = recs[1].replace("Is it bright?", "Is it bright? " + "very " * 120)
    (long / "VQAv2" / "train.jsonl").write_text("\n".join(recs) + "\n")
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", str(long)], "VQAv2/train.jsonl:2",
            "longer than the model's context (512 positions)")
    # a missing and an unreadable image, named by annotation file and line
    bad = make_data(tmp_path / "bad", ["VQAv2", "Flickr30k"])
    (bad / "Flickr30k" / "tr2.png").unlink()
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", str(bad), "--clip", clip],
            "Flickr30k/train.jsonl:3: image", "tr2.png' not found")
    (bad / "Flickr30k" / "tr2.png").write_text("not an image")
    _refuse(capsys, monkeypatch, ["--model", j, "--data-dir", str(bad), "--clip", clip],
            "Flickr30k/train.jsonl:3: image", "cannot be read")
