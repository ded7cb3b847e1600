"""MageLinear: semantics, adapter freezing, merge, dropout, and input validation."""

import pytest
import torch
from torch import nn

import mage_kernels as mk
from mage_kernels import reference


def _layer(k=24, n=20, r=3, dtype=torch.float64, **kw):
    layer = mk.MageLinear(k, n, r=r, alpha=12, dropout=kw.pop("dropout", 0.0), dtype=dtype, **kw)
    with torch.no_grad():  # B starts at zero; give it values so every adapter matters
        for b in layer.lora_B:
            b.normal_()
    return layer


def test_scaling_and_init_follow_spec():
    layer = mk.MageLinear(64, 32)  # paper setting: r=8, alpha=32 -> s = 32 / (4 * 8) = 1
    assert layer.scaling == 1.0
    assert all(tuple(a.shape) == (8, 64) for a in layer.lora_A)
    assert all(tuple(b.shape) == (32, 8) for b in layer.lora_B)
    assert all(torch.count_nonzero(b) == 0 for b in layer.lora_B)
    a = torch.cat(list(layer.lora_A)).flatten()
    assert 0.007 < a.std().item() < 0.013  # normal, std 0.01 (2048 samples)
    assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24), (2, 3, 4, 24)])
def test_forward_matches_reference_any_leading_shape(shape):
    layer = _layer()
    x = torch.randn(*shape, dtype=torch.float64)
    a, b = layer.lora_weights()
    ref = reference.lora_linear(x, layer.base.weight, layer.base.bias, a, b, layer.scaling)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    assert layer(x).shape == (*shape[:-1], 20)


def test_sum_of_four_adapters_equal_weights():
    layer = _layer()
    x = torch.randn(6, 24, dtype=torch.float64)
    manual = layer.base(x) + layer.scaling * sum(x @ layer.lora_A[k].t() @ layer.lora_B[k].t() for k in range(4))
    torch.testing.assert_close(layer(x), manual)


@pytest.mark.parametrize(
    "inputs,output,expected",
    [({"image", "text"}, "text", [0, 1, 2]), ({"text"}, "image", [0, 3]), ({"image", "text"}, "image", [0, 1, 3])],
)
def test_for_task_matches_spec_table(inputs, output, expected):
    layer = _layer()
    assert layer.for_task(inputs, output) == expected
    assert layer.trainable_adapters() == expected
    for k in range(4):
        assert layer.lora_A[k].requires_grad == (k in expected)
        assert layer.lora_B[k].requires_grad == (k in expected)


def test_set_trainable_by_name_and_bad_names():
    layer = _layer()
    layer.set_trainable(["text_in", "image_out"])
    assert layer.trainable_adapters() == [0, 3]
    with pytest.raises(KeyError, match="unknown adapter"):
        layer.set_trainable(["audio_in"])
    with pytest.raises(IndexError):
        layer.set_trainable([4])
    with pytest.raises(ValueError, match="modalities"):
        layer.for_task({"audio"}, "text")


def test_frozen_adapters_get_no_grad_and_keep_values_after_step():
    layer = _layer(dtype=torch.float32)
    layer.for_task({"text"}, "image")  # trains 0 and 3
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    x = torch.randn(4, 5, 24)
    layer(x).square().mean().backward()
    opt.step()
    for n, p in layer.named_parameters():
        frozen = n.startswith("base") or n.endswith((".1", ".2"))
        if frozen:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
            assert not torch.equal(p, before[n]), n


def test_merge_unmerge_roundtrip():
    layer = _layer().eval()
    x = torch.randn(3, 24, dtype=torch.float64)
    y = layer(x)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.base(x), y)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0)
    torch.testing.assert_close(layer(x), y)


def test_training_a_merged_layer_is_an_error():
    layer = _layer()
    layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, 24, dtype=torch.float64))


def test_dropout_mask_is_shared_by_the_four_adapters():
    """The implemented simplification: ONE dropout mask for all adapters (documented in layer.py)."""
    layer = _layer(k=16, n=16, r=2, dropout=0.5)
    layer.train()
    x = torch.randn(1, 16, dtype=torch.float64)
    # identical adapters: with a shared mask, every adapter's contribution is identical
    with torch.no_grad():
        for k in range(1, 4):
            layer.lora_A[k].copy_(layer.lora_A[0])
            layer.lora_B[k].copy_(layer.lora_B[0])
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # replay the layer's seed draw and regenerate its mask
    seed = mk.lora_op.new_dropout_seed(x.device)
    mask = mk.dropout_mask(x.shape, 0.5, seed).to(x.dtype) / 0.5
    assert 0 < int(mask.count_nonzero()) < mask.numel()
    one = layer.scaling * (x * mask) @ layer.lora_A[0].t() @ layer.lora_B[0].t()
    torch.testing.assert_close(y, layer.base(x) + 4 * one)


def test_eval_mode_disables_dropout():
    layer = _layer(dropout=0.5)
    layer.eval()
    x = torch.randn(4, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer(x))


def test_wraps_existing_linear_and_checks_sizes():
    base = nn.Linear(24, 20, dtype=torch.float64)
    layer = mk.MageLinear(24, 20, base=base)
    assert layer.base is base and not base.weight.requires_grad
    assert layer.lora_A[0].dtype == torch.float64
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init
    with pytest.raises(ValueError, match="24 -> 20"):
        mk.MageLinear(20, 24, base=base)


def test_empty_batch():
    layer = _layer()
    x = torch.randn(0, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert x.grad.shape == (0, 24)
    assert all(torch.count_nonzero(p.grad) == 0 for p in layer.lora_A)


@pytest.mark.parametrize(
    "x,err,match",
    [
        (torch.randn(24, dtype=torch.float64), ValueError, "1-D"),
        (torch.randn(3, 23, dtype=torch.float64), ValueError, "23 features"),
        (torch.ones(3, 24, dtype=torch.int64), TypeError, "floating-point"),
        (torch.randn(3, 24, dtype=torch.float32), TypeError, "adapters are torch.float64"),
    ],
)
def test_bad_input_errors_name_the_problem(x, err, match):
    with pytest.raises(err, match=match):
        _layer()(x)


def test_adapters_on_other_device_than_input_is_an_error():
    layer = _layer()
    x = torch.randn(3, 24, dtype=torch.float64, device="meta")
    with pytest.raises(RuntimeError, match="adapters are on cpu"):
        layer(x)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"num_adapters": -1}, "num_adapters must be a positive integer"),
    ({"alpha": float("nan")}, "alpha must be a positive finite number"),
    ({"alpha": float("inf")}, "alpha must be a positive finite number"),
    ({"alpha": 0}, "alpha must be a positive finite number"),
    ({"alpha": -8.0}, "alpha must be a positive finite number"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": float("nan")}, "dropout"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.MageLinear(8, 8, **kwargs)


def test_constructor_accepts_numpy_scalars():
    import numpy as np

    layer = mk.MageLinear(8, 8, r=np.int64(2), alpha=np.float32(4.0))
    assert layer.r == 2 and isinstance(layer.r, int) and layer.scaling == 0.5


def test_cpu_autocast_bfloat16_runs_in_low_precision():
    layer = _layer(dtype=torch.float32)
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=3e-2, atol=5e-2)


def _bnb_base(kind: str, device: torch.device):
    """A bitsandbytes 4-bit or 8-bit linear (64 -> 48: bitsandbytes needs in_features >= 64) built from a float one."""
    import bitsandbytes as bnb  # installed by tests/run.sh (the test extra): these tests run on CPU and do not skip

    lin = nn.Linear(64, 48)
    if kind == "4bit":
        base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    else:
        base = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False, threshold=0.0)
    base.load_state_dict(lin.state_dict())
    return base.to(device)  # quantizes the weight


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_base_layer_forward_backward_fisher(kind, device):
    """MageLinear over a quantized base: output = base(x) + s B A x, adapter gradients and the per-sample Fisher
    exactly as for a float base (they do not depend on W0), dx = the base's dx + the adapters' part."""
    base = _bnb_base(kind, device)
    layer = mk.MageLinear(64, 48, r=3, alpha=6, dropout=0.0, base=base)
    assert layer.quantized and layer.lora_A[0].dtype == torch.float32
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0, 0.1)
    layer.for_task({"text"}, "image")  # adapters 0 and 3 train
    a, b = (t.detach() for t in layer.lora_weights())
    x = torch.randn(5, 7, 64, device=device, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        base_y = base(x)
    torch.testing.assert_close(y, base_y + layer.scaling * (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)

    fisher = mk.Fisher(layer, loss_reduction="sum")
    dy = torch.randn_like(y)
    fisher.reset()
    (layer(x) * dy).sum().backward()
    # references: the adapters' terms in float64 (they never touch W0), the base's dx from bitsandbytes itself
    xd, dyd, ad, bd = x.detach().double(), dy.double(), a.double(), b.double()
    s = layer.scaling
    ga_n = s * torch.einsum("ntr,ntk->nrk", dyd @ bd, xd)            # per-sample dA  [N, R, K]
    gb_n = s * torch.einsum("nto,ntr->nor", dyd, xd @ ad.t())          # per-sample dB  [N, O, R]
    x2 = x.detach().clone().requires_grad_(True)
    (base(x2) * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad + s * (dy @ b) @ a, rtol=1e-5, atol=1e-5)
    values = fisher.values()
    for k in range(4):
        rows = slice(k * 3, (k + 1) * 3)
        if k in (0, 3):
            torch.testing.assert_close(layer.lora_A[k].grad.double(), ga_n.sum(0)[rows], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.lora_B[k].grad.double(), gb_n.sum(0)[:, rows], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(values[f"lora_A.{k}"].double(), ga_n[:, rows].square().mean(0),
                                       rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(values[f"lora_B.{k}"].double(), gb_n[:, :, rows].square().mean(0),
                                       rtol=1e-4, atol=1e-8)
        else:
            assert layer.lora_A[k].grad is None and f"lora_A.{k}" not in values
    fisher.remove()
    with pytest.raises(RuntimeError, match="quantized"):
        layer.merge()
    with pytest.raises(ValueError, match="quantized base cannot hold"):
        mk.merge_and_unload(nn.Sequential(layer))
