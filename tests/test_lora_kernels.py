"""Triton ``shrink`` and ``matmul_concat_k`` (mage_kernels/kernels/lora.py) against the reference.

The tensors live on the ``device`` fixture (tests/conftest.py): CPU tensors in
Triton's interpreter (``TRITON_INTERPRET=1``), or CUDA tensors and the compiled
kernels on a GPU machine. The reference is evaluated on
float64 copies of the inputs, so the only error left is the kernel's own (fp32
accumulation, output rounding). Shapes are ragged (not multiples of any block).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from mage_kernels import reference
from mage_kernels.kernels import lora

# Max error allowed, relative to the largest reference entry: fp32 kernels land
# near 1e-7; fp16 outputs are rounded to 11 bits (~5e-4 relative).
REL_TOL = {torch.float32: 2e-6, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float16]


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert out.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0, "the reference is all zeros: the test would prove nothing"
    err = (out.double() - expected).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"max error {err:.3g} vs reference scale {scale:.3g}"


def strided(shape, dtype, kind: str, device: torch.device) -> torch.Tensor:
    """A random ``shape`` tensor that is contiguous, a transposed view, or a column-strided slice."""
    rows, cols = shape
    if kind == "contiguous":
        return torch.randn(rows, cols, dtype=dtype, device=device)
    if kind == "transposed":
        return torch.randn(cols, rows, dtype=dtype, device=device).t()
    if kind == "sliced":
        return torch.randn(rows, 2 * cols + 3, dtype=dtype, device=device)[:, 1 : 2 * cols + 1 : 2]
    raise ValueError(kind)


# ----------------------------------------------------------------------------- shrink

SHRINK_SHAPES = [(37, 50, 12), (1, 16, 32), (70, 33, 3), (19, 200, 150)]  # (M, K, R); R=150 spans 2 R-tiles


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,r", SHRINK_SHAPES)
@pytest.mark.parametrize("a_kind", ["contiguous", "transposed"])
def test_shrink_matches_reference(dtype, m, k, r, a_kind, device):
    x = torch.randn(m, k, dtype=dtype, device=device)
    a = strided((r, k), dtype, a_kind, device)
    out = lora.shrink(x, a, 0.75)
    assert_matches(out, reference.shrink(x.double(), a.double(), 0.75), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_non_contiguous_x_and_default_scale(dtype, device):
    x = strided((23, 41), dtype, "sliced", device)
    a = strided((9, 41), dtype, "sliced", device)
    assert not x.is_contiguous() and not a.is_contiguous()
    out = lora.shrink(x, a)
    assert_matches(out, reference.shrink(x.double(), a.double()), dtype)


def test_shrink_of_all_four_adapters_equals_per_adapter_shrinks(device):
    """One launch over cat(A_0..A_3) gives each adapter's own u_k = x A_k^T side by side."""
    x = torch.randn(29, 40, device=device)
    adapters = [torch.randn(3, 40, device=device) for _ in range(4)]
    u = lora.shrink(x, torch.cat(adapters, 0))
    for k, a_k in enumerate(adapters):
        expected = x.double() @ a_k.double().t()
        err = (u[:, 3 * k : 3 * k + 3].double() - expected).abs().max().item()
        assert err <= 2e-6 * expected.abs().max().item()


def test_shrink_empty_batch_and_empty_k(device):
    a = torch.randn(8, 5, device=device)
    out = lora.shrink(torch.randn(0, 5, device=device), a)
    assert out.shape == (0, 8)
    out = lora.shrink(torch.randn(4, 0, device=device), torch.randn(8, 0, device=device))
    assert torch.equal(out, torch.zeros(4, 8, device=device))


def test_shrink_gpu_tile_sizes_in_the_interpreter(monkeypatch, interpreter_only):
    """The block sizes the GPU path picks (bigger than the interpreter's) are correct too."""
    monkeypatch.setattr(lora, "triton_interpreter", lambda: False)
    x, a = torch.randn(70, 130), torch.randn(40, 130)
    assert_matches(lora.shrink(x, a, 2.0), reference.shrink(x.double(), a.double(), 2.0), torch.float32)


# ----------------------------------------------------------------------------- matmul_concat_k

CONCAT_SHAPES = [(37, 50, 29, 12), (1, 16, 64, 32), (45, 70, 33, 3)]  # (M, K1, N, K2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k1,n,k2", CONCAT_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_concat_k_forward_layout(dtype, m, k1, n, k2, with_bias, device):
    """The forward's ``[x | s u] @ [W0 | B]^T`` with the op's transposed-view operands."""
    x = torch.randn(m, k1, dtype=dtype, device=device)
    weight = torch.randn(n, k1, dtype=dtype, device=device)
    u = torch.randn(m, k2, dtype=dtype, device=device)
    lora_b = torch.randn(n, k2, dtype=dtype, device=device)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    out = lora.matmul_concat_k(x, weight.t(), u, lora_b.t(), 1.5, bias)
    expected = reference.matmul_concat_k(
        x.double(), weight.t().double(), u.double(), lora_b.t().double(), 1.5,
        None if bias is None else bias.double(),
    )
    assert_matches(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_concat_k_input_grad_layout(dtype, device):
    """The input gradient's ``[dY | s G] @ [W0 ; A]`` (contiguous b operands, strided a operands)."""
    grad_y = strided((31, 27), dtype, "transposed", device)
    weight = torch.randn(27, 45, dtype=dtype, device=device)
    g = strided((31, 12), dtype, "sliced", device)
    lora_a = torch.randn(12, 45, dtype=dtype, device=device)
    out = lora.matmul_concat_k(grad_y, weight, g, lora_a, 0.5)
    expected = reference.matmul_concat_k(grad_y.double(), weight.double(), g.double(), lora_a.double(), 0.5)
    assert_matches(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_concat_k_without_second_chunk(dtype, with_bias, device):
    a1 = torch.randn(37, 50, dtype=dtype, device=device)
    b1 = strided((50, 29), dtype, "transposed", device)
    bias = torch.randn(29, dtype=dtype, device=device) if with_bias else None
    out = lora.matmul_concat_k(a1, b1, bias=bias)
    expected = reference.matmul_concat_k(a1.double(), b1.double(), bias=None if bias is None else bias.double())
    assert_matches(out, expected, dtype)


def test_matmul_concat_k_scale_applies_only_to_second_chunk(device):
    a1, b1 = torch.randn(20, 17, device=device), torch.randn(17, 19, device=device)
    a2, b2 = torch.randn(20, 5, device=device), torch.randn(5, 19, device=device)
    base = lora.matmul_concat_k(a1, b1)
    with_zero = lora.matmul_concat_k(a1, b1, a2, b2, 0.0)
    torch.testing.assert_close(with_zero, base, rtol=0, atol=1e-6)
    doubled = lora.matmul_concat_k(a1, b1, a2, b2, 2.0) - base
    single = lora.matmul_concat_k(a1, b1, a2, b2, 1.0) - base
    torch.testing.assert_close(doubled, 2 * single, rtol=1e-5, atol=1e-5)


def _gpu_concat_k_configs():
    """The autotune configs the compiled GPU path searches (whatever machine collects the tests)."""
    with mock.patch.object(lora, "triton_interpreter", lambda: False):
        return lora._concat_k_configs()


GPU_CONCAT_K_CONFIGS = _gpu_concat_k_configs()
INTERPRETER_CONFIGS = 2  # the interpreter checks the first two (largest) tiles; a GPU checks them all


@pytest.mark.parametrize(
    "config_index", range(len(GPU_CONCAT_K_CONFIGS)),
    ids=["{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**c.kwargs) + f"-w{c.num_warps}-s{c.num_stages}"
         for c in GPU_CONCAT_K_CONFIGS],
)
def test_matmul_concat_k_every_gpu_tile_config(monkeypatch, config_index, device):
    """Each H100 autotune config on its own (no timing, no autotune cache) gives the reference result.

    On a GPU this covers the configs the suite's autotuner does not pick (tests/conftest.py
    narrows its search to keep compile time small); the interpreter checks the first two."""
    if device.type == "cpu":
        if config_index >= INTERPRETER_CONFIGS:
            pytest.skip("interpreter: the first two GPU tiles are checked here, every tile on a GPU")
        monkeypatch.setattr(lora, "triton_interpreter", lambda: False)
    monkeypatch.setattr(lora._matmul_concat_k_kernel, "configs", [GPU_CONCAT_K_CONFIGS[config_index]])
    x, weight = torch.randn(131, 70, device=device), torch.randn(270, 70, device=device)
    u, lora_b = torch.randn(131, 24, device=device), torch.randn(270, 24, device=device)
    bias = torch.randn(270, device=device)
    out = lora.matmul_concat_k(x, weight.t(), u, lora_b.t(), 0.5, bias)
    expected = reference.matmul_concat_k(x.double(), weight.t().double(), u.double(), lora_b.t().double(), 0.5,
                                         bias.double())
    assert_matches(out, expected, torch.float32)


def test_matmul_concat_k_empty_batch(device):
    def rand(*shape):
        return torch.randn(*shape, device=device)

    out = lora.matmul_concat_k(rand(0, 6), rand(6, 7), rand(0, 2), rand(2, 7), 1.0, rand(7))
    assert out.shape == (0, 7)


# ----------------------------------------------------------------------------- bad input


def test_float64_is_rejected_with_a_clear_error(device):
    x = torch.randn(4, 8, dtype=torch.float64, device=device)
    a = torch.randn(3, 8, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        lora.shrink(x, a)
    with pytest.raises(TypeError, match="float64"):
        lora.matmul_concat_k(x, a.t())


def test_mixed_dtypes_and_bad_shapes_are_rejected(device):
    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device)

    with pytest.raises(TypeError, match="cast them to one dtype"):
        lora.shrink(rand(4, 8), rand(3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="last dimensions must match"):
        lora.shrink(rand(4, 8), rand(3, 7))
    with pytest.raises(ValueError, match="inner dimensions"):
        lora.matmul_concat_k(rand(4, 8), rand(7, 5))
    with pytest.raises(ValueError, match="both a2 and b2"):
        lora.matmul_concat_k(rand(4, 8), rand(8, 5), a2=rand(4, 2))
    with pytest.raises(ValueError, match="does not fit"):
        lora.matmul_concat_k(rand(4, 8), rand(8, 5), rand(4, 2), rand(3, 5))
    with pytest.raises(ValueError, match="bias must be"):
        lora.matmul_concat_k(rand(4, 8), rand(8, 5), bias=rand(4))
    with pytest.raises(ValueError, match="2-D"):
        lora.shrink(rand(2, 4, 8), rand(3, 8))


# ----------------------------------------------------------------------------- GPU only


def test_bf16_on_gpu(gpu_device):
    """bf16 ``tl.dot`` is only meaningful compiled on a GPU (the interpreter's bf16 is not)."""
    dev = gpu_device
    x = torch.randn(300, 257, device=dev, dtype=torch.bfloat16)
    weight = torch.randn(129, 257, device=dev, dtype=torch.bfloat16)
    lora_a = torch.randn(32, 257, device=dev, dtype=torch.bfloat16)
    lora_b = torch.randn(129, 32, device=dev, dtype=torch.bfloat16)
    bias = torch.randn(129, device=dev, dtype=torch.bfloat16)
    u = lora.shrink(x, lora_a)
    ref_u = reference.shrink(x.double(), lora_a.double())
    assert (u.double() - ref_u).abs().max() <= 1e-2 * ref_u.abs().max()
    y = lora.matmul_concat_k(x, weight.t(), u, lora_b.t(), 1.0, bias)
    ref_y = reference.matmul_concat_k(x.double(), weight.t().double(), u.double(), lora_b.t().double(), 1.0,
                                      bias.double())
    assert (y.double() - ref_y).abs().max() <= 1e-2 * ref_y.abs().max()
