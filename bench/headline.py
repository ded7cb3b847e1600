"""The headline benchmarks in ONE process, interleaved, with ratios from the same run.

    python bench/headline.py --out DIR            # GPU: LLaMA-13B shapes, bf16 (what gpu_check.sh runs)
    python bench/headline.py --size cpu --out DIR # a CPU dry run: small shapes, fp32 (host paths only)

Groups (each case's median over ``--reps`` interleaved rounds: round k times every
case of the group once before round k+1 starts, so drifts in clock or temperature
hit all cases alike; each timing is a synchronized wall time of ``--inner`` calls):

``lora``  one MAGE layer step (forward + backward of a fixed output gradient, input
    gradient and the trainable adapters' gradients; task image+text -> text, adapters
    0, 1, 2 train), LLaMA-13B MLP up-projection (8192 tokens, 5120 -> 13824, r = 8 x 4):
    ``floor`` = the frozen base linear alone (cuBLAS forward + input-gradient GEMMs),
    ``mage`` (the default path: cuBLAS composition) and ``mage_triton`` (explicit
    backend "triton": the Triton concat-K GEMM), each without dropout and with 0.05,
    ``eager_loop`` (four adapters as PEFT writes them), ``peft`` (PEFT's LoraModel, four
    active adapters; skipped without peft), ``eager_loop_compiled`` (torch.compile).
``gemm``  the base GEMM alone, ``x @ W0^T``: ``floor`` = cuBLAS ``torch.mm``, ``triton`` =
    the concat-K kernel without its adapter chunk (isolates GEMM quality).
``pema``  one update of the LLaMA-13B adapter set (1,680 fp32 tensors), synchronized per
    call, host time included: ``floor`` = ``torch._foreach_copy_`` of the same bytes
    (read 1 + write 1 per element), ``pema_eager`` (``PEMA.update``, the cached plan),
    ``pema_graph`` (``cuda_graph = True``). Achieved bandwidth = 5 x 4 bytes per element.
``fisher``  MageLinear step with :class:`mage_kernels.Fisher` attached vs without
    (``floor``), for T = 512 tokens per sample and for T = 1.

Writes ``headline.json`` and ``headline.md`` to ``--out``. No GPU number is produced
without a GPU: on CPU the ratios show host overheads only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mage_kernels as mk  # noqa: E402

RANK, NUM_ADAPTERS, ALPHA = 8, 4, 32.0
TRAINABLE = (0, 1, 2)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


class Case:
    def __init__(self, name: str, fn: Callable[[], None], note: str = "", bytes_moved: Optional[float] = None):
        self.name, self.fn, self.note, self.bytes_moved = name, fn, note, bytes_moved
        self.times: List[float] = []


def interleave(cases: List[Case], dev: str, reps: int, inner: int, warmup: int = 2) -> None:
    for case in cases:  # warm-up: compiles, autotunes, allocator
        for _ in range(warmup):
            case.fn()
        sync(dev)
    for _ in range(reps):
        for case in cases:
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(inner):
                case.fn()
            sync(dev)
            case.times.append((time.perf_counter() - t0) / inner)


def summarize(group: str, cases: List[Case], header: str) -> Dict[str, object]:
    floor = next((c for c in cases if c.name == "floor"), None)
    fmed = statistics.median(floor.times) if floor and floor.times else None
    rows = []
    for c in cases:
        if not c.times:
            rows.append({"case": c.name, "median_ms": None, "ratio_to_floor": None, "note": c.note})
            continue
        med = statistics.median(c.times)
        row = {"case": c.name, "median_ms": round(med * 1e3, 4), "min_ms": round(min(c.times) * 1e3, 4),
               "ratio_to_floor": round(med / fmed, 4) if fmed else None, "note": c.note}
        if c.bytes_moved:
            row["GB_per_s"] = round(c.bytes_moved / med / 1e9, 1)
        rows.append(row)
    if any("GB_per_s" in r for r in rows) and floor is not None:
        fbw = next(r["GB_per_s"] for r in rows if r["case"] == "floor")
        for r in rows:
            if "GB_per_s" in r:
                r["fraction_of_copy_bandwidth"] = round(r["GB_per_s"] / fbw, 4)
    return {"group": group, "header": header, "rows": rows}


# ----------------------------------------------------------------------------- lora


class EagerFourLoRA(nn.Module):
    """Four LoRA adapters on a frozen linear, as PEFT's LoraLayer computes them (one dropout each)."""

    def __init__(self, base: nn.Linear, dropout: float) -> None:
        super().__init__()
        self.base, self.scaling = base, ALPHA / (NUM_ADAPTERS * RANK)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ModuleList([nn.Linear(base.in_features, RANK, **kw) for _ in range(NUM_ADAPTERS)])
        self.lora_B = nn.ModuleList([nn.Linear(RANK, base.out_features, **kw) for _ in range(NUM_ADAPTERS)])
        self.drop = nn.ModuleList([nn.Dropout(dropout) for _ in range(NUM_ADAPTERS)])
        for k in range(NUM_ADAPTERS):
            self.lora_A[k].requires_grad_(k in TRAINABLE)
            self.lora_B[k].requires_grad_(k in TRAINABLE)

    def forward(self, x):
        y = self.base(x)
        for a, b, d in zip(self.lora_A, self.lora_B, self.drop):
            y = y + b(a(d(x))) * self.scaling
        return y


def _step(layer, x, gy, params):
    def fn():
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(gy)
    return fn


def lora_cases(size: Dict, dev: str, dt) -> List[Case]:
    torch.manual_seed(0)
    base = nn.Linear(size["d"], size["ffn"], bias=False, device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(size["tokens"], size["d"], device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(size["tokens"], size["ffn"], device=dev, dtype=dt)
    cases = [Case("floor", _step(lambda t: F.linear(t, base.weight), x, gy, []),
                  "frozen base linear: cuBLAS forward + input-gradient GEMMs")]
    for p in (0.0, 0.05):
        layer = mk.MageLinear(size["d"], size["ffn"], r=RANK, alpha=ALPHA, dropout=p, base=base).train()
        layer.set_trainable(TRAINABLE)
        params = [q for q in layer.parameters() if q.requires_grad]
        path = mk.lora_linear_path(x.device, dt, dropout=p > 0).path
        cases.append(Case(f"mage p={p}", _step(layer, x, gy, params), f"path {path}"))
        if dev == "cuda":
            def triton_step(fn=_step(layer, x, gy, params)):
                with mk.use_backend("triton"):
                    fn()
            cases.append(Case(f"mage_triton p={p}", triton_step, "backend triton: concat-K Triton GEMM"))
    eager = EagerFourLoRA(base, 0.05).train()
    eparams = [q for q in eager.parameters() if q.requires_grad]
    cases.append(Case("eager_loop p=0.05", _step(eager, x, gy, eparams), "sum_k B_k(A_k(dropout_k(x))) * s"))
    try:
        from peft import LoraConfig, get_peft_model

        class Wrapper(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(base.in_features, base.out_features, bias=False, device=dev, dtype=dt)
                self.proj.weight.data.copy_(base.weight)

            def forward(self, t):
                return self.proj(t)

        config = dict(r=RANK, lora_alpha=ALPHA / NUM_ADAPTERS, lora_dropout=0.05, target_modules=["proj"])
        names = [f"adapter{k}" for k in range(NUM_ADAPTERS)]
        model = get_peft_model(Wrapper(), LoraConfig(**config), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, LoraConfig(**config))
        model.base_model.set_adapter(names)
        lora_layer = model.base_model.model.proj
        for k, name in enumerate(names):
            lora_layer.lora_A[name].requires_grad_(k in TRAINABLE)
            lora_layer.lora_B[name].requires_grad_(k in TRAINABLE)
        model.train()
        cases.append(Case("peft p=0.05", _step(model, x, gy, [q for q in model.parameters() if q.requires_grad]),
                          "peft LoraModel, 4 active adapters"))
    except Exception as exc:  # noqa: BLE001  (an optional peer: reported, not fatal)
        cases.append(Case("peft p=0.05", lambda: None, f"skipped: {type(exc).__name__}: {exc}"[:120]))
        cases[-1].fn = None
    torch._dynamo.reset()
    compiled = torch.compile(EagerFourLoRA(base, 0.05).train())
    cases.append(Case("eager_loop_compiled p=0.05", _step(compiled, x, gy, [q for q in compiled.parameters()
                                                                           if q.requires_grad]),
                      "torch.compile(eager_loop), inductor"))
    return [c for c in cases if c.fn is not None], [c for c in cases if c.fn is None]


def gemm_cases(size: Dict, dev: str, dt) -> List[Case]:
    x = torch.randn(size["tokens"], size["d"], device=dev, dtype=dt)
    w = torch.randn(size["ffn"], size["d"], device=dev, dtype=dt)
    cases = [Case("floor", lambda: torch.mm(x, w.t()), "cuBLAS torch.mm")]
    if dev == "cuda":
        from mage_kernels.kernels import lora as tk

        cases.append(Case("triton", lambda: tk.matmul_concat_k(x, w.t()), "Triton concat-K kernel, no adapter chunk"))
    return cases


# ----------------------------------------------------------------------------- pema


def pema_cases(size: Dict, dev: str) -> List[Case]:
    class _Shape(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.in_features, self.out_features = i, o

    d, ffn = size["pema_d"], size["pema_ffn"]
    projections = [(d, d)] * 4 + [(d, ffn), (d, ffn), (ffn, d)]
    out: List[Case] = []
    numel = 0
    models = []
    for mode in ("eager", "graph"):
        model = nn.ModuleList()
        for _ in range(size["blocks"]):
            for i, o in projections:
                layer = mk.MageLinear(i, o, r=RANK, dropout=0.0, base=_Shape(i, o), device=dev)
                layer.set_trainable(list(TRAINABLE))
                model.append(layer)
        fisher = mk.Fisher(model)
        with torch.no_grad():
            for layer in model:
                layer.fisher_a.uniform_(0, 1e-6)
                layer.fisher_b.uniform_(0, 1e-6)
        for layer in model:  # as after a backward of 16 samples
            layer.fisher_count.fill_(16)
        pema = mk.PEMA(model)
        pema.cuda_graph = mode == "graph"
        with torch.no_grad():
            for p in pema.params:
                p.add_(0.01 * torch.randn_like(p))
                p.grad = 1e-3 * torch.randn_like(p)
        numel = sum(p.numel() for p in pema.params)
        models.append((pema, fisher))
    src = [p.detach() for p in models[0][0].params]
    dst = [torch.empty_like(p) for p in src]
    out.append(Case("floor", lambda: torch._foreach_copy_(dst, src), "torch._foreach_copy_ (2 passes)",
                    bytes_moved=2 * 4 * numel))
    for (pema, fisher), mode in zip(models, ("eager", "graph")):
        if mode == "graph" and dev != "cuda":
            continue
        out.append(Case(f"pema_{mode}", lambda pm=pema, fs=fisher: pm.update(fs),
                        f"PEMA.update, {'CUDA graph replay' if mode == 'graph' else 'eager launches'}, "
                        "host time included", bytes_moved=5 * 4 * numel))
    return out, numel, len(models[0][0].params)


# ----------------------------------------------------------------------------- fisher


def fisher_cases(size: Dict, dev: str, dt, t: int) -> List[Case]:
    torch.manual_seed(0)
    n = size["tokens"] // t
    layer = mk.MageLinear(size["d"], size["ffn"], r=RANK, alpha=ALPHA, dropout=0.0, device=dev, dtype=dt)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0.0, 0.02)
    layer.set_trainable(TRAINABLE)
    shape = (n, t, size["d"]) if t > 1 else (n, size["d"])
    x = torch.randn(*shape, device=dev, dtype=dt)
    dy = torch.randn(*shape[:-1], size["ffn"], device=dev, dtype=dt)
    with_fisher = mk.MageLinear(size["d"], size["ffn"], r=RANK, alpha=ALPHA, dropout=0.0, device=dev, dtype=dt)
    with_fisher.load_state_dict(layer.state_dict())
    with_fisher.set_trainable(TRAINABLE)
    fisher = mk.Fisher(with_fisher, loss_reduction="sum")

    def step(lay, reset):
        def fn():
            lay.zero_grad(set_to_none=True)
            if reset:
                fisher.reset()
            lay(x).backward(dy)
        return fn

    return [Case("floor", step(layer, False), "MageLinear step, Fisher off"),
            Case("mage_fisher", step(with_fisher, True), f"Fisher in the backward, T={t}, N={n}")]


# ----------------------------------------------------------------------------- main


SIZES = {
    "gpu": dict(tokens=8192, d=5120, ffn=13824, blocks=40, pema_d=5120, pema_ffn=13824, dtype="bfloat16"),
    "cpu": dict(tokens=256, d=128, ffn=256, blocks=2, pema_d=128, pema_ffn=256, dtype="float32"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--groups", default="lora,gemm,pema,fisher")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    dev = "cuda" if args.size == "gpu" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        print("headline: error: --size gpu needs a CUDA device", file=sys.stderr)
        return 2
    dt = getattr(torch, size["dtype"])
    reps = args.reps or (15 if dev == "cuda" else 5)
    inner = args.inner or (5 if dev == "cuda" else 1)
    os.makedirs(args.out, exist_ok=True)
    env = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "size": args.size,
           "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
           "reps": reps, "inner": inner}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    groups = []
    t_all = time.time()
    for group in args.groups.split(","):
        t0 = time.time()
        if group == "lora":
            cases, skipped = lora_cases(size, dev, dt)
            header = (f"tokens={size['tokens']}, d={size['d']} -> {size['ffn']}, {dt}, r={RANK} x {NUM_ADAPTERS}, "
                      f"trainable {list(TRAINABLE)}")
        elif group == "gemm":
            cases, skipped = gemm_cases(size, dev, dt), []
            header = f"x [{size['tokens']}, {size['d']}] @ W0^T [{size['d']}, {size['ffn']}], {dt}"
        elif group == "pema":
            cases, numel, count = pema_cases(size, dev)
            skipped = []
            header = f"{count} fp32 adapter tensors, {numel / 1e6:.1f}M elements, synchronized per call"
        elif group.startswith("fisher"):
            for t in (512, 1) if dev == "cuda" else (32, 1):
                c = fisher_cases(size, dev, dt, t)
                interleave(c, dev, reps, inner)
                groups.append(summarize(f"fisher T={t}", c, f"one MageLinear step, {dt}, d={size['d']} -> {size['ffn']}"))
                print(json.dumps(groups[-1], indent=1), flush=True)
            continue
        else:
            print(f"headline: error: unknown group {group!r}", file=sys.stderr)
            return 2
        interleave(cases, dev, reps, inner)
        summary = summarize(group, cases + skipped, header)
        summary["seconds"] = round(time.time() - t0, 1)
        groups.append(summary)
        print(json.dumps(summary, indent=1), flush=True)
    result = {"environment": env, "groups": groups, "total_seconds": round(time.time() - t_all, 1)}
    with open(os.path.join(args.out, "headline.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    lines = [f"# Headline benchmarks ({env['date_utc']} UTC, {env['device']})", "",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, size {args.size}; "
             f"median of {reps} interleaved rounds x {inner} calls.", ""]
    for g in groups:
        lines += [f"## {g['group']}", "", g["header"], "", "| case | median ms | ratio to floor | GB/s | note |",
                  "|---|---:|---:|---:|---|"]
        for r in g["rows"]:
            bw = f"{r['GB_per_s']} ({r['fraction_of_copy_bandwidth']:.0%})" if "GB_per_s" in r else ""
            lines.append(f"| {r['case']} | {r['median_ms']} | {r['ratio_to_floor']} | {bw} | {r['note']} |")
        lines.append("")
    with open(os.path.join(args.out, "headline.md"), "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
