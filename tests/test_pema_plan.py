"""``PEMA.update``'s cached plan (the Triton path's host fast path, ALGORITHM.md §3).

The plan validates and builds the kernel's tables once per task; every call then
only compares addresses, reads ``F`` as the Fisher's sums divided by its count
inside the kernel, and launches. These tests check that it computes exactly what
the general path (the op with per-call validation, ``F`` from
``Fisher.for_parameters``) computes, step after step, with gradients that move
(``zero_grad(set_to_none=True)``), a parameter whose storage is replaced, a
non-contiguous gradient, and the float64 formula; and that the counters stay
exact. The kernel tables cover both ``F`` layouts (``A``: contiguous rows of
``fisher_a``; ``B``: a column block of ``fisher_b``) and both the vector (aligned)
and the scalar group.
"""

from __future__ import annotations

import pytest
import torch

import mage_kernels as mk
from mage_kernels import ema
from mage_kernels.kernels import pema as triton_pema

LAM, BETA_FB = 1e-3, 0.9


def _model(device, d_in=40, d_out=24, r=8):
    torch.manual_seed(3)
    layers = torch.nn.Sequential(
        mk.MageLinear(d_in, d_out, r=r, dropout=0.0, device=device),
        mk.MageLinear(d_out, d_in, r=r, dropout=0.0, device=device),
    )
    with torch.no_grad():
        for layer in layers:
            for b in layer.lora_B:
                b.normal_(0.0, 0.3)
    mk.for_task(layers, {"image", "text"}, "text")
    return layers


def _step(model, fisher, opt, device, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    fisher.reset()
    x = torch.randn(4, 3, 40, device=device)
    model(x).pow(2).sum(-1).mean(-1).mean().backward()
    opt.step()


def _twins(device):
    """Two identical models, each with its Fisher, optimizer and PEMA: one uses the plan, one the op."""
    out = []
    for _ in range(2):
        model = _model(device)
        fisher = mk.Fisher(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
        out.append((model, fisher, opt, mk.PEMA(model, lam=LAM, beta_fallback=BETA_FB, backend="triton")))
    return out


def _general_update(pema, fisher):
    """The general path: F from Fisher.for_parameters, the op with per-call validation."""
    with mk.use_backend("triton"):
        counts = mk.pema_update_(pema.params, pema.emas, [p.grad for p in pema.params],
                                 fisher.for_parameters(pema.params), pema.lam, pema.beta_fallback)
    pema._record(counts, sum(p.numel() for p in pema.params))
    return counts


@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads-move", "grads-stay"])
def test_plan_equals_the_general_path_step_after_step(set_to_none, device):
    (m1, f1, o1, fast), (m2, f2, o2, slow) = _twins(device)
    for step in range(4):
        torch.manual_seed(100 + step)
        _step(m1, f1, o1, device, set_to_none)
        torch.manual_seed(100 + step)
        _step(m2, f2, o2, device, set_to_none)
        c_fast = fast.update(f1)
        c_slow = _general_update(slow, f2)
        assert fast._plan is not None, "the Triton path did not use the cached plan"
        assert c_fast.tolist() == c_slow.tolist()
        for a, b in zip(fast.emas, slow.emas):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert fast.fallback_count == slow.fallback_count > 0
    assert fast.nonfinite_count == slow.nonfinite_count
    assert fast.steps == 4
    keys = {g.key[5:] for g in fast._plan.launch.groups}
    assert (0, 0) in keys and any(k[0] == 8 for k in keys), f"expected a dense and a column-block F group: {keys}"


def test_plan_matches_the_float64_formula_with_fisher_divided_in_the_kernel(device):
    model = _model(device)
    fisher = mk.Fisher(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    pema = mk.PEMA(model, lam=LAM, beta_fallback=BETA_FB, backend="triton")
    expected = [e.double().clone() for e in pema.emas]
    fallbacks = 0
    for step in range(3):
        _step(model, fisher, opt, device)
        for i, p in enumerate(pema.params):
            f = fisher.for_parameter(p).double()
            beta = (p.grad.double() + 1) / (f * (p.detach().double() - expected[i]) + LAM)
            inside = (beta > 0) & (beta < 1)
            fallbacks += int((~inside).sum())
            beta = torch.where(inside, beta, torch.full_like(beta, BETA_FB))
            expected[i] = beta * expected[i] + (1 - beta) * p.detach().double()
        pema.update(fisher)
    assert fisher.num_samples == 4
    for e, want in zip(pema.emas, expected):
        torch.testing.assert_close(e.double(), want, rtol=1e-5, atol=1e-7)
    assert pema.fallback_count == fallbacks


def test_plan_is_rebuilt_when_storage_changes_and_per_task(device):
    (m1, f1, o1, fast), (m2, f2, o2, slow) = _twins(device)
    torch.manual_seed(4)
    _step(m1, f1, o1, device)
    torch.manual_seed(4)
    _step(m2, f2, o2, device)
    fast.update(f1)
    _general_update(slow, f2)
    first = fast._plan
    # a parameter's storage is replaced (e.g. a reload): the per-call check sees the new address
    with torch.no_grad():
        fast.params[0].data = fast.params[0].data.clone()
    torch.manual_seed(5)
    _step(m1, f1, o1, device)
    torch.manual_seed(5)
    _step(m2, f2, o2, device)
    fast.update(f1)
    _general_update(slow, f2)
    assert fast._plan is not first
    for a, b in zip(fast.emas, slow.emas):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    fast.start_task()
    assert fast._plan is None


def test_non_contiguous_gradient_takes_the_general_path(device):
    (m1, f1, o1, fast), (m2, f2, o2, slow) = _twins(device)
    torch.manual_seed(9)
    _step(m1, f1, o1, device)
    torch.manual_seed(9)
    _step(m2, f2, o2, device)
    p = fast.params[-1]
    if p.dim() == 2 and p.shape[0] > 1 and p.shape[1] > 1:
        p.grad = p.grad.t().contiguous().t()  # same values, non-contiguous
        assert not p.grad.is_contiguous()
    c_fast = fast.update(f1)
    c_slow = _general_update(slow, f2)
    assert c_fast.tolist() == c_slow.tolist()
    for a, b in zip(fast.emas, slow.emas):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_missing_gradient_raises_naming_it_and_counts_nothing(device):
    (m1, f1, o1, fast), _ = _twins(device)
    _step(m1, f1, o1, device)
    fast.params[1].grad = None
    with pytest.raises(RuntimeError, match=f"no gradient for the trainable adapter {fast.names[1]}"):
        fast.update(f1)
    assert fast.steps == 0 and fast.fallback_count == 0


def test_functional_form_takes_column_blocks_of_f_and_misaligned_tensors(device):
    """``mk.pema_update_`` with F a column block of a bigger buffer (no copy) and a misaligned param view:
    a vector group and a scalar group in one call, both equal to the reference."""
    torch.manual_seed(0)
    big_f = 2 * torch.rand(64, 32, device=device)
    fishers = [big_f[:, 8:16], torch.rand(16, 8, device=device)]
    buf = torch.randn(16 * 8 + 1, device=device)
    params = [torch.randn(64, 8, device=device), buf[1:].view(16, 8)]  # the second is misaligned (4 bytes)
    emas = [p + 0.3 * torch.randn_like(p) for p in params]
    grads = [0.3 * torch.randn_like(p) for p in params]
    ref = [e.clone() for e in emas]
    ref_counts = mk.reference.pema_update_(params, ref, grads, fishers, LAM, BETA_FB)
    with mk.use_backend("triton"):
        counts = mk.pema_update_(params, emas, grads, fishers, LAM, BETA_FB)
    assert counts.tolist() == ref_counts.tolist() and 0 < counts[0] < 64 * 8 + 128
    for a, b in zip(emas, ref):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    plan = triton_pema.PemaLaunch(params, emas, grads, fishers)
    aligned = sorted(g.key[4] for g in plan.groups)
    assert aligned == [False, True], aligned


def test_cuda_graph_flag_is_off_by_default_and_ignored_on_cpu(device):
    (m1, f1, o1, fast), (m2, f2, o2, slow) = _twins(device)
    assert fast.cuda_graph is False and isinstance(fast, ema.PEMA)
    if device.type == "cpu":
        fast.cuda_graph = True  # no CUDA: eager launches, same results
    for step in range(3):
        torch.manual_seed(step)
        _step(m1, f1, o1, device)
        torch.manual_seed(step)
        _step(m2, f2, o2, device)
        assert fast.update(f1).tolist() == _general_update(slow, f2).tolist()
    for a, b in zip(fast.emas, slow.emas):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if device.type == "cuda":
        assert fast._plan.graph is None


def test_cuda_graph_replay_equals_eager(gpu_device):
    """On a GPU: capture on the second call, replay afterwards; emas and counts equal the eager twin."""
    (m1, f1, o1, fast), (m2, f2, o2, slow) = _twins(gpu_device)
    fast.cuda_graph = True
    for step in range(4):
        torch.manual_seed(step)
        _step(m1, f1, o1, gpu_device)
        torch.manual_seed(step)
        _step(m2, f2, o2, gpu_device)
        assert fast.update(f1).tolist() == _general_update(slow, f2).tolist()
    assert fast._plan.graph is not None
    for a, b in zip(fast.emas, slow.emas):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
