"""The Triton kernels compile for sm_80 and sm_90 without spills or shared memory over the limit -- no GPU.

Runs ``bench/aot_report.py --subset ci`` (a representative subset of the full
report: bf16 at the LLaMA-13B shapes; the concat-K GEMM's largest config that
survives pruning on each capability, the Philox-dropout shrink and masked expand on
both, the Fisher kernels in their three shapes and the PEMA kernel's vector path on
sm_90) in a fresh interpreter with ``TRITON_INTERPRET=0``: Triton compiles ahead of
time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and
the wheel's ptxas. Fails on a compile error, any register spill, or shared memory
above the per-block limit; also checks what the report must show (tensor-core dots,
vectorized PEMA loads, the pruning).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    try:
        import triton.backends.nvidia  # noqa: F401  (the CUDA backend and its ptxas ship in the triton wheel)
    except ImportError as exc:  # pragma: no cover - triton is a dependency
        pytest.fail(f"triton's NVIDIA backend is not importable: {exc}")
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_CACHE_DIR", None)  # the report makes a fresh cache so that ptxas logs every compile
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "aot_report.py"), "--subset", "ci",
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.exists(), f"the report wrote nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    return proc, data


def test_every_kernel_in_the_subset_compiles_without_spills_within_shared_memory(report):
    proc, data = report
    bad = [r for r in data["rows"] if not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['cap']} {r['config']}: {r['error']}" for r in bad)
    assert proc.returncode == 0, proc.stdout[-3000:]
    compiled = [r for r in data["rows"] if not r["pruned"]]
    assert len(compiled) >= 10
    for r in compiled:
        assert r["spill_bytes"] == 0, r
        assert r["regs"] is not None and 0 < r["regs"] <= 255, r
        assert 0 <= r["smem_bytes"] <= r["smem_limit"], r


def test_the_subset_covers_every_kernel_family_on_both_capabilities(report):
    _, data = report
    kernels = {(r["kernel"], r["cap"]) for r in data["rows"] if not r["pruned"]}
    for name in ("_matmul_concat_k_kernel", "_shrink_kernel", "_expand_accumulate_kernel"):
        assert {(name, "sm_80"), (name, "sm_90")} <= kernels, name
    for name in ("_weight_grad_kernel", "_weight_grad_t1_kernel", "_pema_kernel"):
        assert (name, "sm_90") in kernels, name


def test_tensor_cores_vector_loads_and_pruning_are_what_the_design_says(report):
    _, data = report
    rows = data["rows"]
    big = [r for r in rows if r["kernel"] == "_matmul_concat_k_kernel" and r["cap"] == "sm_90"
           and r["config"].startswith("128x256x64")]
    assert big and big[0]["mma"] == "wgmma" and big[0]["spill_bytes"] == 0  # the tile that used to spill
    assert all(r["mma"] == "mma" for r in rows if r["kernel"] == "_matmul_concat_k_kernel" and r["cap"] == "sm_80"
               and not r["pruned"])
    pema = [r for r in rows if r["kernel"] == "_pema_kernel"]
    assert pema and all(r["vector_loads"] >= 16 for r in pema), pema  # 4 tensors x 4 blocks of 128-bit loads
    pruned = [r for r in rows if r["pruned"]]
    assert pruned and all(r["cap"] == "sm_80" and "accumulator registers" in r["pruned_why"] for r in pruned)
