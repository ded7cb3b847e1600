"""Target matching as PEFT does it (exact names, dotted suffixes, full-match regex, exclude_modules),
checked against PEFT itself and on a transformers LLaMA, a diffusers UNet and a tiny Janus (Dual-to-Dual)."""

import re

import diffusers
import peft
import pytest
import torch
import transformers
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

import mage_kernels as mk


def tiny_llama(layers=2):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_unet():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_janus():
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    vision = transformers.JanusVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32)
    vq = transformers.JanusVQVAEConfig(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1],
                                       num_res_blocks=1, num_patches=2, projection_dim=32, image_token_embed_dim=32,
                                       latent_channels=8, resolution=16, in_channels=3, out_channels=3,
                                       attn_resolutions=[8])
    cfg = transformers.JanusConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), vq_config=vq.to_dict(),
                                   image_token_id=5)
    return transformers.JanusForConditionalGeneration(cfg).eval()


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def peft_selection(model, target_modules, exclude_modules=None):
    """What PEFT's own matcher selects among the model's linear layers."""
    cfg = peft.LoraConfig(target_modules=target_modules, exclude_modules=exclude_modules)
    return [n for n in linear_names(model) if check_target_module_exists(cfg, n) is True
            or isinstance(check_target_module_exists(cfg, n), re.Match)]


def assert_only_adapters_trainable(model, expected_layers):
    layers = [n for n, _ in mk.mage_layers(model)]
    assert layers == expected_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == set(expected_layers)


@pytest.mark.parametrize("targets, exclude", [
    (["q_proj", "v_proj"], None),
    (["layers.1.self_attn.q_proj", "down_proj"], None),                   # dotted suffix + last name
    (["model.layers.0.mlp.up_proj"], None),                               # exact qualified name
    (r"model\.layers\.\d+\.self_attn\.(q|k)_proj", None),                 # a regex over the whole name
    (r".*_proj", r".*layers\.0\..*"),                                     # regex target, regex exclude
    (list(mk.LLAMA_TARGETS), ["layers.1.mlp.down_proj", "o_proj"]),       # list exclude: suffix and name
])
def test_selection_matches_peft_on_llama(targets, exclude):
    torch.manual_seed(0)
    model = tiny_llama()
    want = peft_selection(model, targets, exclude)
    assert want  # each case selects something
    assert mk.find_target_modules(model, targets, exclude) == want
    mk.inject(model, targets, r=2, exclude_modules=exclude)
    assert_only_adapters_trainable(model, want)


def test_regex_must_match_the_whole_name():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matches no module"):
        mk.find_target_modules(model, r"q_proj")  # fullmatch: 'q_proj' alone is not a qualified name
    assert len(mk.find_target_modules(model, r".*\.q_proj")) == 2


def test_unmatched_entries_and_non_linear_targets_are_errors_and_change_nothing():
    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"\['qproj'\] match no module"):
        mk.inject(model, ["q_proj", "qproj"])
    with pytest.raises(ValueError, match=r"exclude_modules entries \['vproj'\]"):
        mk.inject(model, ["q_proj"], exclude_modules=["vproj"])
    with pytest.raises(ValueError, match=r"cannot take adapters: model\.layers\.0\.self_attn \(LlamaAttention\)"):
        mk.inject(model, ["self_attn"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        mk.inject(model, "model.(")
    with pytest.raises(TypeError, match="regex string or a list"):
        mk.inject(model, 3)
    assert not list(mk.mage_layers(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_injected_layers_are_not_selected_again():
    model = mk.inject(tiny_llama(), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already a MageLinear"):
        mk.inject(model, ["q_proj", "v_proj"])
    mk.inject(model, ["v_proj"], r=2)  # the inner .base of a MageLinear is never a candidate
    assert len(list(mk.mage_layers(model))) == 4


def test_diffusers_unet_attention_projections_including_to_out_0():
    torch.manual_seed(0)
    unet = tiny_unet()
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    want = peft_selection(unet, targets)
    assert len(want) == 4 * 2 * 4 and sum(n.endswith("to_out.0") for n in want) == 8  # 4 blocks x attn1, attn2
    sample, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.randn(2, 5, 16)
    with torch.no_grad():
        before = unet(sample, t, encoder_hidden_states=cond).sample
    mk.inject(unet, targets, r=2, alpha=4, dropout=0.0)
    assert_only_adapters_trainable(unet, want)
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, t, encoder_hidden_states=cond).sample, before)  # B = 0 at init
        for _, layer in mk.mage_layers(unet):
            for b in layer.lora_B:
                b.normal_(0, 0.1)
    unet.train()
    out = unet(sample, t, encoder_hidden_states=cond).sample
    assert (out - before).abs().max() > 1e-3  # the adapters are on the path
    out.square().mean().backward()
    for name, p in unet.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name


def test_janus_adapters_only_on_the_language_model():
    torch.manual_seed(0)
    model = tiny_janus()
    lm = [n for n in linear_names(model) if n.startswith("model.language_model.")]
    assert len(lm) == 2 * 7
    vision_q = [n for n in linear_names(model) if n.startswith("model.vision_model.") and n.endswith("q_proj")]
    assert vision_q  # LLAMA_TARGETS alone would also catch the vision tower ...
    with pytest.raises(ValueError, match=r"model\.vqmodel\..*\(Conv2d\)"):
        mk.find_target_modules(model, ["q", "q_proj"])  # ... and the VQ model's attention is convolutional
    # scope by a regex over the whole model, or by exclude_modules
    regex = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
    assert mk.find_target_modules(model, regex) == lm
    assert mk.find_target_modules(model, mk.LLAMA_TARGETS, r"model\.(vision_model|vqmodel)\..*") == lm
    ids = torch.randint(6, 64, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    mk.inject(model, regex, r=2, alpha=4, dropout=0.0)
    assert_only_adapters_trainable(model, lm)
    mk.for_task(model, {"text"}, "image")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    model(input_ids=ids).logits.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("model.language_model.") and ".lora_" in n for n in with_grad)
    assert all(n.endswith((".0", ".3")) for n in with_grad)  # text-input and image-output adapters train


def test_inject_freezes_the_whole_model_it_is_given_not_more():
    """inject on a submodule leaves the rest of the model trainable: the documented reason to scope by pattern."""
    model = tiny_janus()
    mk.inject(model.model.language_model, mk.LLAMA_TARGETS, r=2)
    outside = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert any(n.startswith("model.vision_model.") for n in outside)
    whole = tiny_janus()
    mk.inject(whole, r"model\.language_model\..*_proj", r=2)
    assert not [n for n, p in whole.named_parameters() if p.requires_grad and ".lora_" not in n]
