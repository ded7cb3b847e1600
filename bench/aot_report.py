"""Ahead-of-time compile report of every Triton kernel mage-kernels can launch -- no GPU needed.

    python bench/aot_report.py                       # everything: sm_80 and sm_90, bf16 and fp16
    python bench/aot_report.py --subset ci           # the representative subset tests/ runs
    python bench/aot_report.py --json out.json --md out.md

How: the library's own kernel wrappers (``mage_kernels.kernels.*``) are called on
``device="meta"`` tensors of the target shapes inside
``mage_kernels.kernels.launch.record_launches()``, which records each launch (the
kernel, its arguments, block sizes and flags exactly as the wrapper chose them
for a 132-SM GPU) instead of running it. Each recorded launch -- and, for an
autotuned kernel, each of its autotune configs that the library's shared-memory
pruning keeps for that compute capability -- is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` (Triton's own
ptxas from the wheel) with Triton's JIT specialization rules (integers equal to 1
become constants, 16-divisible integers and 16-byte aligned pointers get the
divisibility hint). Every row:

    kernel, variant, config, cap, dtype, shapes, ok, error, regs, spill_bytes,
    smem_bytes, smem_limit, mma (wgmma / mma / none), vector_loads, pruned, compile_s

``regs`` and ``spill_bytes`` (spill stores) come from ptxas' ``-v`` log,
``smem_bytes`` is Triton's dynamic shared memory plus ptxas' static shared memory,
``vector_loads`` counts 64/128-bit global loads in the PTX. ``ok`` is False on a
compile error, any spill, or shared memory above the per-block limit of the
capability. Exit status 1 when any row is not ok.
Shapes: LLaMA-13B (d=5120, ffn 13824, 8192 tokens, 4 adapters x r=8, 3 trainable) and
a small ragged one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

# Compiled kernels, not the interpreter; a fresh cache so that ptxas runs (and logs) every compile.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mage_aot_cache_")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset; 1 is its default
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mage_kernels.kernels import dropout as kdrop  # noqa: E402
from mage_kernels.kernels import lora as klora  # noqa: E402
from mage_kernels.kernels import pema as kpema  # noqa: E402
from mage_kernels.kernels import weight_grad as kwg  # noqa: E402
from mage_kernels.kernels.launch import Launch, record_launches  # noqa: E402

CAPS = (80, 90)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}
META = torch.device("meta")

# ----------------------------------------------------------------------------- the launches


def _shapes() -> Dict[str, Dict[str, int]]:
    return {
        "llama13b": dict(M=8192, K=5120, N=13824, R=32, P=24, N_SAMPLES=16),
        "llama13b-down": dict(M=8192, K=13824, N=5120, R=32, P=24, N_SAMPLES=16),
        "small": dict(M=37, K=50, N=29, R=12, P=9, N_SAMPLES=1),
    }


def _t(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


def lora_launches(shape: Dict[str, int], dtype: torch.dtype, p: float = 0.05) -> List[Tuple[str, Callable[[], Any]]]:
    """(variant, call) of every LoRA kernel launch the op makes at this shape (forward and backward)."""
    m, k, n, r, pr = shape["M"], shape["K"], shape["N"], shape["R"], shape["P"]
    seed = torch.empty(1, dtype=torch.int64, device=META)
    x, w, a, b = _t(m, k, dtype=dtype), _t(n, k, dtype=dtype), _t(r, k, dtype=dtype), _t(n, r, dtype=dtype)
    bias, dy, su, sg = _t(n, dtype=dtype), _t(m, n, dtype=dtype), _t(m, r, dtype=dtype), _t(m, r, dtype=dtype)
    return [
        ("shrink dropout (s drop(x) A^T)", lambda: klora.shrink(x, a, 1.0, p, seed)),
        ("shrink (s dY B)", lambda: klora.shrink(dy, b.t(), 1.0)),
        ("expand_accumulate dropout (dx += mask s G A)", lambda: klora.expand_accumulate_(x, sg, a, 1.0, p, seed)),
        ("concat-K forward [x|su]@[W|B]^T + bias", lambda: klora.matmul_concat_k(x, w.t(), su, b.t(), 1.0, bias)),
        ("concat-K input grad [dY|sG]@[W;A]", lambda: klora.matmul_concat_k(dy, w, sg, a, 1.0)),
        ("concat-K base only dY@W", lambda: klora.matmul_concat_k(dy, w)),
    ]


def weight_grad_launches(shape: Dict[str, int], dtype: torch.dtype, p: float = 0.05
                         ) -> List[Tuple[str, Callable[[], Any]]]:
    m, k, n, r, pr = shape["M"], shape["K"], shape["N"], shape["R"], shape["P"]
    seed = torch.empty(1, dtype=torch.int64, device=META)
    x, dy = _t(m, k, dtype=dtype), _t(m, n, dtype=dtype)
    sg, su = _t(m, r, dtype=dtype)[:, :pr], _t(m, r, dtype=dtype)[:, :pr]
    fa, fb = _t(r, k, dtype=torch.float32)[:pr], _t(n, r, dtype=torch.float32)[:, :pr]
    tw = _t(m, dtype=torch.float32)
    out: List[Tuple[str, Callable[[], Any]]] = []
    for t_name, samples in (("T=%d" % (m // shape["N_SAMPLES"]), shape["N_SAMPLES"]), ("T=1", m),
                            ("T=16", max(1, m // 16))):
        if m % samples:
            continue
        for weighted in (False, True):
            wname = " weighted" if weighted else ""
            out.append((f"dA Fisher {t_name}{wname} dropout",
                        lambda s=samples, wt=weighted: kwg.weight_grad_with_fisher(
                            sg, x, s, 1.0, fa, tw if wt else None, 1.0, dropout_p=p, seed=seed)))
            out.append((f"dB Fisher {t_name}{wname}",
                        lambda s=samples, wt=weighted: kwg.weight_grad_with_fisher(
                            dy, su, s, 1.0, fb, tw if wt else None, 1.0)))
    out.append(("dA plain dropout", lambda: kwg.weight_grad_with_fisher(sg, x, 1, 1.0, dropout_p=p, seed=seed)))
    out.append(("dB plain", lambda: kwg.weight_grad_with_fisher(dy, su, 1, 1.0)))
    return out


def pema_launches(dtype: torch.dtype) -> List[Tuple[str, Callable[[], Any]]]:
    """The PEMA kernel for a model in ``dtype`` (F float32): the A group (contiguous F), the B group
    (F a column block of fisher_b), aligned (vector) and misaligned (scalar); plus float32 adapters."""
    r, d, big = 8, 5120, 32

    def run(pd, ed, gd, misaligned=False):
        params = [_t(r, d, dtype=pd), _t(d * r + 1, dtype=pd)[1:].view(d, r) if misaligned else _t(d, r, dtype=pd)]
        emas = [_t(r, d, dtype=ed), _t(d, r, dtype=ed)]
        grads = [_t(r, d, dtype=gd), _t(d, r, dtype=gd)]
        fishers = [_t(big, d, dtype=torch.float32)[:r], _t(d, big, dtype=torch.float32)[:, :r]]
        plan = kpema.PemaLaunch(params, emas, grads, fishers)
        plan.run(torch.empty(2, dtype=torch.int64, device=META), 1e-5, 0.99)

    return [
        ("PEMA aligned (vector)", lambda: run(dtype, dtype, dtype)),
        ("PEMA misaligned (scalar)", lambda: run(dtype, dtype, dtype, misaligned=True)),
        ("PEMA fp32 adapters", lambda: run(torch.float32, torch.float32, torch.float32)),
    ]


def dropout_launches() -> List[Tuple[str, Callable[[], Any]]]:
    seed = torch.empty(1, dtype=torch.int64, device=META)
    return [("dropout_mask", lambda: kdrop.dropout_mask(8192, 5120, 0.05, seed))]


def record(calls: List[Tuple[str, Callable[[], Any]]]) -> List[Launch]:
    launches: List[Launch] = []
    for variant, call in calls:
        with record_launches(label=variant) as got:
            call()
        launches.extend(got)
    return launches


# ----------------------------------------------------------------------------- compiling one launch


def _signature(fn, launch: Launch, config_kwargs: Dict[str, Any]):
    """(signature, constexprs, attrs, options) of a launch by Triton's JIT specialization rules."""
    names = fn.arg_names
    constexpr_idx = {p.num for p in fn.params if p.is_constexpr}
    values: Dict[str, Any] = {}
    positional = [i for i in range(len(names))]
    for i, v in zip(positional, launch.args):
        values[names[i]] = v
    options = {}
    for key, v in {**launch.kwargs, **config_kwargs}.items():
        if key in ("num_warps", "num_stages", "num_ctas"):
            options[key] = v
        else:
            values[key] = v
    sig: Dict[str, str] = {}
    constexprs: Dict[str, Any] = {}
    attrs: Dict[Tuple[int, ...], List[List[Any]]] = {}
    for i, name in enumerate(names):
        v = values[name]
        if i in constexpr_idx:
            sig[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                constexprs[name] = 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v is None:
            sig[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"{fn.__name__}: cannot describe argument {name}={v!r}")
    return sig, constexprs, attrs, options


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STATIC_SMEM = re.compile(r"(\d+) bytes smem")
_VEC_LD = re.compile(r"ld\.global(?:\.[a-z0-9]+)*\.v[24]\.")


def compile_one(fn, launch: Launch, config_kwargs: Dict[str, Any], cap: int) -> Dict[str, Any]:
    sig, constexprs, attrs, options = _signature(fn, launch, config_kwargs)
    from triton import knobs

    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", cap, 32),
                                      options=options)
    except Exception as exc:  # noqa: BLE001  (a compile error is a result of the report)
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                "compile_s": round(time.perf_counter() - t0, 2)}
    finally:
        knobs.nvidia.dump_ptxas_log = old
    elapsed = time.perf_counter() - t0
    text = log.getvalue()
    regs = _PTXAS.search(text)
    spill = _SPILL.search(text)
    static = _STATIC_SMEM.search(text)
    ptx = compiled.asm.get("ptx", "")
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
    smem = int(compiled.metadata.shared) + (int(static.group(1)) if static else 0)
    row = {
        "ok": True, "error": None,
        "regs": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spill.group(1)) if spill else None,
        "smem_bytes": smem, "mma": mma, "vector_loads": len(_VEC_LD.findall(ptx)),
        "compile_s": round(elapsed, 2),
    }
    if row["regs"] is None:
        row.update(ok=False, error="no ptxas log (cache hit?): registers and spills unknown")
    return row


# ----------------------------------------------------------------------------- the report


def _config_name(kw: Dict[str, Any], launch_kwargs: Dict[str, Any]) -> str:
    keys = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_P", "BLOCK_Q", "BLOCK_T", "BLOCK")
            if k in kw]
    tile = "x".join(str(kw[k]) for k in keys)
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(launch_kwargs.items())
                     if isinstance(v, bool) or k in ("F_COLS",))
    return f"{tile} w{kw.get('num_warps', launch_kwargs.get('num_warps', 4))} s{kw.get('num_stages', launch_kwargs.get('num_stages', 3))}" + (f" [{flags}]" if flags else "")


def build_jobs(subset: str) -> List[Dict[str, Any]]:
    """One job per unique compilation: (kernel fn, launch, config kwargs, cap, dtype) with the variants/shapes using it."""
    shapes = _shapes()
    dtypes = DTYPES if subset == "full" else {"bf16": torch.bfloat16}
    caps = CAPS
    jobs: Dict[Tuple, Dict[str, Any]] = {}
    for dname, dtype in dtypes.items():
        calls: List[Tuple[str, str, Callable[[], Any]]] = []
        for sname, shape in shapes.items():
            if subset == "ci" and sname != "llama13b":
                continue
            for variant, call in lora_launches(shape, dtype) + weight_grad_launches(shape, dtype):
                calls.append((sname, variant, call))
        for variant, call in pema_launches(dtype) + (dropout_launches() if dname == "bf16" else []):
            calls.append(("lora tensors r=8, d=5120", variant, call))
        for sname, variant, call in calls:
            if subset == "ci" and not _in_ci(variant):
                continue
            for launch in record([(variant, call)]):
                autotuned = hasattr(launch.kernel, "configs")
                fn = launch.kernel.fn if autotuned else launch.kernel
                for cap in (_ci_caps(variant) if subset == "ci" else caps):
                    if autotuned:
                        configs = launch.kernel.configs
                        element = next(a for a in launch.args if isinstance(a, torch.Tensor)).element_size()
                        limit = klora.SMEM_LIMIT_BY_CAPABILITY[cap]
                        named = dict(zip(fn.arg_names, launch.args))
                        aligned = klora._aligned_args(named, element)
                        kept = klora.prune_concat_k_configs(configs, element, limit, cap, aligned)
                        if subset == "ci":
                            kept = kept[:1]
                            configs = configs[:configs.index(kept[0]) + 1]
                        options = [(c, c in kept) for c in configs]
                    else:
                        options = [(None, True)]
                    for config, keep in options:
                        kw = {} if config is None else {**config.kwargs, "num_warps": config.num_warps,
                                                        "num_stages": config.num_stages}
                        sig = _signature(fn, launch, kw)
                        key = (fn.__name__, repr(sig), cap)  # one compile per specialization
                        job = jobs.setdefault(key, {
                            "fn": fn, "launch": launch, "config_kwargs": kw, "cap": cap, "dtype": dname,
                            "kernel": fn.__name__, "config": _config_name({**launch.kwargs, **kw}, launch.kwargs),
                            "variants": [], "dtypes": set(), "pruned": not keep,
                            "pruned_smem": None if keep else klora.concat_k_smem_bytes(config, element),
                            "pruned_why": None if keep else _why_pruned(config, element, cap, aligned),
                        })
                        job["variants"].append(f"{sname}: {variant}")
                        job["dtypes"].add(_operand_dtype(launch, dname))
    return list(jobs.values())


def _operand_dtype(launch: Launch, default: str) -> str:
    """The dtype of the launch's first floating-point tensor operand (e.g. fp32 for float32 adapters);
    for the PEMA kernel (pointer tables) the parameters' dtype."""
    if "P_DT" in launch.kwargs:
        return str(launch.kwargs["P_DT"])
    for a in launch.args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return _TORCH_TO_TRITON[a.dtype]
    return default


def _why_pruned(config, element: int, cap: int, aligned: bool) -> str:
    smem = klora.concat_k_smem_bytes(config, element)
    if smem > klora.SMEM_LIMIT_BY_CAPABILITY[cap]:
        return f"shared memory {smem} > {klora.SMEM_LIMIT_BY_CAPABILITY[cap]}"
    if klora._acc_per_thread(config) > klora.MAX_ACC_PER_THREAD[cap // 10]:
        return (f"{klora._acc_per_thread(config)} accumulator registers per thread > "
                f"{klora.MAX_ACC_PER_THREAD[cap // 10]}")
    return (f"unaligned operands: {klora._loads_per_thread(config)} loaded elements per thread > "
            f"{klora.MAX_UNALIGNED_LOADS_PER_THREAD}")


#: The CI subset (tests/test_aot_compile.py): bf16 at the LLaMA-13B shape; variant prefix -> the
#: capabilities compiled (and for the autotuned concat-K GEMM: only its largest kept config per
#: capability, the pruned ones reported as such).
_CI_VARIANTS = {
    "concat-K forward": (80, 90), "shrink dropout": (80, 90), "expand_accumulate dropout": (80, 90),
    "dA Fisher T=1 dropout": (90,), "dA Fisher T=512 weighted dropout": (90,), "dB Fisher T=16": (90,),
    "PEMA aligned": (90,),
}


def _in_ci(variant: str) -> bool:
    return any(variant.startswith(v) for v in _CI_VARIANTS)


def _ci_caps(variant: str) -> Tuple[int, ...]:
    return next(caps for v, caps in _CI_VARIANTS.items() if variant.startswith(v))


def run(subset: str, progress: bool = True, only: Optional[str] = None) -> List[Dict[str, Any]]:
    rows = []
    jobs = [j for j in build_jobs(subset) if only is None or only in j["kernel"]]
    for i, job in enumerate(jobs):
        limit = klora.SMEM_LIMIT_BY_CAPABILITY[job["cap"]]
        row = {"kernel": job["kernel"], "config": job["config"], "cap": f"sm_{job['cap']}",
               "dtype": ",".join(sorted(job["dtypes"])),
               "shapes": sorted(set(job["variants"])), "pruned": job["pruned"], "smem_limit": limit}
        if job["pruned"]:
            row.update(ok=True, error=None, regs=None, spill_bytes=None, smem_bytes=job["pruned_smem"], mma=None,
                       vector_loads=None, compile_s=0.0, pruned_why=job["pruned_why"])
        else:
            row.update(compile_one(job["fn"], job["launch"], job["config_kwargs"], job["cap"]))
            if row["ok"] and row["spill_bytes"]:
                row.update(ok=False, error=f"{row['spill_bytes']} bytes of register spills")
            if row["ok"] and row["smem_bytes"] > limit:
                row.update(ok=False, error=f"shared memory {row['smem_bytes']} > per-block limit {limit}")
        rows.append(row)
        if progress:
            print(_line(row), flush=True)
    return rows


def _line(row: Dict[str, Any]) -> str:
    status = "PRUNED" if row["pruned"] else ("ok" if row["ok"] else "FAIL")
    if row["pruned"]:
        return f"{status:6} {row['kernel']:<30} {row['cap']} {row['dtype']} {row['config']:<44} ({row['pruned_why']})"
    return (f"{status:6} {row['kernel']:<30} {row['cap']} {row['dtype']} {row['config']:<44} regs={row['regs']} "
            f"spill={row['spill_bytes']} smem={row['smem_bytes']}/{row['smem_limit']} mma={row['mma']} "
            f"vec_ld={row['vector_loads']} {row['compile_s']}s" + (f"  {row['error']}" if row["error"] else ""))


def markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# AOT compile report ({meta['date']})", "",
             f"triton {meta['triton']}, torch {meta['torch']}, python {meta['python']}; no GPU: "
             "`triton.compile(ASTSource(...), target=GPUTarget('cuda', cap, 32))` with the wheel's ptxas.", "",
             f"{meta['rows']} rows, {meta['compiled']} compiled, {meta['pruned']} pruned, "
             f"{meta['failed']} failed; total compile time {meta['compile_s']} s.", "",
             "| kernel | config | cap | dtype | ok | regs | spill B | smem B (limit) | mma | vec ld | compile s | used by |",
             "|---|---|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        ok = f"pruned: {r['pruned_why']}" if r["pruned"] else ("yes" if r["ok"] else f"**NO**: {r['error']}")
        used = "; ".join(r["shapes"][:3]) + (f"; +{len(r['shapes']) - 3}" if len(r["shapes"]) > 3 else "")
        lines.append(f"| {r['kernel']} | {r['config']} | {r['cap']} | {r['dtype']} | {ok} | {r['regs']} | "
                     f"{r['spill_bytes']} | {r['smem_bytes']} ({r['smem_limit']}) | {r['mma']} | {r['vector_loads']} | "
                     f"{r['compile_s']} | {used} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subset", choices=("full", "ci"), default="full")
    ap.add_argument("--json", help="write the rows and versions as JSON here")
    ap.add_argument("--md", help="write a Markdown table here")
    ap.add_argument("--only", help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = run(args.subset, only=args.only)
    import platform

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "triton": triton.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "subset": args.subset,
            "rows": len(rows), "compiled": sum(not r["pruned"] for r in rows),
            "pruned": sum(r["pruned"] for r in rows), "failed": sum(not r["ok"] for r in rows),
            "compile_s": round(sum(r["compile_s"] for r in rows), 1), "wall_s": round(time.time() - t0, 1)}
    print(f"\n{meta['rows']} rows: {meta['compiled']} compiled, {meta['pruned']} pruned, {meta['failed']} failed; "
          f"{meta['wall_s']} s (triton {meta['triton']})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(markdown(rows, meta))
    return 0 if meta["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
