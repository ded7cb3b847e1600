"""The whole six-task sequence on the smoke preset (MAGE and LoRA), plus the trainer's building blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mage_cl import metrics as M
from mage_cl.runner import RunOptions, run
from mage_cl.tasks import order_names
from mage_cl.trainer import collate, greedy_generate

from cl_fakes import tiny_model, toy_tasks


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MAGE_CL_CACHE")
    os.environ["MAGE_CL_CACHE"] = str(cache)
    try:
        out = tmp_path_factory.mktemp("runs")
        recs = {}
        for method in ("lora", "mage"):
            recs[method] = run(RunOptions(method=method, preset="smoke", out=str(out / method), progress=False,
                                          backend="torch"))
        yield out, recs
    finally:
        if old is None:
            os.environ.pop("MAGE_CL_CACHE", None)
        else:
            os.environ["MAGE_CL_CACHE"] = old


@pytest.mark.parametrize("method", ["lora", "mage"])
def test_smoke_sequence_fills_the_matrices_consistently(smoke_runs, method):
    out, recs = smoke_runs
    r = recs[method]
    names = order_names("default")
    assert r["complete"] and r["tasks"] == names
    assert r["paper_names"] == ["VQAv2", "ImageNet", "Flickr30k", "OCRVQA", "RefCOCO", "HQEdit"]
    T = len(names)
    for j in range(T):
        for i in range(T):
            cell = [r[k][j][i] for k in ("acc", "iuf", "hal", "oth")]
            if i > j:
                assert cell == [None] * 4  # not trained yet: not evaluated
            else:
                assert all(0.0 <= v <= 100.0 for v in cell)
                assert math.isclose(sum(cell), 100.0, abs_tol=1e-6)  # every answer is exactly one outcome
    m = r["metrics"]
    assert m == M.summarize(r["acc"], r["iuf"], r["hal"], r["oth"])
    assert math.isclose(m["Forgetting"], m["Avg.IUF"] + m["Avg.HAL"] + m["Avg.OTH"], abs_tol=1e-6)
    assert r["stage_avg_acc"] == M.stage_avg_acc(r["acc"])
    assert r["train_tokens"] > 0 and r["tokens_per_second"] > 0 and r["peak_bytes"] > 0
    assert all(math.isfinite(x) for x in r["final_loss"])
    # training happened: the B matrices (zero at initialization) moved
    ckpt = torch.load(out / method / "checkpoint.pt", weights_only=True)
    moved = [k for k, t in ckpt["adapters"].items() if ".lora_B." in k and t.abs().sum() > 0]
    assert moved
    if method == "mage":  # every adapter of the four was trained by some task (modality freezing rotates them)
        assert {k.rsplit(".", 1)[-1] for k in moved} == {"0", "1", "2", "3"}
        fb = [d["pema_fallback_fraction"] for d in r["diagnostics"]]
        assert len(fb) == 6 and all(0.0 <= x <= 1.0 for x in fb)


def test_smoke_results_directory(smoke_runs):
    out, recs = smoke_runs
    d = out / "mage"
    for f in ("results.json", "accuracy.csv", "errors_iuf.csv", "errors_hal.csv", "errors_oth.csv", "table.md",
              "accuracy_matrix.png", "stage_avg_acc.png", "checkpoint.pt", "checkpoint.json"):
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    saved = json.loads((d / "results.json").read_text())
    assert saved["acc"] == recs["mage"]["acc"]
    rows = (d / "accuracy.csv").read_text().strip().splitlines()
    assert len(rows) == 7 and rows[0].startswith("after_task,vqa")
    table = (d / "table.md").read_text()
    assert table.splitlines()[0].startswith("| Method | VQAv2") and "| mage |" in table
    assert (d / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_mage_keeps_less_state_than_the_trained_adapters_of_lora(smoke_runs):
    _, recs = smoke_runs
    # MAGE's PEMA keeps theta* of the trained adapters only (at most 3 of 4 rank-8 adapters);
    # LoRA keeps nothing. Both measured on tensors.
    assert recs["lora"]["method_state_bytes"] == 0
    assert recs["mage"]["method_state_bytes"] > 0


def test_greedy_generation_is_independent_of_left_padding():
    torch.manual_seed(0)
    v, model = tiny_model(seed=3)
    prompts = [[v.bos_id, 10, 11, 12, 13, v.sep_id], [v.bos_id, 14, v.sep_id], [v.bos_id, 20, 21, v.sep_id]]
    together = greedy_generate(model, prompts, 7, v.pad_id, eos_id=-1)
    for p, got in zip(prompts, together):
        alone = greedy_generate(model, [p], 7, v.pad_id, eos_id=-1)[0]
        # the same tokens from a plain full-sequence argmax loop
        seq = list(p)
        for _ in range(7):
            with torch.no_grad():
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert got == alone == seq[len(p):]


def test_generation_stops_at_eos_and_collate_masks_the_prompt():
    v, model = tiny_model()
    tasks = toy_tasks()
    ex = tasks["echo"].train[:2]
    b = collate(ex, v.pad_id, torch.device("cpu"))
    for row, e in enumerate(ex):
        n = len(e.prompt) + len(e.target)
        assert b["labels"][row, : len(e.prompt)].eq(-100).all()
        assert b["labels"][row, len(e.prompt): n].tolist() == e.target
        assert b["attention_mask"][row].sum() == n
    # an EOS-forcing model: all outputs empty
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[v.eos_id].fill_(1.0)
        model.model.norm.weight.fill_(1.0)
    outs = greedy_generate(model, [e.prompt for e in ex], 5, v.pad_id, v.eos_id)
    assert outs == [[], []] or all(len(o) <= 5 for o in outs)


def test_zero_shot_and_multitask_records():
    from mage_cl import results
    from mage_cl.methods import make_method
    from mage_cl.trainer import Sequencer, TrainConfig

    tasks = toy_tasks(n_train=8, n_test=4)
    names = ["echo", "draw"]
    cfg = TrainConfig(steps_per_task=2, batch_size=4, eval_batch_size=4)
    recs = []
    for name in ("zero-shot", "multitask"):
        v, model = tiny_model()
        m = make_method(name)
        m.setup(model)
        stages = Sequencer(model, m, tasks, names, cfg, v.pad_id, v.eos_id).run()
        from dataclasses import asdict

        recs.append(results.build_record(name, names, ["Echo", "Draw"], [asdict(s) for s in stages], m.joint, {}))
    zs, mt = recs
    # zero-shot: nothing trains, every stage sees the same model
    assert zs["complete"] and zs["acc"][1][0] == zs["acc"][0][0] and zs["metrics"]["Forgetting"] == 0.0
    assert zs["train_tokens"] == 0
    # multitask: one joint stage of 2 x 2 steps, only the final row exists, only Avg.ACC is defined
    assert mt["complete"] and mt["acc"][0] == [None, None] and len(mt["acc"][1]) == 2
    assert mt["metrics"]["Avg.ACC"] == sum(mt["acc"][1]) / 2
    assert all(math.isnan(mt["metrics"][k]) for k in ("Forgetting", "New.ACC", "Avg.IUF"))
    assert mt["train_tokens"] > 0
    row = [l for l in results.markdown_table(recs).splitlines() if l.startswith("| multitask")][0]
    assert row.split("|")[5].strip() == "-"  # Forgetting (columns: method, 2 tasks, Avg.ACC, Forgetting)


@pytest.mark.parametrize("scale", [1, 3])
def test_multitask_trains_joint_steps_scale_times_the_continual_budget(monkeypatch, scale):
    from mage_cl import trainer
    from mage_cl.methods import make_method

    seen = []
    real = trainer.train_task

    def counting(model, method, examples, cfg, *args, **kwargs):
        seen.append((len(examples), cfg.steps_per_task))
        return real(model, method, examples, cfg, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_task", counting)
    tasks = toy_tasks(n_train=8, n_test=4)
    v, model = tiny_model()
    m = make_method("multitask")
    m.setup(model)
    cfg = trainer.TrainConfig(steps_per_task=2, batch_size=4, eval_batch_size=4, joint_steps_scale=scale)
    trainer.Sequencer(model, m, tasks, ["echo", "draw"], cfg, v.pad_id, v.eos_id).run()
    assert seen == [(16, 2 * 2 * scale)]  # the union of both tasks' 8 examples, 2 steps x 2 tasks x scale
