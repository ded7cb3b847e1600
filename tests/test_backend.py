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
