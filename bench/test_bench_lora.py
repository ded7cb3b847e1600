"""Forward + backward of one MAGE layer against its peers (issue 2; run ``pytest bench --benchmark-only``).

Every case times ONE training step's layer work on the same input: forward,
then backward of a fixed output gradient, producing the input gradient (a layer
inside a network always needs it) and the trainable adapters' gradients. The
task is "image+text -> text", so adapters 0, 1, 2 train and 3 is frozen (ALGORITHM.md
§1 table); all four adapters take part in the forward.

Cases (group ``lora_linear``):

* ``floor``      -- the frozen base linear alone: ``F.linear`` forward + input gradient.
* ``mage``       -- :class:`mage_kernels.MageLinear` (the path ``mk.lora_linear_path``
  picks: the cuBLAS composition on CUDA, the torch reference on CPU).
* ``mage_triton`` -- the same with backend ``"triton"`` (the Triton concat-K GEMM; CUDA only).
* ``eager_loop`` -- four LoRA adapters written as PEFT writes them:
  ``base(x) + sum_k B_k(A_k(dropout_k(x))) * s`` with ``nn.Linear`` modules.
* ``peft``       -- PEFT's own ``LoraModel`` with four adapters active at once
  (``set_adapter([...])``); skipped when ``peft`` cannot be imported.
* ``eager_loop_compiled`` -- ``torch.compile`` of ``eager_loop``.

The session prints each median and its ratio to ``floor`` (bench/conftest.py).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mage_kernels
from mage_kernels import MageLinear

GROUP = "lora_linear"
RANK, NUM_ADAPTERS, ALPHA, DROPOUT = 8, 4, 32.0, 0.05
TRAINABLE = (0, 1, 2)  # image+text -> text


class EagerFourLoRA(nn.Module):
    """Four LoRA adapters on a frozen linear, as PEFT's LoraLayer computes them (one dropout each)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, num_adapters: int) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / (num_adapters * r)
        self.lora_A = nn.ModuleList(
            [nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
             for _ in range(num_adapters)])
        self.lora_B = nn.ModuleList(
            [nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
             for _ in range(num_adapters)])
        self.dropout = nn.ModuleList([nn.Dropout(dropout) for _ in range(num_adapters)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for a, b, drop in zip(self.lora_A, self.lora_B, self.dropout):
            y = y + b(a(drop(x))) * self.scaling
        return y


def _step_fn(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_y: torch.Tensor, params,
             sync: bool) -> Callable[[], None]:
    """One forward + backward; clears the gradients so every round does the same work."""

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        y = layer(x)
        y.backward(grad_y)
        if sync:
            torch.cuda.synchronize()

    return step


@pytest.fixture(scope="module")
def setup(bench_size):
    torch.manual_seed(0)
    dev, dt = bench_size.device, bench_size.dtype
    base = nn.Linear(bench_size.d_model, bench_size.d_ffn, bias=False, device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(bench_size.tokens, bench_size.d_model, device=dev, dtype=dt, requires_grad=True)
    grad_y = torch.randn(bench_size.tokens, bench_size.d_ffn, device=dev, dtype=dt)
    return base, x, grad_y


def _run(benchmark, bench_size, bench_results, case: str, layer, x, grad_y, note: str = "") -> None:
    params = [p for p in layer.parameters() if p.requires_grad] if isinstance(layer, nn.Module) else []
    step = _step_fn(layer, x, grad_y, params, sync=bench_size.device == "cuda")
    benchmark.group = f"{GROUP} [{bench_size.name}]"
    benchmark.extra_info.update(case=case, size=bench_size.name, dtype=str(bench_size.dtype),
                                backend=mage_kernels.backend(), note=note)
    benchmark.pedantic(step, rounds=bench_size.rounds, iterations=1, warmup_rounds=bench_size.warmup_rounds)
    bench_results.headers.setdefault(
        GROUP,
        f"size {bench_size.name}: tokens={bench_size.tokens}, d={bench_size.d_model} -> {bench_size.d_ffn}, "
        f"{bench_size.dtype}, r={RANK} x {NUM_ADAPTERS} adapters, trainable {list(TRAINABLE)}, "
        f"device {torch.cuda.get_device_name() if bench_size.device == 'cuda' else 'cpu'}",
    )
    bench_results.add(GROUP, case, benchmark, note)


def test_floor_base_linear(benchmark, bench_size, bench_results, setup):
    base, x, grad_y = setup
    _run(benchmark, bench_size, bench_results, "floor", lambda t: F.linear(t, base.weight, base.bias), x, grad_y,
         "frozen base linear: forward + input gradient")


def test_mage_linear(benchmark, bench_size, bench_results, setup):
    base, x, grad_y = setup
    layer = MageLinear(base.in_features, base.out_features, r=RANK, alpha=ALPHA, dropout=DROPOUT, base=base)
    layer.set_trainable(TRAINABLE)
    layer.train()
    path = mage_kernels.lora_linear_path(x.device, x.dtype, dropout=DROPOUT > 0).path
    note = f"path {path}"
    if x.device.type == "cpu":
        note += " (CPU: the torch reference path)"
    _run(benchmark, bench_size, bench_results, "mage", layer, x, grad_y, note)


def test_mage_linear_triton_concat_k(benchmark, bench_size, bench_results, setup):
    base, x, grad_y = setup
    if x.device.type != "cuda":
        pytest.skip("the Triton concat-K GEMM runs compiled only on a GPU")
    layer = MageLinear(base.in_features, base.out_features, r=RANK, alpha=ALPHA, dropout=DROPOUT, base=base)
    layer.set_trainable(TRAINABLE)
    layer.train()

    def run(t):
        with mage_kernels.use_backend("triton"):
            return layer(t)

    params = [p for p in layer.parameters() if p.requires_grad]
    step = _step_fn(run, x, grad_y, params, sync=True)
    benchmark.group = f"{GROUP} [{bench_size.name}]"
    benchmark.pedantic(step, rounds=bench_size.rounds, iterations=1, warmup_rounds=bench_size.warmup_rounds)
    bench_results.add(GROUP, "mage_triton", benchmark, "backend triton: concat-K Triton GEMM")


def _eager(base) -> EagerFourLoRA:
    layer = EagerFourLoRA(base, RANK, ALPHA, DROPOUT, NUM_ADAPTERS)
    for k in range(NUM_ADAPTERS):
        layer.lora_A[k].requires_grad_(k in TRAINABLE)
        layer.lora_B[k].requires_grad_(k in TRAINABLE)
    return layer.train()


def test_eager_four_adapter_loop(benchmark, bench_size, bench_results, setup):
    base, x, grad_y = setup
    _run(benchmark, bench_size, bench_results, "eager_loop", _eager(base), x, grad_y,
         "sum_k B_k(A_k(dropout_k(x))) * s")


def test_peft_four_adapters(benchmark, bench_size, bench_results, setup):
    try:
        from peft import LoraConfig, get_peft_model
    except Exception as exc:  # pragma: no cover - peft is an optional bench dependency
        pytest.skip(f"peft is not importable: {exc}")
    base, x, grad_y = setup

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(base.in_features, base.out_features, bias=False, device=base.weight.device,
                                  dtype=base.weight.dtype)
            self.proj.weight.data.copy_(base.weight)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.proj(t)

    # PEFT scales each adapter by lora_alpha / r; MAGE's s = alpha / (4 r): same value per adapter.
    config = dict(r=RANK, lora_alpha=ALPHA / NUM_ADAPTERS, lora_dropout=DROPOUT, target_modules=["proj"])
    names = [f"adapter{k}" for k in range(NUM_ADAPTERS)]
    model = get_peft_model(Wrapper(), LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**config))
    model.base_model.set_adapter(names)  # all four active (and trainable) ...
    lora_layer = model.base_model.model.proj
    assert list(lora_layer.active_adapters) == names, "PEFT did not activate all four adapters"
    for k, name in enumerate(names):  # ... then freeze the one this task does not train
        lora_layer.lora_A[name].requires_grad_(k in TRAINABLE)
        lora_layer.lora_B[name].requires_grad_(k in TRAINABLE)
    model.train()
    _run(benchmark, bench_size, bench_results, "peft", model, x, grad_y, "peft LoraModel, 4 active adapters")


def test_eager_loop_compiled(benchmark, bench_size, bench_results, setup):
    base, x, grad_y = setup
    torch._dynamo.reset()
    compiled = torch.compile(_eager(base))
    _run(benchmark, bench_size, bench_results, "eager_loop_compiled", compiled, x, grad_y,
         "torch.compile(eager_loop), inductor")
