"""Time and peak memory of one PEMA update: the library's elementwise form vs the authors' dense form.

ALGORITHM.md §3 (elementwise, the library's ``mk.pema_update_``) and §6 (the authors' ``d x d``
inverse per tensor, ``mk.authors_pema_update_``). One layer ``d x d`` with r = 8: the tensors
updated are ``lora_A [r, d]`` and ``lora_B [d, r]`` (theta, theta*, g, F each), at
``d in {64, 256, 1024, 2048, 4096}`` by default. For each form and size the script measures,
in one run and interleaved (form A, form B, form A, ... per size):

* time per update: the median over ``--repeats`` calls (CUDA: synchronized around each call);
* peak memory per update above what was allocated before the call: on CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the peak of torch's allocator over the call, from
  the profiler's memory timeline (LAPACK's own workspace, allocated outside torch, is not
  counted on CPU);

and fits the growth exponent ``k`` of ``time ~ d^k`` and ``memory ~ d^k`` by least squares on
log-log over the sizes >= 256. Writes ``--out`` (JSON) and prints a markdown table.

    python bench/pema_forms.py --out bench/results/pema_forms_<date>_<device>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import mage_kernels as mk

R = 8


def _tensors(d: int, device: torch.device, gen: torch.Generator) -> Dict[str, List[torch.Tensor]]:
    shapes = [(R, d), (d, R)]
    make = lambda s, scale: (scale * torch.randn(s, generator=gen)).to(device)  # noqa: E731
    theta = [make(s, 0.02) for s in shapes]
    ema = [t - make(t.shape, 1e-3) for t in theta]  # theta - theta* ~ 1e-3: a task a few steps in
    return {"params": theta, "emas": ema, "grads": [make(s, 1e-3) for s in shapes],
            "fishers": [make(s, 1e-6).abs() for s in shapes]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elementwise(t) -> Callable[[], None]:
    return lambda: mk.pema_update_(t["params"], t["emas"], t["grads"], t["fishers"])


def _authors(t) -> Callable[[], None]:
    return lambda: mk.authors_pema_update_(t["params"], t["emas"], t["grads"])


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    cur = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return int(peak)


def _time(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _fit(ds: List[int], ys: List[float]) -> float:
    pts = [(math.log(d), math.log(y)) for d, y in zip(ds, ys) if d >= 256 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per form and size (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    gen = torch.Generator().manual_seed(0)
    forms = {"elementwise (mk.pema_update_)": _elementwise, "authors (mk.authors_pema_update_)": _authors}
    rows = []
    for d in sizes:
        t = _tensors(d, device, gen)
        fresh = {k: [x.clone() for x in v] for k, v in t.items()}
        calls = {name: make(t) for name, make in forms.items()}
        for fn in calls.values():  # warm-up (kernel compilation, LAPACK initialization)
            fn()
        times: Dict[str, List[float]] = {name: [] for name in calls}
        for _ in range(a.repeats):  # interleaved: one of each form per round
            for name, fn in calls.items():
                times[name].append(_time(fn, device))
        for name, make in forms.items():
            t2 = {k: [x.clone() for x in v] for k, v in fresh.items()}
            rows.append({"form": name, "d": d, "r": R, "seconds_median": statistics.median(times[name]),
                         "seconds_all": times[name], "peak_bytes": _peak_bytes(make(t2), device)})
        print(f"d={d} done", file=sys.stderr, flush=True)
    fits = {}
    for name in forms:
        mine = [r for r in rows if r["form"] == name]
        fits[name] = {"time_exponent": _fit([r["d"] for r in mine], [r["seconds_median"] for r in mine]),
                      "memory_exponent": _fit([r["d"] for r in mine], [max(r["peak_bytes"], 1) for r in mine])}
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": dev_name,
            "torch": torch.__version__, "python": platform.python_version(), "backend": mk.resolve_backend(device),
            "repeats": a.repeats, "command": "python bench/pema_forms.py " + " ".join(argv or sys.argv[1:])}
    print(f"PEMA update, one d x d layer, r = {R}; {dev_name}; torch {torch.__version__}; median of {a.repeats}\n")
    print("| form | " + " | ".join(f"d={d}" for d in sizes) + " | time ~ d^k | peak mem ~ d^k |")
    print("|---|" + "---|" * (len(sizes) + 2))
    for name in forms:
        mine = {r["d"]: r for r in rows if r["form"] == name}
        cells = [f"{mine[d]['seconds_median'] * 1e3:.3g} ms / {mine[d]['peak_bytes'] / 2**20:.3g} MiB" for d in sizes]
        f = fits[name]
        print(f"| {name} | " + " | ".join(cells) + f" | {f['time_exponent']:.2f} | {f['memory_exponent']:.2f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows, "fits": fits}, indent=1))
        print(f"\nwritten to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
