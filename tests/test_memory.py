"""Persistent memory of PEMA vs DEMA (ALGORITHM.md §3-4), measured, not computed.

Two independent measurements:

* the tensors each object holds are inspected (count, shapes, dtypes, distinct
  storages that do not alias the parameters) and
  ``persistent_state_bytes`` adds up their storages;
* the CPU allocator is watched with ``torch.profiler`` (``profile_memory=True``):
  the net bytes allocated by constructing ``PEMA(model)`` / ``DEMA(model)`` must
  equal what ``persistent_state_bytes`` reports, and an update step must leave
  (almost) nothing allocated behind (``F`` and temporaries are workspace).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import mage_kernels as mk


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 16)
        self.v_proj = nn.Linear(16, 20)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


def _model(dtype=torch.float32):
    model = mk.inject(Two().to(dtype), ["q_proj", "v_proj"], r=3, dropout=0.0)
    mk.for_task(model, ["text"], "image")  # adapters 0 and 3 train
    return model


def _trained(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


def net_allocated_bytes(fn):
    """(fn(), net CPU bytes allocated by the allocator while fn ran and still alive after it)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, sum(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pema_holds_one_copy_and_dema_two_per_trained_tensor(dtype):
    model = _model(dtype)
    trained = _trained(model)
    assert len(trained) == 8  # 2 layers x 2 adapters x (A, B)
    param_bytes = sum(p.numel() * p.element_size() for p in trained)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    pema, dema = mk.PEMA(model), mk.DEMA(model)
    held_p, held_d = mk.memory.held_tensors(pema), mk.memory.held_tensors(dema)
    assert len(held_p) == len(trained) and len(held_d) == 2 * len(trained)
    assert sorted(t.shape for t in held_p) == sorted(p.shape for p in trained)
    assert all(t.dtype == dtype for t in held_p + held_d)
    for held in (held_p, held_d):
        ptrs = [t.untyped_storage().data_ptr() for t in held]
        assert len(set(ptrs)) == len(ptrs) and not set(ptrs) & param_ptrs  # real copies, not views of the weights
    assert pema.state_bytes() == mk.persistent_state_bytes(pema) == param_bytes
    assert dema.state_bytes() == mk.persistent_state_bytes(dema) == 2 * param_bytes
    assert mk.persistent_state_bytes(pema) < mk.persistent_state_bytes(dema)


def test_allocator_agrees_and_updates_leave_no_persistent_workspace():
    model = _model()
    trained = _trained(model)
    param_bytes = sum(p.numel() * p.element_size() for p in trained)
    pema, pema_alloc = net_allocated_bytes(lambda: mk.PEMA(model))
    dema, dema_alloc = net_allocated_bytes(lambda: mk.DEMA(model))
    assert pema_alloc == pema.state_bytes() == param_bytes
    assert dema_alloc == dema.state_bytes() == 2 * param_bytes

    fisher = mk.Fisher(model)
    fisher_bytes = sum(4 * (3 * 4) * (lay.in_features + lay.out_features) for _, lay in mk.mage_layers(model))
    assert mk.persistent_state_bytes(fisher) == fisher_bytes
    assert mk.persistent_state_bytes(model) == fisher_bytes  # the model's only non-parameter state

    x = torch.randn(4, 3, 24)
    model(x).pow(2).mean().backward()
    pema.update(fisher)  # warm-up: the running counters are allocated once
    dema.update()
    _, step_pema = net_allocated_bytes(lambda: pema.update(fisher))
    _, step_dema = net_allocated_bytes(lambda: dema.update())
    # F (= sums / N) and the temporaries are freed; what stays is a few counters (< 1 KiB)
    assert 0 <= step_pema < 1024 and step_pema < param_bytes // 8
    assert 0 <= step_dema < 1024
    assert pema.state_bytes() == param_bytes and dema.state_bytes() == 2 * param_bytes


def test_storage_deduplication_modules_and_errors():
    t = torch.zeros(10, 3)
    assert mk.persistent_state_bytes([t, t[2:], t.t()]) == t.numel() * t.element_size()
    assert mk.persistent_state_bytes({"a": t, "b": [torch.zeros(5, dtype=torch.float64)]}) == 120 + 40
    bn = nn.BatchNorm1d(7)  # running_mean, running_var (float32 [7]) and num_batches_tracked (int64)
    assert mk.persistent_state_bytes(bn) == 7 * 4 * 2 + 8
    with pytest.raises(TypeError, match="does not know"):
        mk.persistent_state_bytes(object())
