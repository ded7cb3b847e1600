"""Build script for mage-kernels.

Installs two packages: ``mage_kernels`` (the kernel library) and ``mage_cl``
(the continual-learning driver, source in ``python/mage_cl``, command ``mage-cl``).

The CUDA C++ extension ``mage_kernels._C`` (sources in ``csrc/``) is built only
when torch is importable here, torch is a CUDA build and nvcc is found; otherwise
one line says why it is skipped and the pure Triton/PyTorch package installs.
pip's default build isolation hides the installed torch from this script, so
build the extension with ``pip install --no-build-isolation .``.
``MAGE_CUDA_ARCH`` overrides the architectures (default ``8.0;9.0``);
``MAGE_SKIP_CUDA=1`` skips the extension.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


# setup.py runs several times per pip install (requirements, metadata, build);
# say what happens to the extension only in the run that builds.
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}
_ANNOUNCE = any(arg in _BUILD_COMMANDS for arg in sys.argv[1:])


def _say(message: str) -> None:
    if _ANNOUNCE:
        print(f"mage-kernels: {message}", file=sys.stderr)


def _cuda_extension():
    """Return ``(ext_modules, cmdclass)`` for the CUDA extension, or ``([], {})`` with a reason printed."""
    if os.environ.get("MAGE_SKIP_CUDA", "0") not in ("", "0"):
        _say("MAGE_SKIP_CUDA set; building without the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch not importable in this (isolated?) build environment
        _say(f"skipping the CUDA extension: torch is not importable here ({exc}); "
             "use `pip install --no-build-isolation .` with a CUDA torch to build it")
        return [], {}
    if torch.version.cuda is None:
        _say(f"skipping the CUDA extension: torch {torch.__version__} is a CPU build")
        return [], {}
    if CUDA_HOME is None:
        _say("skipping the CUDA extension: nvcc / CUDA_HOME not found")
        return [], {}
    arch = os.environ.get("MAGE_CUDA_ARCH", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    sources = sorted(
        os.path.join("csrc", d, f)
        for d in ("kernels", "bindings")
        if os.path.isdir(os.path.join(HERE, "csrc", d))
        for f in os.listdir(os.path.join(HERE, "csrc", d))
        if f.endswith((".cu", ".cpp"))
    )
    if not sources:
        _say("skipping the CUDA extension: no sources in csrc/")
        return [], {}
    _say(f"building the CUDA extension mage_kernels._C for TORCH_CUDA_ARCH_LIST={arch}")
    ext = CUDAExtension(
        name="mage_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc", "include")],
        # No --use_fast_math: the kernels use IEEE division/rounding so that they
        # match the PyTorch reference operation by operation (they are memory bound).
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="mage-kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for MAGE continual learning of multimodal LLMs (Continual-NExT)",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["mage_kernels", "mage_kernels.*"]) + find_packages("python"),
    package_dir={"mage_cl": "python/mage_cl"},
    package_data={"mage_cl": ["bases/*.pt"]},  # the shipped base model(s), see mage_cl.model.BUNDLED_BASES
    # Ranges of the releases the code supports (CUDA machines keep the torch they have); the test
    # command pins this machine's exact versions with tests/constraints.txt (see tests/run.sh).
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "numpy>=1.24",
        "transformers>=4.46,<6",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        # everything the test suite imports: it must not skip in CI (tests/run.sh installs this extra)
        "test": ["pytest>=7", "pytest-xdist>=3.5", "pytest-benchmark>=4", "peft>=0.21", "diffusers>=0.42", "bitsandbytes>=0.50",
                 "accelerate>=1.1", "deepspeed>=0.19"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "peft>=0.21", "opacus>=1.4", "backpack-for-pytorch>=1.6"],
        "peft": ["peft>=0.21"],                 # mage_kernels.integrations.peft
        "trainer": ["accelerate>=1.1"],         # mage_kernels.integrations.transformers (transformers.Trainer)
        "quant": ["bitsandbytes>=0.50"],        # 4/8-bit bases; 0.50 is the first tested, on CPU and CUDA
        "deepspeed": ["deepspeed>=0.19"],       # mage_kernels.integrations.deepspeed (ZeRO 1/2/3)
        "cuda": ["ninja"],
    },
    entry_points={"console_scripts": ["mage-cl=mage_cl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
