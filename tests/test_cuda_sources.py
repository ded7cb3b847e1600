"""Compile-only checks of the CUDA C++ backend in ``csrc/`` (no GPU needed).

So that a broken kernel or binding cannot land unseen on a CPU-only CI machine:

* every ``csrc/**/*.cu`` compiles with the machine's nvcc for sm_90, with all
  warnings as errors;
* the torch bindings (``csrc/bindings/*.cpp``) compile against the installed
  torch's headers (the CPU wheel ships the c10/cuda headers) and CUDA's;
* with a CPU build of torch, the bindings and kernels are linked into a
  loadable stand-in of ``mage_kernels._C`` (the one libc10_cuda data symbol the
  bindings reference is stubbed; nothing CUDA is ever called). Loading it in a
  subprocess checks what only the dispatcher can: that the ``TORCH_LIBRARY``
  schemas parse, that every kernel's C++ signature matches its schema, that the
  schemas equal the Python ops' (``cuda_extension.schema_mismatches()``), and
  that the Meta kernels infer shapes.

Everything is compiled once per session, two files at a time. Tests skip, with
the reason, when nvcc or a C++ compiler is absent. The GPU behaviour of the ops
is tested in ``test_cuda_backend.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
BINDING_FILES = sorted((CSRC / "bindings").glob("*.cpp"))
KERNEL_FILES = sorted((CSRC / "kernels").glob("*.cu"))
ARCH = "sm_90"


def _cuda_home() -> Optional[Path]:
    """The CUDA toolkit root (for its include dir): $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or nvcc's parent."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c)
    return None


def _nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    home = _cuda_home()
    if home and (home / "bin" / "nvcc").is_file():
        return str(home / "bin" / "nvcc")
    return None


NVCC = _nvcc()
CUDA_HOME = _cuda_home()
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_cxx = pytest.mark.skipif(CXX is None or CUDA_HOME is None, reason="needs a C++ compiler and the CUDA headers")


@dataclass
class Compiled:
    source: Path
    command: List[str]
    returncode: int
    output: str
    obj: Path

    def explain(self) -> str:
        return f"{self.source.relative_to(ROOT)} failed to compile:\n$ {' '.join(self.command)}\n{self.output}"


def _run(source: Path, command: List[str], obj: Path) -> Compiled:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return Compiled(source, command, proc.returncode, proc.stdout + proc.stderr, obj)


def _nvcc_command(source: Path, obj: Path) -> List[str]:
    return [NVCC, f"-arch={ARCH}", "-std=c++17", "-O3", f"-I{CSRC / 'include'}", "-Xcompiler", "-fPIC",
            "-Xcompiler", "-Wall", "--Werror", "all-warnings", "-c", str(source), "-o", str(obj)]


def _binding_command(source: Path, obj: Path) -> List[str]:
    from torch.utils.cpp_extension import include_paths

    includes = [*include_paths(), sysconfig.get_paths()["include"], str(CUDA_HOME / "include")]
    return [CXX, "-std=c++17", "-O0", "-fPIC", "-Wall", "-Wextra", "-Werror",
            *[f"-isystem{p}" for p in includes], f"-I{CSRC / 'include'}",
            # The CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h (it only
            # sets the Windows export macro); skip it. Harmless with a CUDA wheel.
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-c", str(source), "-o", str(obj)]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> Dict[Path, Compiled]:
    """Every .cu (nvcc) and binding .cpp (C++ compiler) compiled once, two at a time."""
    out = tmp_path_factory.mktemp("csrc_build")
    jobs = []
    for i, src in enumerate(CU_FILES):
        if NVCC is not None:
            obj = out / f"{i}_{src.stem}.o"
            jobs.append((src, _nvcc_command(src, obj), obj))
    for i, src in enumerate(BINDING_FILES):
        if CXX is not None and CUDA_HOME is not None:
            obj = out / f"b{i}_{src.stem}.o"
            jobs.append((src, _binding_command(src, obj), obj))
    # Longest first (the bindings pull in ATen), so two workers finish together.
    jobs.sort(key=lambda j: j[0].suffix != ".cpp")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: _run(*j), jobs))
    return {r.source: r for r in results}


def test_sources_exist():
    assert KERNEL_FILES, "no CUDA kernels in csrc/kernels"
    assert BINDING_FILES, "no torch bindings in csrc/bindings"
    headers = sorted(p.name for p in (CSRC / "include" / "mage_kernels").glob("*.h"))
    assert {"pema.h", "weight_grad.h", "dtype.h"} <= set(headers)


@pytest.mark.parametrize("source", CU_FILES, ids=[str(p.relative_to(CSRC)) for p in CU_FILES])
@needs_nvcc
def test_cuda_source_compiles_for_sm90(compiled, source):
    result = compiled[source]
    assert result.returncode == 0, result.explain()
    assert result.obj.is_file() and result.obj.stat().st_size > 0


def test_kernel_headers_are_torch_free():
    """The launcher API must stay usable from plain C++/CMake (no torch, no fp16 headers)."""
    for header in (CSRC / "include" / "mage_kernels").glob("*.h"):
        text = header.read_text()
        for banned in ("torch/", "ATen/", "c10/", "cuda_fp16.h", "cuda_bf16.h"):
            assert banned not in text, f"{header.name} includes {banned}"
    for kernel in KERNEL_FILES:
        text = kernel.read_text()
        for banned in ("torch/", "ATen/", "c10/"):
            assert banned not in text, f"{kernel.name} includes {banned}"


@pytest.mark.parametrize("source", BINDING_FILES, ids=[p.name for p in BINDING_FILES])
@needs_cxx
def test_torch_bindings_compile(compiled, source):
    result = compiled[source]
    assert result.returncode == 0, result.explain()


_LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)  # c10::cuda functions stay unresolved (never called)
    import torch
    spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from mage_kernels import cuda_extension
    out = {"mismatches": cuda_extension.schema_mismatches(),
           "ops": cuda_extension._registered(cuda_extension.NAMESPACE),
           "schemas": {n: str(getattr(torch.ops.mage_cuda, n).default._schema) for n in cuda_extension.OPS}}
    g = torch.empty(12, 5, device="meta", dtype=torch.bfloat16)
    x = torch.empty(12, 7, device="meta", dtype=torch.bfloat16)
    f = torch.empty(5, 7, device="meta")
    grad = torch.ops.mage_cuda.weight_grad_with_fisher(g, x, 3, 0.5, f, None, 1.0)
    out["wgf_meta"] = [list(grad.shape), str(grad.dtype)]
    e = [torch.empty(4, device="meta"), torch.empty(3, 2, device="meta", dtype=torch.float16)]
    counts = torch.ops.mage_cuda.pema_update_(e, e, e, e, 1e-5, 0.99)
    out["pema_meta"] = [list(counts.shape), str(counts.dtype)]
    try:
        torch.ops.mage_cuda.weight_grad_with_fisher(torch.randn(4, 3), torch.randn(4, 2), 2, 1.0, None, None, 1.0)
        out["cpu_error"] = None
    except NotImplementedError as exc:
        out["cpu_error"] = str(exc).splitlines()[0]
    print("RESULT " + json.dumps(out))
    """
)

# Defines the one libc10_cuda *data* symbol the bindings reference (through the
# CUDA guard/stream headers); functions resolve lazily and are never called.
# Variable names are mangled without their type, so a void* stands in for
# std::atomic<CUDAAllocator*>.
_STUB = "namespace c10 { namespace cuda { namespace CUDACachingAllocator { void* allocator = nullptr; } } }\n"


@needs_nvcc
@needs_cxx
@pytest.mark.skipif(torch.version.cuda is not None,
                    reason="CUDA build of torch: the real extension is tested in test_cuda_backend.py")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stand-in module is linked for Linux")
def test_extension_loads_and_matches_python_schemas(compiled, tmp_path):
    for src in KERNEL_FILES + BINDING_FILES:
        assert compiled[src].returncode == 0, compiled[src].explain()
    stub = tmp_path / "c10_cuda_stub.cpp"
    stub.write_text(_STUB)
    so = tmp_path / "_C.so"
    torch_lib = Path(torch.__file__).parent / "lib"
    cuda_lib = next((CUDA_HOME / d for d in ("lib64", "lib") if (CUDA_HOME / d / "libcudart.so").exists()), None)
    if cuda_lib is None:
        pytest.skip(f"libcudart.so not found under {CUDA_HOME}")
    link = [CXX, "-shared", "-fPIC", "-o", str(so), str(stub),
            *[str(compiled[s].obj) for s in KERNEL_FILES + BINDING_FILES],
            f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-L{cuda_lib}", "-lcudart",
            f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cuda_lib}"]
    proc = subprocess.run(link, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"link failed:\n$ {' '.join(link)}\n{proc.stdout}{proc.stderr}"

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(so)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, f"loading the stand-in extension failed:\n{run.stdout}\n{run.stderr}"
    out = json.loads(lines[-1][len("RESULT "):])

    assert out["ops"] == ["pema_update_", "weight_grad_with_fisher"]
    assert out["mismatches"] == [], "\n".join(out["mismatches"])
    assert "Tensor(a!)[] emas" in out["schemas"]["pema_update_"]
    assert "Tensor(a!)? fisher" in out["schemas"]["weight_grad_with_fisher"]
    assert out["wgf_meta"] == [[5, 7], "torch.bfloat16"]
    assert out["pema_meta"] == [[2], "torch.int64"]
    # CPU tensors never reach the CUDA kernels: the dispatcher refuses them by name.
    assert out["cpu_error"] and "mage_cuda::weight_grad_with_fisher" in out["cpu_error"] and "CPU" in out["cpu_error"]


def test_schema_comparison_reports_differences():
    """schema_mismatches() itself: identical schemas pass, a changed type / mutation / missing op is named."""
    from mage_kernels import cuda_extension
    from mage_kernels.weight_grad_op import OP_SCHEMA

    lib = torch.library.Library("mage_schema_probe", "DEF")  # noqa: F841  (kept alive for the test)
    lib.define("weight_grad_with_fisher" + OP_SCHEMA)
    lib.define("pema_update_(Tensor[] params, Tensor[] emas, Tensor[] grads, Tensor[] fishers, float lam, "
               "int beta_fallback) -> Tensor")
    problems = cuda_extension.schema_mismatches("mage_schema_probe")
    assert len(problems) == 1 and problems[0].startswith("pema_update_:"), problems
    assert "mage_schema_probe: arg emas: List[Tensor] | mage: arg emas: List[Tensor] (mutated)" in problems[0]
    assert "mage_schema_probe: arg beta_fallback: int | mage: arg beta_fallback: float" in problems[0]

    lib2 = torch.library.Library("mage_schema_probe2", "DEF")  # noqa: F841
    lib2.define("weight_grad_with_fisher" + OP_SCHEMA)
    missing = cuda_extension.schema_mismatches("mage_schema_probe2")
    assert len(missing) == 1 and "mage_schema_probe2::pema_update_ is not registered" in missing[0]
