"""PEFT interop: export -> peft.PeftModel gives the same logits (float32, 1e-6), import back, import PEFT's own
LoRA directories, and clear refusals of what a MageLinear cannot represent."""

import json
import os

import peft
import pytest
import safetensors.torch
import torch
import transformers

import mage_kernels as mk
from mage_kernels.integrations.peft import export_peft, import_peft

CFG = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32)
IDS = torch.tensor([[3, 17, 4, 41, 9, 22, 8, 30, 1], [12, 5, 49, 0, 33, 7, 21, 2, 44]])


@pytest.fixture
def base_state():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).state_dict()


def fresh(base_state):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    model.load_state_dict(base_state)
    return model.eval()


def mage_model(base_state, targets=mk.LLAMA_TARGETS):
    model = mk.inject(fresh(base_state), targets, r=2, alpha=8, dropout=0.05)
    with torch.no_grad():
        for _, p in mk.adapter_parameters(model, trainable_only=False):
            p.normal_(0, 0.2)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_close_1e6(got, want):
    err = (got - want).abs().max().item()
    assert err <= 1e-6, err


@pytest.mark.parametrize("targets", [mk.LLAMA_TARGETS, r".*layers\.1\.self_attn\.(q|v)_proj"])
def test_export_as_one_rank_4r_lora_loads_in_peft_with_the_same_logits(base_state, tmp_path, targets):
    model = mage_model(base_state, targets)
    want = logits(model)
    export_peft(model, tmp_path, task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.05 and cfg["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(fresh(base_state), tmp_path)
    assert isinstance(pm, peft.PeftModelForCausalLM)
    lora_layers = {n.split(".lora_A")[0] for n, _ in pm.named_parameters() if ".lora_A." in n}
    assert {n.removeprefix("base_model.model.") for n in lora_layers} == {n for n, _ in mk.mage_layers(model)}
    assert (logits(pm) - logits(fresh(base_state))).abs().max() > 1e-2  # the adapters matter
    assert_close_1e6(logits(pm), want)
    # and back: a rank-4r LoRA split into the four adapters, or kept as one
    for n in (4, 1):
        back = import_peft(fresh(base_state), tmp_path, num_adapters=n)
        layer = next(layer for _, layer in mk.mage_layers(back))
        assert (layer.num_adapters, layer.r) == ((4, 2) if n == 4 else (1, 8))
        assert_close_1e6(logits(back), want)
    back4 = import_peft(fresh(base_state), tmp_path, num_adapters=4)
    for (_, a), (_, b) in zip(mk.adapter_parameters(back4, False), mk.adapter_parameters(model, False)):
        assert torch.equal(a, b)


def test_export_as_four_named_adapters_all_active_in_peft(base_state, tmp_path):
    model = mage_model(base_state)
    want = logits(model)
    export_peft(model, tmp_path, separate=True)
    names = list(mk.ADAPTERS)
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    cfg = json.loads((tmp_path / "text_in" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2.0  # alpha / 4 each
    pm = peft.PeftModel.from_pretrained(fresh(base_state), tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(tmp_path / name, adapter_name=name)
    pm.base_model.set_adapter(names)
    assert_close_1e6(logits(pm), want)
    pm.base_model.set_adapter(names[:3])  # one adapter off: not the same function (the test can fail)
    assert (logits(pm) - want).abs().max() > 1e-3
    back = import_peft(fresh(base_state), tmp_path)
    assert_close_1e6(logits(back), want)


def test_import_a_lora_trained_with_peft(base_state, tmp_path):
    pm = peft.get_peft_model(fresh(base_state), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"],
                                                                  lora_dropout=0.1))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.eval()
    want = logits(pm)
    pm.save_pretrained(tmp_path)
    model = import_peft(fresh(base_state), tmp_path)
    layers = dict(mk.mage_layers(model))
    assert len(layers) == 4 and all((m.r, m.num_adapters, m.alpha, m.dropout) == (4, 1, 12.0, 0.1)
                                    for m in layers.values())
    assert_close_1e6(logits(model), want)
    four = import_peft(fresh(base_state), tmp_path, num_adapters=4)  # rank 4 = four rank-1 adapters
    assert_close_1e6(logits(four), want)
    # round trip through mage-kernels' own format keeps it
    mk.save_pretrained(four, tmp_path / "mage")
    assert_close_1e6(logits(mk.from_pretrained(fresh(base_state), tmp_path / "mage")), want)


def _edit(directory, **changes):
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, error", [
    (dict(use_dora=True), "DoRA"),
    (dict(use_rslora=True), "rsLoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 2}), "alpha_pattern"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(init_lora_weights="pissa"), "changes the base weights"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(layer_replication=[[0, 1]]), "layer_replication"),
    (dict(peft_type="IA3"), "IA3"),
    (dict(r=3), "rank r=3"),
    (dict(some_future_option={"on": 1}), "some_future_option"),
])
def test_unsupported_peft_options_are_refused_and_change_nothing(base_state, tmp_path, change, error):
    export_peft(mage_model(base_state), tmp_path)
    _edit(tmp_path, **change)
    target = fresh(base_state)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=error):
        import_peft(target, tmp_path)
    assert not list(mk.mage_layers(target))
    assert target.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in target.parameters())


def test_unsupported_peft_tensors_and_splits_are_refused(base_state, tmp_path):
    export_peft(mage_model(base_state), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    w = safetensors.torch.load_file(file)
    safetensors.torch.save_file({k: (v[:6] if ".lora_A." in k else v[:, :6]).contiguous() for k, v in w.items()}, file)
    _edit(tmp_path, r=6)
    with pytest.raises(ValueError, match="cannot be split into 4"):
        import_peft(fresh(base_state), tmp_path, num_adapters=4)
    assert len(list(mk.mage_layers(import_peft(fresh(base_state), tmp_path)))) == 14  # as one rank-6 LoRA: fine
    _edit(tmp_path, r=8)
    for extra, error in (({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 50)}, "embedding"),
                         ({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)},
                          "DoRA")):
        safetensors.torch.save_file(dict(w, **extra), file)
        with pytest.raises(ValueError, match=error):
            import_peft(fresh(base_state), tmp_path)
    mk.save_pretrained(mage_model(base_state), tmp_path / "mage")
    with pytest.raises(ValueError, match="mage_kernels.from_pretrained"):
        import_peft(fresh(base_state), tmp_path / "mage")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        import_peft(fresh(base_state), tmp_path.parent)
