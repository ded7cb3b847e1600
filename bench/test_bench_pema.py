"""PEMA update vs the ``_foreach`` reference vs DEMA (issue 3). Run ``pytest bench --benchmark-only``.

The workload is the adapter set of a model: on GPU the MAGE adapters of a
LLaMA-13B-like stack (40 blocks x 7 projections x 3 trainable adapters, r = 8,
A and B tensors: 1680 tensors, ~145M elements, fp32); on CPU a small stack.

Cases (group ``pema``, ``floor`` = a plain copy of the same tensors, i.e. the
memory-bandwidth floor of touching the data):

* ``floor``          -- ``torch._foreach_copy_(emas, params)`` (read 1 + write 1 per element).
* ``pema``           -- :func:`mage_kernels.pema_update_` with the backend ``auto``
  picks (the fused multi-tensor Triton kernel on CUDA, the torch reference on CPU).
* ``pema_cuda``      -- the CUDA extension's op, when built.
* ``foreach_ref``    -- :func:`mage_kernels.reference.pema_update_foreach_` (``torch._foreach_*`` ops;
  the ``torch`` backend of the op).
* ``reference_loop`` -- :func:`mage_kernels.reference.pema_update_` (per-tensor torch ops).
* ``dema``           -- :class:`mage_kernels.DEMA` ``update()`` on the same tensors.

PEMA moves 5 tensors' worth of bytes per element (read theta, theta*, g, F;
write theta*). On GPU the achieved bandwidth is printed as a fraction of the
copy bandwidth measured here (target >= 85%, per synchronized call, host time
included). These cases time the functional form (validated per call);
``bench/headline.py`` times ``PEMA.update`` with its cached plan, eager and as a
CUDA graph, and ``bench/pema_host_overhead.py`` its host time alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mage_kernels as mk
from mage_kernels import reference

GROUP = "pema"
LAM, BETA_FB = 1e-5, 0.99
_BW = {}


def _shapes(device: str):
    if device == "cuda":
        d, ffn, blocks = 5120, 13824, 40
    else:
        d, ffn, blocks = 256, 512, 2
    r, trained = 8, 3
    projections = [(d, d)] * 4 + [(d, ffn), (d, ffn), (ffn, d)]  # q k v o, gate up, down (in, out)
    out = []
    for _ in range(blocks):
        for d_in, d_out in projections:
            for _ in range(trained):
                out += [(r, d_in), (d_out, r)]
    return out


@pytest.fixture(scope="module")
def tensors(bench_size):
    torch.manual_seed(0)
    dev = bench_size.device
    shapes = _shapes(dev)
    params = [torch.randn(s, device=dev) for s in shapes]
    emas = [p + 0.01 * torch.randn_like(p) for p in params]
    grads = [1e-3 * torch.randn_like(p) for p in params]
    fishers = [1e-6 * torch.rand_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    return {"params": params, "emas": emas, "grads": grads, "fishers": fishers, "numel": numel, "device": dev}


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, bench_size, bench_results, case, fn, tensors, passes: int):
    dev = tensors["device"]
    fn()
    _sync(dev)

    def timed():
        fn()
        _sync(dev)

    benchmark.pedantic(timed, rounds=bench_size.rounds, warmup_rounds=bench_size.warmup_rounds, iterations=1)
    stats = getattr(benchmark, "stats", None)
    note = ""
    if stats is not None:
        med = float(stats.stats.median)
        gbps = passes * 4 * tensors["numel"] / med / 1e9
        _BW[case] = gbps
        note = f"{gbps:.1f} GB/s ({passes} passes)"
        if case != "floor" and "floor" in _BW:
            note += f", {gbps / _BW['floor']:.0%} of copy bandwidth"
            benchmark.extra_info["fraction_of_copy_bw"] = round(gbps / _BW["floor"], 4)
    bench_results.headers[GROUP] = (
        f"{len(tensors['params'])} fp32 adapter tensors, {tensors['numel'] / 1e6:.1f}M elements; floor = foreach copy"
    )
    bench_results.add(GROUP, case, benchmark, note=note)


def test_floor_copy(benchmark, bench_size, bench_results, tensors):
    dst = [torch.empty_like(p) for p in tensors["params"]]
    _bench(benchmark, bench_size, bench_results, "floor",
           lambda: torch._foreach_copy_(dst, tensors["params"]), tensors, passes=2)


def test_pema_auto_backend(benchmark, bench_size, bench_results, tensors):
    t = tensors
    _bench(benchmark, bench_size, bench_results, "pema",
           lambda: mk.pema_update_(t["params"], t["emas"], t["grads"], t["fishers"], LAM, BETA_FB), t, passes=5)
    if t["device"] == "cuda" and "floor" in _BW:
        frac = _BW["pema"] / _BW["floor"]
        print(f"\nPEMA Triton kernel: {_BW['pema']:.0f} GB/s = {frac:.0%} of copy bandwidth (target >= 85%)")


def test_pema_cuda_extension(benchmark, bench_size, bench_results, tensors):
    if tensors["device"] != "cuda" or not mk.backend_info()["cuda_extension"]:
        pytest.skip("the CUDA extension is not built (or no GPU)")
    if "pema_update_" not in mk.backend_info()["cuda_extension_ops"]:
        pytest.skip("the CUDA extension has no pema_update_")
    t = tensors

    def run():
        with mk.use_backend("cuda"):
            return mk.pema_update_(t["params"], t["emas"], t["grads"], t["fishers"], LAM, BETA_FB)

    _bench(benchmark, bench_size, bench_results, "pema_cuda", run, t, passes=5)


def test_foreach_reference(benchmark, bench_size, bench_results, tensors):
    t = tensors
    _bench(benchmark, bench_size, bench_results, "foreach_ref",
           lambda: reference.pema_update_foreach_(t["params"], t["emas"], t["grads"], t["fishers"], LAM, BETA_FB),
           t, passes=5)


def test_reference_loop(benchmark, bench_size, bench_results, tensors):
    t = tensors
    _bench(benchmark, bench_size, bench_results, "reference_loop",
           lambda: reference.pema_update_(t["params"], t["emas"], t["grads"], t["fishers"], LAM, BETA_FB), t,
           passes=5)


class _ShapeOnly(nn.Module):
    """A weightless stand-in base layer: DEMA only needs the adapters, not a (huge) frozen weight."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features


def test_dema(benchmark, bench_size, bench_results, tensors):
    t = tensors
    dev = t["device"]
    # DEMA needs a model; build MageLinear layers whose trainable adapters have the workload's shapes
    holder = nn.ModuleList()
    shapes = _shapes(dev)
    for i in range(0, len(shapes), 6):  # 3 adapters x (A, B) per projection
        (r, d_in), (d_out, _) = shapes[i], shapes[i + 1]
        layer = mk.MageLinear(d_in, d_out, r=r, dropout=0.0, base=_ShapeOnly(d_in, d_out), device=dev)
        layer.set_trainable([0, 1, 2])
        holder.append(layer)
    dema = mk.DEMA(holder)
    with torch.no_grad():
        for p in dema.params:
            p.add_(0.01 * torch.randn_like(p))
            p.grad = 1e-3 * torch.randn_like(p)
    _bench(benchmark, bench_size, bench_results, "dema", lambda: dema.update(), t, passes=5)
