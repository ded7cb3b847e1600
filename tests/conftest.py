"""Test configuration: Triton kernels run in the CPU interpreter."""

import os

# Must be set before triton (or any kernel module) is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Fresh random inputs per test (seeded for reproducibility) and the default backend."""
    import mage_kernels

    torch.manual_seed(1234)
    mage_kernels.set_backend(None)
    yield
    mage_kernels.set_backend(None)
