"""Test configuration: where the Triton kernels under test run.

* On a machine without a usable CUDA GPU (CI, laptops), ``TRITON_INTERPRET=1``
  is set here so that the Triton kernels run in Triton's CPU interpreter on CPU
  tensors.
* On a GPU machine with ``TRITON_INTERPRET=0`` exported (``bench/gpu_check.sh``),
  the same tests build their tensors on CUDA through the ``device`` fixture, so
  the *compiled* kernels are checked against the float64 references.

Tests of the Triton backend take the ``device`` fixture; tests that only make
sense in the interpreter (e.g. forcing the GPU tile sizes on CPU) take
``interpreter_only``, and GPU-only checks (bf16, large shapes) take ``gpu_device``;
both skip, with a reason, where they do not apply. ``MAGE_REQUIRE_CUDA_TESTS=1``
(set by ``bench/gpu_check.sh``) makes pytest refuse to start unless the device is
CUDA. fp32 matmuls stay IEEE (no TF32) in every test: the tolerances assume it.
"""

import os

# Must be set before triton (or any kernel module) is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def triton_device() -> torch.device:
    """``cuda`` when a CUDA device is available and the Triton interpreter is off, else ``cpu``."""
    interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if torch.cuda.is_available() and not interpreter:
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def device() -> torch.device:
    """The device the Triton-backend tests put their tensors and modules on (see :func:`triton_device`)."""
    return triton_device()


@pytest.fixture
def interpreter_only(device: torch.device) -> None:
    """Skip a test that only makes sense in Triton's CPU interpreter when the compiled GPU path runs."""
    if device.type != "cpu":
        pytest.skip("interpreter-only check: on the GPU the other tests already run the compiled tile sizes")


@pytest.fixture
def gpu_device(device: torch.device) -> torch.device:
    """The CUDA device for GPU-only checks (bf16, large shapes); skips unless the compiled GPU path runs."""
    if device.type != "cuda":
        pytest.skip("needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset or 0)")
    return device


@pytest.fixture(scope="session", autouse=True)
def _narrow_gpu_autotune():
    """On the compiled GPU path, let ``matmul_concat_k``'s autotuner choose between its largest and its
    smallest tile only. A full search compiles and times every config for every new shape the tests
    use -- minutes of compile time on a fresh machine, more than ``bench/gpu_check.sh`` can spend.
    Every config is still checked on its own by ``test_matmul_concat_k_every_gpu_tile_config``;
    ``MAGE_TEST_FULL_AUTOTUNE=1`` keeps the whole search space."""
    full_search = os.environ.get("MAGE_TEST_FULL_AUTOTUNE", "0") not in ("", "0")
    if triton_device().type != "cuda" or full_search:
        yield
        return
    from mage_kernels.kernels import lora

    kernel = lora._matmul_concat_k_kernel
    configs = kernel.configs
    kernel.configs = [configs[0], configs[-1]]
    yield
    kernel.configs = configs


#: Test modules that start several processes (torchrun, mp.spawn). Under pytest-xdist
#: (``tests/run.sh``: ``-n 2 --dist loadgroup``) they share one worker and so run one after
#: the other: two ``torchrun --standalone`` launchers at once can pick the same free port, and
#: each launch already keeps two cores busy. Every other module is its own group (its
#: module-scoped fixtures are built once).
MULTIPROCESS_MODULES = frozenset({"test_distributed", "test_engines", "test_engines_backbones", "test_fisher", "test_scale",
                                  "test_scale_readme", "test_trainer_callback"})


#: Modules started first (the longest test runs while the other worker goes through the rest).
FIRST_MODULES = ("test_main_job",)


def _module(item) -> str:
    return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: _module(item) not in FIRST_MODULES)  # stable: the rest keep their order
    for item in items:
        module = _module(item)
        group = "multiprocess" if module in MULTIPROCESS_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config) -> None:
    """With ``MAGE_REQUIRE_CUDA_TESTS=1`` (bench/gpu_check.sh) refuse to run unless the Triton tests
    use CUDA tensors and compiled kernels: a GPU check must not silently test on the CPU."""
    config.addinivalue_line("markers", "xdist_group(name): tests pytest-xdist runs on one worker")
    if os.environ.get("MAGE_REQUIRE_CUDA_TESTS", "0") not in ("", "0") and triton_device().type != "cuda":
        raise pytest.UsageError(
            "MAGE_REQUIRE_CUDA_TESTS=1 but the Triton tests would run on CPU tensors: "
            f"torch.cuda.is_available()={torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} (needs a CUDA GPU and TRITON_INTERPRET=0)"
        )


def pytest_report_header(config) -> str:
    device = triton_device()
    where = "compiled, CUDA tensors" if device.type == "cuda" else "TRITON_INTERPRET=1, CPU tensors"
    return f"mage-kernels Triton tests: device={device} ({where})"


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Fresh random inputs per test (seeded for reproducibility), the default backend, and IEEE fp32
    matmuls on CUDA (the fp32 tolerances assume no TF32, in the kernels and in torch's references)."""
    import mage_kernels

    torch.manual_seed(1234)
    mage_kernels.set_backend(None)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    mage_kernels.set_backend(None)
