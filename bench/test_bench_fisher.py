"""Per-sample squared-gradient (Fisher) accumulation: time and peak memory (issue 3).

Run with ``pytest bench --benchmark-only`` (not part of CI). Every case does the
work of ONE training step of one MAGE layer on the same input ``x [N, T, d_in]``
and output gradient ``dY``, for the "image+text -> text" task (adapters 0, 1, 2
train, 3 is frozen), and the Fisher cases also produce ``sum_n g_n^2`` for every
trainable adapter tensor:

* ``floor``        -- :class:`MageLinear` forward + backward, Fisher OFF (the plain training step).
* ``mage_fisher``  -- the same with :class:`mage_kernels.Fisher` attached: the
  squares are accumulated inside the backward kernel. Its ratio to ``floor`` is
  the Fisher-in-backward overhead (target <= 1.3x on GPU).
* ``vmap_grad``    -- ``torch.func.vmap(torch.func.grad(...))`` per-sample gradients, squared and summed.
* ``opacus``       -- Opacus ``GradSampleModule`` (per-sample ``grad_sample``), squared and summed.
* ``backpack``     -- BackPACK's ``SumGradSquared`` extension.

The peer cases run on an equivalent eager module (four ``nn.Linear`` adapter
pairs on a frozen base), since Opacus and BackPACK hook ``nn.Linear``.
Opacus / BackPACK cases are skipped when the package does not import
(``pip install opacus backpack-for-pytorch``). Peak memory above the inputs is
measured per case (CUDA: ``max_memory_allocated``; CPU: the allocator events of
``torch.profiler``) and printed with the medians at the end of the session.
"""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch
from torch import nn

import mage_kernels as mk

GROUP = "fisher"
RANK, NUM_ADAPTERS, ALPHA = 8, 4, 32.0
TRAINABLE = (0, 1, 2)
_PEAKS: Dict[str, int] = {}


class EagerFourLoRA(nn.Module):
    """The MAGE layer written with nn.Linear modules (what Opacus / BackPACK can hook)."""

    def __init__(self, layer: mk.MageLinear) -> None:
        super().__init__()
        w = layer.base.weight
        self.base = nn.Linear(layer.in_features, layer.out_features, bias=layer.base.bias is not None,
                              device=w.device, dtype=w.dtype)
        self.base.load_state_dict(layer.base.state_dict())
        self.base.requires_grad_(False)
        self.scaling = layer.scaling
        self.lora_A = nn.ModuleList()
        self.lora_B = nn.ModuleList()
        for k in range(layer.num_adapters):
            a = nn.Linear(layer.in_features, layer.r, bias=False, device=w.device, dtype=w.dtype)
            b = nn.Linear(layer.r, layer.out_features, bias=False, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                a.weight.copy_(layer.lora_A[k])
                b.weight.copy_(layer.lora_B[k])
            a.requires_grad_(k in TRAINABLE)
            b.requires_grad_(k in TRAINABLE)
            self.lora_A.append(a)
            self.lora_B.append(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for a, b in zip(self.lora_A, self.lora_B):
            y = y + b(a(x)) * self.scaling
        return y


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated above the level at the call, while ``fn`` runs."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


@pytest.fixture(scope="module")
def setup(bench_size):
    torch.manual_seed(0)
    dev, dt = bench_size.device, bench_size.dtype
    n = 16 if dev == "cuda" else 8
    t = bench_size.tokens // n
    layer = mk.MageLinear(bench_size.d_model, bench_size.d_ffn, r=RANK, alpha=ALPHA, dropout=0.0,
                          device=dev, dtype=dt)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0.0, 0.02)
    layer.set_trainable(TRAINABLE)
    x = torch.randn(n, t, bench_size.d_model, device=dev, dtype=dt)
    dy = torch.randn(n, t, bench_size.d_ffn, device=dev, dtype=dt)
    # the answer every case must reproduce: sum_n g_n^2 per trainable tensor, from mage's Fisher
    fisher = mk.Fisher(layer, loss_reduction="sum")
    layer(x).backward(dy)
    expected = {k: v.float() * fisher.num_samples for k, v in fisher.values().items()}
    fisher.remove()
    layer.zero_grad(set_to_none=True)
    return {"layer": layer, "eager": EagerFourLoRA(layer), "x": x, "dy": dy, "device": dev, "n": n,
            "expected": expected}


def check_sums(setup, sums: Dict[str, torch.Tensor], case: str) -> None:
    """The case computed the same sum of squared per-sample gradients (names like 'lora_A.0')."""
    rel = 2e-2 if setup["x"].dtype in (torch.float16, torch.bfloat16) else 1e-3
    for name, want in setup["expected"].items():
        got = sums[name].float()
        err = (got - want).abs().max().item()
        assert err <= rel * want.abs().max().item(), f"{case}: {name} differs from mage's Fisher ({err:.3g})"


def _run(benchmark, bench_size, bench_results, case: str, fn: Callable[[], object], device: str, note: str = ""):
    fn()  # warm-up (compilation, lazy allocations)
    _sync(device)
    peak = peak_extra_bytes(fn, device)
    _PEAKS[case] = peak

    def timed():
        fn()
        _sync(device)

    benchmark.pedantic(timed, rounds=bench_size.rounds, warmup_rounds=bench_size.warmup_rounds, iterations=1)
    benchmark.extra_info["peak_extra_MiB"] = round(peak / 2**20, 3)
    ratio = bench_results.add(GROUP, case, benchmark, note=f"peak +{peak / 2**20:.2f} MiB {note}".strip())
    bench_results.headers[GROUP] = (
        f"one MAGE layer step, x [{tuple(setup_shape(bench_size))}], trainable adapters {TRAINABLE}; "
        "ratio to floor = cost relative to the plain MageLinear forward+backward (Fisher off)"
    )
    return ratio


def setup_shape(bench_size):
    n = 16 if bench_size.device == "cuda" else 8
    return (n, bench_size.tokens // n, bench_size.d_model)


def test_floor_plain_backward(benchmark, bench_size, bench_results, setup):
    layer, x, dy = setup["layer"], setup["x"], setup["dy"]

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    _run(benchmark, bench_size, bench_results, "floor", step, setup["device"])


def test_mage_fisher_in_backward(benchmark, bench_size, bench_results, setup):
    layer, x, dy = setup["layer"], setup["x"], setup["dy"]
    fisher = mk.Fisher(layer, loss_reduction="sum")

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    try:
        ratio = _run(benchmark, bench_size, bench_results, "mage_fisher", step, setup["device"],
                     note="(target <= 1.3x on GPU)")
    finally:
        fisher.remove()
    if ratio is not None:
        print(f"\nFisher-in-backward overhead over the plain backward: {ratio:.3f}x (target <= 1.3x on GPU)")


def test_vmap_grad(benchmark, bench_size, bench_results, setup):
    from torch.func import functional_call, grad, vmap

    eager, x, dy = setup["eager"], setup["x"], setup["dy"]
    trainable = {k: v.detach() for k, v in eager.named_parameters() if v.requires_grad}

    def sample_loss(params, xn, dyn):
        return (functional_call(eager, params, (xn[None],)) * dyn[None]).sum()

    def step():
        per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(trainable, x, dy)
        return {k.replace(".weight", ""): v.float().pow(2).sum(0) for k, v in per.items()}

    check_sums(setup, step(), "vmap_grad")

    _run(benchmark, bench_size, bench_results, "vmap_grad", step, setup["device"])


def test_opacus_grad_sample_module(benchmark, bench_size, bench_results, setup):
    try:
        from opacus import GradSampleModule
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"opacus does not import: {exc}")
    eager, x, dy = setup["eager"], setup["x"], setup["dy"]
    gsm = GradSampleModule(eager, loss_reduction="sum")
    named = [(n.replace("_module.", "").replace(".weight", ""), p) for n, p in gsm.named_parameters() if p.requires_grad]

    def step():
        gsm.zero_grad(set_to_none=True)
        for _, p in named:
            p.grad_sample = None
        gsm(x).backward(dy)
        return {n: p.grad_sample.float().pow(2).sum(0) for n, p in named}

    check_sums(setup, step(), "opacus")

    try:
        _run(benchmark, bench_size, bench_results, "opacus", step, setup["device"])
    finally:
        gsm._close()


def test_backpack_sum_grad_squared(benchmark, bench_size, bench_results, setup):
    try:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"backpack does not import: {exc}")
    import copy

    eager = extend(copy.deepcopy(setup["eager"]))
    x, dy = setup["x"], setup["dy"]
    named = [(n.replace(".weight", ""), p) for n, p in eager.named_parameters() if p.requires_grad]

    def step():
        eager.zero_grad(set_to_none=True)
        with backpack(SumGradSquared()):
            (eager(x) * dy).sum().backward()
        return {n: p.sum_grad_squared for n, p in named}

    try:
        sums = step()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"BackPACK cannot run this module: {type(exc).__name__}: {exc}")
    check_sums(setup, sums, "backpack")
    _run(benchmark, bench_size, bench_results, "backpack", step, setup["device"])
