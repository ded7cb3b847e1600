"""``mage-cl``: clear errors, resume after an interruption, corrupt checkpoints, compare, user model + data."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mage_cl import checkpoint
from mage_cl.cli import main

FAST = ["--preset", "smoke", "--steps-per-task", "3", "--no-progress", "--backend", "torch"]


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    old = os.environ.get("MAGE_CL_CACHE")
    os.environ["MAGE_CL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MAGE_CL_CACHE", None)
    else:
        os.environ["MAGE_CL_CACHE"] = old


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("mage-cl: error: ")
    return err[0]


@pytest.mark.parametrize("args, words", [
    (["run", "--method", "nope"], ["unknown method 'nope'", "mage", "lora"]),
    (["run", "--order", "sideways"], ["unknown order 'sideways'", "reverse", "alphabetical"]),
    (["run", "--preset", "huge"], ["unknown preset 'huge'", "smoke", "cpu", "gpu"]),
    (["compare", "--methods", "lora,bogus"], ["unknown method 'bogus'"]),
    (["run", "--model", "/nonexistent/model", "--data-dir", "/nonexistent/data"], ["no such directory"]),
])
def test_bad_choices_exit_2_with_one_line(capsys, args, words):
    assert main(args) == 2
    line = _error_line(capsys)
    for w in words:
        assert w in line


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--method", "ewc", "--out", str(full)] + FAST) == 0
    assert main(["run", "--method", "ewc", "--out", str(cut), "--max-stages", "2"] + FAST) == 0
    assert "continue with --resume" in capsys.readouterr().out
    assert json.loads((cut / "checkpoint.json").read_text())["stages_done"] == 2
    assert not (cut / "results.json").exists()
    # without --resume the existing checkpoint is refused
    assert main(["run", "--method", "ewc", "--out", str(cut)] + FAST) == 2
    assert "--resume" in _error_line(capsys)
    assert main(["run", "--method", "ewc", "--out", str(cut), "--resume"] + FAST) == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    for key in ("acc", "iuf", "hal", "oth", "metrics", "final_loss"):
        assert a[key] == b[key], key
    pa = torch.load(full / "checkpoint.pt", weights_only=True)
    pb = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert pa["adapters"].keys() == pb["adapters"].keys()
    for k in pa["adapters"]:
        assert torch.equal(pa["adapters"][k], pb["adapters"][k]), k
    for k in pa["method_state"]["fisher"]:  # EWC's between-task state was restored, not rebuilt
        assert torch.equal(pa["method_state"]["fisher"][k], pb["method_state"]["fisher"][k])


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--method", "lora", "--out", str(out), "--max-stages", "1"] + FAST) == 0
    capsys.readouterr()
    # a different configuration (seed) may not continue it
    assert main(["run", "--method", "lora", "--out", str(out), "--resume", "--seed", "1"] + FAST) == 2
    assert "different configuration" in _error_line(capsys)
    # flip one byte in the middle of the checkpoint
    pt = out / "checkpoint.pt"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    assert main(["run", "--method", "lora", "--out", str(out), "--resume"] + FAST) == 2
    assert "corrupt" in _error_line(capsys)
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        checkpoint.load(out, json.loads((out / "checkpoint.json").read_text())["config"])
    # a truncated metadata file
    (out / "checkpoint.json").write_text("{")
    assert main(["run", "--method", "lora", "--out", str(out), "--resume"] + FAST) == 2
    assert "corrupt" in _error_line(capsys)


def test_lr_overrides_the_preset_and_is_part_of_the_run_configuration(tmp_path, capsys):
    base, fast = tmp_path / "base", tmp_path / "fast"
    one = ["--tasks", "vqa"]
    assert main(["run", "--method", "lora", "--out", str(base)] + one + FAST) == 0
    assert main(["run", "--method", "lora", "--out", str(fast), "--lr", "0.02"] + one + FAST) == 0
    rb = json.loads((base / "results.json").read_text())
    rf = json.loads((fast / "results.json").read_text())
    assert rb["lr"] == 3e-3 and rf["lr"] == 0.02  # the smoke preset's 3e-3, then the override
    assert rb["final_loss"] != rf["final_loss"]
    capsys.readouterr()
    # a checkpoint made with another learning rate may not be continued with this one
    assert main(["run", "--method", "lora", "--out", str(base), "--resume", "--lr", "0.02"] + one + FAST) == 2
    assert "different configuration" in _error_line(capsys)


def test_lr_schedule_overrides_the_preset_and_is_part_of_the_run_configuration(tmp_path, capsys):
    const, cos = tmp_path / "constant", tmp_path / "cosine"
    one = ["--tasks", "vqa", *FAST, "--steps-per-task", "10"]  # past the smoke preset's 5 warm-up steps
    assert main(["run", "--method", "lora", "--out", str(const), "--lr-schedule", "constant"] + one) == 0
    assert main(["run", "--method", "lora", "--out", str(cos), "--lr-schedule", "cosine"] + one) == 0
    rc = json.loads((const / "results.json").read_text())
    rs = json.loads((cos / "results.json").read_text())
    assert rc["lr_schedule"] == "constant" and rs["lr_schedule"] == "cosine"
    assert rc["final_loss"] != rs["final_loss"]
    capsys.readouterr()
    assert main(["run", "--method", "lora", "--out", str(const), "--resume", "--lr-schedule", "cosine"] + one) == 2
    assert "different configuration" in _error_line(capsys)


def test_compare_writes_one_table_and_reports_mage_below_cia(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "lora,cia,mage", "--out", str(out)] + FAST) == 0
    md = (out / "comparison.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["lora", "cia", "mage"]
    assert "MAGE/PEMA" in md and " is below CIA/DEMA" in md
    recs = json.loads((out / "comparison.json").read_text())
    by = {r["method"]: r for r in recs}
    assert 0 < by["mage"]["method_state_bytes"] < by["cia"]["method_state_bytes"]
    for m in ("lora", "cia", "mage"):
        assert (out / m / "results.json").is_file()
    assert (out / "stage_avg_acc.png").read_bytes()[:4] == b"\x89PNG"
    assert "| mage |" in capsys.readouterr().out


def _tiny_user_model(path):
    """A LLaMA checkpoint + word-level tokenizer saved locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "[UNK]", "what", "color", "is", "the", "ball", "sky", "?", "red", "blue",
             "green", "answer", "with", "one", "word", ".", "\n", "how", "many", "dots", "2", "3"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")
    fast.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _user_data(root):
    qa = [("what color is the ball ?", "red"), ("what color is the sky ?", "blue"), ("how many dots ?", "3")]
    for task in ("vqa", "classification"):
        d = root / task
        d.mkdir(parents=True)
        with open(d / "train.jsonl", "w") as f:
            for i in range(6):
                q, a = qa[i % 3]
                f.write(json.dumps({"image": f"{i}.jpg", "data": [q + " answer with one word .", a]}) + "\n")
        test = [{"question id": i, "image": f"t{i}.jpg", "text": q + " answer with one word .", "answer": a}
                for i, (q, a) in enumerate(qa)]
        (d / "test.json").write_text(json.dumps(test))


def test_user_model_and_annotation_files(tmp_path, capsys):
    model_dir, data_dir, out = tmp_path / "model", tmp_path / "data", tmp_path / "out"
    _tiny_user_model(model_dir)
    _user_data(data_dir)
    assert main(["run", "--method", "mage", "--model", str(model_dir), "--data-dir", str(data_dir),
                 "--out", str(out)] + FAST) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["tasks"] == ["vqa", "classification"]  # the text-output tasks found in --data-dir, in order
    assert rec["paper_names"] == ["VQAv2", "ImageNet"]
    assert len(rec["acc"]) == 2 and rec["acc"][0][1] is None
    assert rec["model"] == str(model_dir.resolve())
    assert rec["train_tokens"] > 0
    # no annotation files for any task: one clear line
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["run", "--model", str(model_dir), "--data-dir", str(empty)] + FAST) == 2
    assert "found no" in _error_line(capsys)


def test_demo_still_runs(capsys):
    assert main(["demo", "--steps", "2"]) == 0
    assert "loss" in capsys.readouterr().out
