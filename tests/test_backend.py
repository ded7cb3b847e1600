"""Backend selection is explicit, inspectable and never silently falls back."""

import pytest
import torch

import mage_kernels as mk


def test_default_is_auto_and_cpu_resolves_to_torch(monkeypatch):
    monkeypatch.delenv("MAGE_BACKEND", raising=False)
    assert mk.backend() == "auto"
    assert mk.resolve_backend(torch.device("cpu")) == "torch"


def test_env_var_override(monkeypatch):
    monkeypatch.setenv("MAGE_BACKEND", "torch")
    assert mk.backend() == "torch"
    monkeypatch.setenv("MAGE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        mk.backend()


def test_set_backend_beats_env_and_use_backend_restores(monkeypatch):
    monkeypatch.setenv("MAGE_BACKEND", "torch")
    mk.set_backend("triton")
    assert mk.backend() == "triton"
    with mk.use_backend("torch"):
        assert mk.backend() == "torch"
    assert mk.backend() == "triton"
    with pytest.raises(ValueError):
        mk.set_backend("cuDNN")


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with mk.use_backend("triton"), pytest.raises(mk.BackendUnavailableError, match="TRITON_INTERPRET"):
        mk.resolve_backend(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with mk.use_backend("triton"):
        assert mk.resolve_backend(torch.device("cpu")) == "triton"


def test_explicit_cuda_on_cpu_tensors_raises():
    with mk.use_backend("cuda"), pytest.raises(mk.BackendUnavailableError, match="cuda"):
        mk.resolve_backend(torch.device("cpu"))


def test_layer_call_with_unavailable_backend_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = mk.MageLinear(8, 8, r=1)
    with mk.use_backend("triton"), pytest.raises(mk.BackendUnavailableError):
        layer(torch.randn(2, 8))


def test_backend_info_describes_the_machine():
    info = mk.backend_info()
    assert info["requested"] == "auto"
    assert info["resolved_cpu"] == "torch"
    assert isinstance(info["cuda_extension"], bool)
    if not info["cuda_extension"]:
        assert "not built" in info["cuda_extension_note"] or "failed" in info["cuda_extension_note"]


# ----------------------------------------------------------------------------- the LoRA path rule


def test_lora_linear_path_rule():
    """mk.lora_linear_path is the documented rule (resolving needs no GPU: it looks at device and dtype)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with mk.use_backend("auto"):
        assert mk.lora_linear_path(cpu, torch.float32).path == "torch"
        assert mk.lora_linear_path(cuda, torch.float64).path == "torch"
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            info = mk.lora_linear_path(cuda, dtype)
            assert info.path == "cublas" and info.backend == "triton"
            assert "cublas" in info.base_gemm and "cublas" in info.shrink and "cublas" in info.weight_grad
        drop = mk.lora_linear_path(cuda, torch.bfloat16, dropout=True, fisher=True, tokens_per_sample=1)
        assert "Philox" in drop.shrink and "masked expand" in drop.expand and "squares" in drop.weight_grad
        assert "one tile per sample" in mk.lora_linear_path(cuda, torch.bfloat16, fisher=True,
                                                            tokens_per_sample=16).weight_grad
    with mk.use_backend("torch"):
        assert mk.lora_linear_path(cuda, torch.bfloat16).path == "torch"
    if mk.backends.triton_interpreter():
        with mk.use_backend("triton"):
            info = mk.lora_linear_path(cpu, torch.float32)
            assert info.path == "triton" and "concat-K" in info.base_gemm
    with mk.use_backend("cuda"), pytest.raises(mk.BackendUnavailableError):
        mk.lora_linear_path(cpu, torch.float32)


def test_use_path_forces_and_restores_and_rejects_unknown_names():
    from mage_kernels import lora_op

    cpu = torch.device("cpu")
    with lora_op.use_path("cublas"):
        assert mk.lora_linear_path(cpu, torch.float32).path == "cublas"
    assert mk.lora_linear_path(cpu, torch.float32).path == "torch"
    with pytest.raises(ValueError, match="unknown path"):
        with lora_op.use_path("cudnn"):
            pass


def test_dropout_needs_a_seed_and_a_valid_probability():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    a, b = torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match="dropout_seed"):
        mk.lora_linear(x, w, None, a, b, 1.0, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        mk.lora_linear(x, w, None, a, b, 1.0, dropout_p=1.0, dropout_seed=torch.tensor([1]))
