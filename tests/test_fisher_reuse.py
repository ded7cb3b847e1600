"""Fisher accumulation when one backward passes through several forwards of the same layer."""

import pytest
import torch

import mage_kernels as mk
from mage_kernels import reference


def _layer(dtype=torch.float64, device=None):
    layer = mk.MageLinear(12, 12, r=2, alpha=8, dropout=0.0, dtype=dtype, device=device)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


def _per_sample_sq_sum(layer, loss_fn, x):
    """sum_n (d loss_n / dA)^2 with loss_n = loss_fn(x[n:n+1]) by brute force (float64)."""
    total_a = torch.zeros(4 * layer.r, 12, dtype=x.dtype, device=x.device)
    for n in range(x.shape[0]):
        layer.zero_grad(set_to_none=True)
        loss_fn(x[n:n + 1]).backward()
        total_a += torch.cat([p.grad for p in layer.lora_A]).pow(2)
    layer.zero_grad(set_to_none=True)
    return total_a


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_forwards_in_one_backward_accumulate_both(backend, device):
    dtype = torch.float64 if backend == "torch" else torch.float32  # Triton kernels: fp16/bf16/fp32
    layer = _layer(dtype, device)  # device: tests/conftest.py (CUDA with compiled Triton, else CPU)
    x1, x2 = torch.randn(3, 4, 12, dtype=dtype, device=device), torch.randn(3, 4, 12, dtype=dtype, device=device)
    with mk.use_backend(backend):
        fisher = mk.Fisher(layer, loss_reduction="sum")
        (layer(x1).square().sum() + layer(x2).sum()).backward()  # must not raise
        got = layer.fisher_a.clone()
        fisher.remove()
    # Each forward's per-sample squared gradients are added (the two calls are separate samples).
    expected = _per_sample_sq_sum(layer, lambda x: layer(x).square().sum(), x1)
    expected += _per_sample_sq_sum(layer, lambda x: layer(x).sum(), x2)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got, expected.to(got.dtype), **tol)


def test_layer_applied_twice_and_reset_before_backward_do_not_crash():
    layer = _layer()
    fisher = mk.Fisher(layer, loss_reduction="sum")
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    layer(layer(x)).sum().backward()
    assert torch.count_nonzero(layer.fisher_a) > 0
    y = layer(x).sum()
    fisher.reset()
    y.backward()
    assert torch.count_nonzero(layer.fisher_a) > 0
    a, b = layer.lora_weights()
    assert torch.isfinite(reference.lora_linear(x, layer.base.weight, layer.base.bias, a, b, 1.0)).all()
