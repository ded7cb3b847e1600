"""inject() into a transformers LLaMA model, model-wide freezing, adapter state dicts."""

import pytest
import torch
from torch import nn

import mage_kernels as mk


@pytest.fixture
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_inject_replaces_all_llama_linears_and_keeps_outputs(tiny_llama):
    ids = torch.randint(0, 50, (2, 9))
    before = tiny_llama(ids).logits
    model = mk.inject(tiny_llama, target_modules=mk.LLAMA_TARGETS, r=2, alpha=8, dropout=0.0)
    layers = dict(mk.mage_layers(model))
    assert len(layers) == 2 * 7
    assert {name.rsplit(".", 1)[1] for name in layers} == set(mk.LLAMA_TARGETS)
    assert isinstance(model.lm_head, nn.Linear)  # not targeted
    torch.testing.assert_close(model(ids).logits, before)  # B = 0: same function at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_for_task_model_wide_and_backward(tiny_llama):
    model = mk.inject(tiny_llama, target_modules=["q_proj", "v_proj"], r=2, alpha=8, dropout=0.0)
    assert mk.for_task(model, {"text"}, "image") == [0, 3]
    ids = torch.randint(0, 50, (2, 7))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name and name.endswith((".0", ".3")):
            assert p.grad is not None, name
            if ".lora_B." in name:  # dA is exactly zero at init because B = 0
                assert torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_adapter_state_dict_roundtrip_holds_adapters_alone(tiny_llama):
    model = mk.inject(tiny_llama, target_modules=["q_proj"], r=2)
    with torch.no_grad():
        for _, p in mk.adapter_parameters(model, trainable_only=False):
            p.normal_()
    state = mk.adapter_state_dict(model)
    assert state and all(".lora_" in k for k in state)
    assert len(state) == 2 * 2 * 4  # layers x (A, B) x adapters
    other = mk.inject(type(tiny_llama)(tiny_llama.config), target_modules=["q_proj"], r=2)
    mk.load_adapter_state_dict(other, state)
    for k, v in mk.adapter_state_dict(other).items():
        torch.testing.assert_close(v, state[k])


def test_corrupt_or_mismatched_adapter_state_is_rejected(tiny_llama):
    model = mk.inject(tiny_llama, target_modules=["q_proj"], r=2)
    state = mk.adapter_state_dict(model)
    key = next(iter(state))
    missing = dict(state)
    del missing[key]
    with pytest.raises(KeyError, match="missing"):
        mk.load_adapter_state_dict(model, missing)
    bad_shape = dict(state, **{key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="expected shape"):
        mk.load_adapter_state_dict(model, bad_shape)
    nan = dict(state, **{key: torch.full_like(state[key], float("nan"))})
    with pytest.raises(ValueError, match="corrupt"):
        mk.load_adapter_state_dict(model, nan)


def test_adapter_loading_is_all_or_nothing(tiny_llama):
    """A bad tensor in the LAST key must leave every adapter as it was (validate first, then copy)."""
    model = mk.inject(tiny_llama, target_modules=["q_proj", "v_proj"], r=2)
    before = mk.adapter_state_dict(model)
    keys = list(before)
    new = {k: torch.randn_like(v) for k, v in before.items()}
    for bad in (torch.zeros(1, 1), torch.full_like(before[keys[-1]], float("inf")),
                torch.full_like(before[keys[-1]], 1e6, dtype=torch.float64).mul_(1e300)):
        with pytest.raises(ValueError, match=keys[-1].replace(".", r"\.")):
            mk.load_adapter_state_dict(model, dict(new, **{keys[-1]: bad}))
        after = mk.adapter_state_dict(model)
        assert all(torch.equal(after[k], before[k]) for k in keys)
    mk.load_adapter_state_dict(model, new)
    after = mk.adapter_state_dict(model)
    assert all(torch.equal(after[k], new[k]) for k in keys)


def test_inject_without_matches_is_an_error():
    with pytest.raises(ValueError, match=r"entries \['q_proj'\] match no module"):
        mk.inject(nn.Sequential(nn.Linear(4, 4)), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="no linear layer"):
        mk.inject(nn.Sequential(nn.Linear(4, 4)), target_modules=r"\d", exclude_modules=["0"])
    with pytest.raises(ValueError, match="inject"):
        mk.for_task(nn.Sequential(nn.Linear(4, 4)), {"text"}, "text")


def test_inject_by_qualified_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    mk.inject(model, target_modules=["2"], r=1)
    assert isinstance(model[2], mk.MageLinear) and isinstance(model[0], nn.Linear)
