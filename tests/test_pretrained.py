"""save_pretrained / from_pretrained (all or nothing), the task history, method state, merge_and_unload."""

import json
import os

import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

import mage_kernels as mk

CFG = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture
def base_state():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).state_dict()


def fresh(base_state, dtype=torch.float32):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    model.load_state_dict(base_state)
    return model.to(dtype).eval()


def trained(base_state, targets=mk.LLAMA_TARGETS, dtype=torch.float32, **kw):
    """An injected model whose adapters all hold fresh random values (B != 0), with a two-task history."""
    model = mk.inject(fresh(base_state, dtype), targets, r=2, alpha=8, dropout=0.0, **kw)
    with torch.no_grad():
        for _, p in mk.adapter_parameters(model, trainable_only=False):
            p.normal_(0, 0.2)
    mk.for_task(model, {"image", "text"}, "text", task="vqa")
    mk.for_task(model, {"text"}, "image", task="flickr30k")
    return model.eval()


def snapshot(model):
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "types": [(n, type(m).__name__) for n, m in model.named_modules()],
            "training": [m.training for m in model.modules()],
            "history": mk.task_history(model)}


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["types"] == snap["types"]
    assert now["grad"] == snap["grad"]
    assert now["training"] == snap["training"]
    assert now["history"] == snap["history"]
    assert now["state"].keys() == snap["state"].keys()
    assert all(torch.equal(now["state"][k], snap["state"][k]) for k in snap["state"])


IDS = torch.tensor([[3, 17, 4, 41, 9, 22, 8, 30, 1], [12, 5, 49, 0, 33, 7, 21, 2, 44]])


def test_round_trip_same_logits_config_and_history(base_state, tmp_path):
    model = trained(base_state)
    logits = model(IDS).logits
    mk.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["alpha"], cfg["num_adapters"], cfg["dropout"], cfg["scaling"]) == (2, 8.0, 4, 0.0, 1.0)
    assert cfg["adapter_names"] == ["text_in", "image_in", "text_out", "image_out"]
    assert cfg["target_modules"] == list(mk.LLAMA_TARGETS) and len(cfg["layers"]) == 14
    assert cfg["library_version"] == mk.__version__ and cfg["base_model_class"] == "LlamaForCausalLM"
    assert cfg["history"] == [
        {"task": "vqa", "inputs": ["image", "text"], "output": "text", "adapters": ["text_in", "image_in", "text_out"]},
        {"task": "flickr30k", "inputs": ["text"], "output": "image", "adapters": ["text_in", "image_out"]},
    ]
    weights = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert weights.keys() == mk.adapter_state_dict(model).keys()

    other = fresh(base_state)
    plain = other(IDS).logits
    assert (plain - logits).abs().max() > 1e-2  # the adapters matter
    assert mk.from_pretrained(other, tmp_path) is other
    torch.testing.assert_close(other(IDS).logits, logits, rtol=0, atol=0)
    assert mk.task_history(other) == cfg["history"]
    assert not any(p.requires_grad for p in other.parameters()) and not other.training  # PEFT's default
    # continue learning: the history grows and a second save keeps it
    mk.from_pretrained(fresh(base_state), tmp_path, is_trainable=True)
    again = mk.from_pretrained(fresh(base_state), tmp_path, is_trainable=True)
    assert all(p.requires_grad for _, p in mk.adapter_parameters(again, trainable_only=False))
    mk.for_task(again, {"image", "text"}, "text", task="ocr")
    mk.save_pretrained(again, tmp_path / "next")
    assert [e["task"] for e in mk.task_history(mk.from_pretrained(fresh(base_state), tmp_path / "next"))] == [
        "vqa", "flickr30k", "ocr"]


def test_history_records_tasks_in_order_without_repeats(base_state):
    model = mk.inject(fresh(base_state), ["q_proj"], r=2)
    mk.for_task(model, {"text"}, "text")  # no task name: nothing recorded
    assert mk.task_history(model) == []
    for name in ("a", "a", "b", "a"):
        mk.for_task(model, {"text"}, "text", task=name)
    assert [e["task"] for e in mk.task_history(model)] == ["a", "b", "a"]
    with pytest.raises(ValueError, match="task"):
        mk.for_task(model, {"text"}, "text", task="")


def test_round_trip_float64_and_into_an_already_injected_model(base_state, tmp_path):
    model = trained(base_state, dtype=torch.float64, targets=r".*\.(q|v)_proj")
    mk.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == r".*\.(q|v)_proj"
    target = mk.inject(fresh(base_state, torch.float64), r".*\.(q|v)_proj", r=2, alpha=8, dropout=0.0)
    mk.from_pretrained(target, tmp_path)
    torch.testing.assert_close(target(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_method_state_pema_dema_and_generic(base_state, tmp_path):
    model = trained(base_state)
    mk.for_task(model, {"image", "text"}, "text")
    pema = mk.PEMA(model)
    with torch.no_grad():
        for e in pema.emas:
            e.add_(torch.randn_like(e))
    pema.steps = 7
    mk.save_pretrained(model, tmp_path / "pema", method_state=pema)
    state = mk.load_method_state(tmp_path / "pema")
    assert state["kind"] == "PEMA" and state["names"] == pema.names and state["steps"] == 7
    new = mk.from_pretrained(fresh(base_state), tmp_path / "pema", is_trainable=True)
    mk.for_task(new, {"image", "text"}, "text")
    resumed = mk.PEMA(new)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.emas, pema.emas)) and resumed.steps == 7

    dema = mk.DEMA(model)
    with torch.no_grad():
        for g in dema.prev_grads:
            g.normal_()
    mk.save_pretrained(model, tmp_path / "dema", method_state=dema)
    state = mk.load_method_state(tmp_path / "dema")
    assert state["kind"] == "DEMA" and all(torch.equal(a, b) for a, b in zip(state["prev_grads"], dema.prev_grads))

    fixed = mk.FixedEMA(model, decay=0.9)
    with torch.no_grad():
        for e in fixed.emas:
            e.add_(torch.randn_like(e))
    mk.save_pretrained(model, tmp_path / "fixed", method_state=fixed)
    state = mk.load_method_state(tmp_path / "fixed")
    assert state["kind"] == "FixedEMA" and state["names"] == fixed.names and "prev_grads" not in state
    assert mk.pretrained.read_config(str(tmp_path / "fixed"))["method_state"]["decay"] == 0.9
    resumed = mk.FixedEMA(model)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.emas, fixed.emas))

    importances = {n: torch.rand_like(p) for n, p in mk.adapter_parameters(model)}
    mk.save_pretrained(model, tmp_path / "dema", method_state=importances)  # overwrites, kind "tensors"
    back = mk.load_method_state(tmp_path / "dema")
    assert back.keys() == importances.keys() and all(torch.equal(back[k], importances[k]) for k in back)
    mk.save_pretrained(model, tmp_path / "dema")  # no method state: the stale file goes
    assert mk.load_method_state(tmp_path / "dema") is None
    assert not (tmp_path / "dema" / "method_state.safetensors").exists()
    with pytest.raises(TypeError, match="method_state"):
        mk.save_pretrained(model, tmp_path / "x", method_state=[1, 2])


def _corrupt_cases(tmp_path, src):
    """(name, mutate(dir), error regex): every way a directory can be wrong."""
    def edit_config(**changes):
        def f(d):
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(changes)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        return f

    def edit_weights(fn):
        def f(d):
            w = safetensors.torch.load_file(d / "adapter_model.safetensors")
            fn(w)
            safetensors.torch.save_file(w, d / "adapter_model.safetensors")
        return f

    last = "model.layers.1.mlp.down_proj.lora_B.3"

    def truncate(d):
        data = (d / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    def nan_last(w):
        w[last] = torch.full_like(w[last], float("nan"))

    def reshape_last(w):
        w[last] = torch.zeros(32, 3)

    def drop_last(w):
        del w[last]

    def extra(w):
        w["model.layers.0.self_attn.q_proj.lora_A.4"] = torch.zeros(2, 32)

    def method_state_corrupt(d):
        (d / "method_state.safetensors").write_bytes(b"\x00\x01 not safetensors")

    return [
        ("json", lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        ("missing weights", lambda d: (d / "adapter_model.safetensors").unlink(), "missing adapter_model"),
        ("truncated weights", truncate, "corrupt"),
        ("nan", edit_weights(nan_last), "non-finite"),
        ("shape", edit_weights(reshape_last), r"shape \(32, 3\)"),
        ("missing tensor", edit_weights(drop_last), "missing"),
        ("unexpected tensor", edit_weights(extra), "unexpected"),
        ("r", edit_config(r=3), r"shape \(3, 32\)|has shape \(2, 32\) but this model needs \(3, 32\)"),
        ("num_adapters", edit_config(num_adapters=2), "adapter_names"),
        ("alpha", edit_config(alpha=-1), "alpha"),
        ("format", edit_config(format="other"), "format"),
        ("peft", edit_config(format=None, peft_type="LORA"), "import_peft"),
        ("layer", edit_config(layers=["model.layers.9.self_attn.q_proj"]), r"layers\.9.*not a module"),
        ("non-linear layer", edit_config(layers=["model.layers.0.self_attn"]), "not a linear layer"),
        ("method state", method_state_corrupt, "method_state.safetensors.*corrupt"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_corrupt_or_mismatched_directory_leaves_the_model_unchanged(base_state, tmp_path, case):
    src = tmp_path / "src"
    model = trained(base_state)
    mk.for_task(model, {"image", "text"}, "text")
    mk.save_pretrained(model, src, method_state=mk.PEMA(model))
    name, mutate, error = _corrupt_cases(tmp_path, src)[case]
    mutate(src)
    for target in (fresh(base_state), mk.inject(fresh(base_state), r=2, alpha=8, dropout=0.0)):
        target.train()
        snap = snapshot(target)
        with pytest.raises(ValueError, match=error):
            mk.from_pretrained(target, src)
        assert_unchanged(target, snap)


def test_an_injected_model_with_other_layers_or_settings_is_refused(base_state, tmp_path):
    mk.save_pretrained(trained(base_state), tmp_path)
    for other, error in ((mk.inject(fresh(base_state), ["q_proj"], r=2, alpha=8, dropout=0.0), "differ"),
                         (mk.inject(fresh(base_state), r=2, alpha=16, dropout=0.0), "alpha=16")):
        snap = snapshot(other)
        with pytest.raises(ValueError, match=error):
            mk.from_pretrained(other, tmp_path)
        assert_unchanged(other, snap)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        mk.from_pretrained(fresh(base_state), tmp_path.parent)
    with pytest.raises(ValueError, match="no such directory"):
        mk.from_pretrained(fresh(base_state), tmp_path / "nowhere")


def test_failure_after_injection_is_rolled_back(base_state, tmp_path, monkeypatch):
    """Even a failure while copying (after the layers were replaced) leaves the plain model behind."""
    mk.save_pretrained(trained(base_state), tmp_path)
    target = fresh(base_state).train()
    snap = snapshot(target)

    def boom(*args, **kwargs):
        raise RuntimeError("copy failed")

    monkeypatch.setattr("mage_kernels.pretrained.load_adapter_state_dict", boom)
    with pytest.raises(RuntimeError, match="copy failed"):
        mk.from_pretrained(target, tmp_path)
    assert_unchanged(target, snap)
    assert not list(mk.mage_layers(target))


def test_save_refuses_what_it_cannot_describe(base_state, tmp_path):
    model = mk.inject(fresh(base_state), ["q_proj"], r=2)
    mk.inject(model, ["v_proj"], r=4)
    with pytest.raises(ValueError, match="differ in their adapter configuration"):
        mk.save_pretrained(model, tmp_path)
    model = trained(base_state)
    with torch.no_grad():
        next(p for _, p in mk.adapter_parameters(model, trainable_only=False)).fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        mk.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="inject"):
        mk.save_pretrained(fresh(base_state), tmp_path)


def test_merge_and_unload_saves_and_loads_as_the_vanilla_architecture(base_state, tmp_path):
    model = trained(base_state, dtype=torch.float64)
    logits = model(IDS).logits
    merged = mk.merge_and_unload(model)
    assert merged is model and not any(isinstance(m, mk.MageLinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert mk.task_history(model) == []
    torch.testing.assert_close(model(IDS).logits, logits, rtol=1e-12, atol=1e-12)
    model.save_pretrained(tmp_path)
    keys = safetensors.torch.load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any(".base." in k or "lora" in k for k in keys)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=1e-12, atol=1e-12)
    # the merged weight is W0 + s B A, not just "different"
    layer = mk.MageLinear(8, 6, r=3, alpha=6, dropout=0.0, dtype=torch.float64)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    w0 = layer.base.weight.clone()
    expected = w0 + layer.scaling * (torch.cat(list(layer.lora_B), 1) @ torch.cat(list(layer.lora_A), 0))
    plain = mk.merge_and_unload(nn.Sequential(layer))[0]
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain.weight, expected, rtol=0, atol=1e-15)


def test_merge_and_unload_refuses_fisher_and_changes_nothing(base_state):
    model = trained(base_state)
    mk.for_task(model, {"text"}, "text")
    fisher = mk.Fisher(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="Fisher is attached"):
        mk.merge_and_unload(model)
    assert_unchanged(model, snap)
    fisher.remove()
    mk.merge_and_unload(model)
