"""Fisher, PEMA and DEMA under DDP, FSDP2 and DeepSpeed ZeRO 1/2/3 equal one process (ALGORITHM.md §7).

Two gloo ranks on CPU train a tiny LLaMA with MageLinear for a few steps under each
engine, each rank on half of every global batch (:mod:`scale_harness`: one spawn for
all engines). Compared with one process on the whole global batch: F of every step
(over the global batch), PEMA's fallback counts of every step, DEMA's alphas, theta*
and g_prev (saved whole), and the adapters after ``finish_task`` (saved whole) --
within float32 tolerance, counts exactly. Also: each rank holds only its part of the
EMA state (FSDP2, ZeRO), adapter checkpoints load back into the sharded model (its
compute copy and the optimizer's fp32 master), and an update without gradients
raises naming the tensor and the engine's way to pass them.

Only gloo on CPU is tested here (no GPU, no nccl).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mage_kernels as mk
import scale_harness as h

SHARDED = ("fsdp", "zero1", "zero2", "zero3")
DEEPSPEED = ("zero1", "zero2", "zero3")


@pytest.fixture(scope="module")
def single():
    return h.single_process()


@pytest.fixture(scope="module")
def runs():
    return h.distributed()


def _ranks(runs, engine):
    ranks = runs[engine]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"{engine} rank {r} failed:\n{res['error']}"
    return ranks


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    """float32 agreement relative to the tensor's own scale (a wrong slice or a missing reduction is far off)."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m: f"{what}: {m}")


def test_the_reference_run_is_not_trivial(single):
    """The compared quantities move: PEMA's beta and DEMA's alpha are inside (0, 1) for some, clipping acts."""
    n = single["numel"]
    for fb, nonfinite in single["pema_counts"]:
        assert 0 < fb < n and nonfinite == 0
    alphas = torch.tensor(single["alphas"])
    assert ((alphas > 0) & (alphas < 1) & (alphas != 0.01)).any() and (alphas == 0.01).any()
    assert min(single["grad_norm"]) > h.CLIP  # the clipped gradient is what the updates must see
    for step in single["F"]:
        assert all(f.abs().sum() > 0 for f in step.values())


@pytest.mark.parametrize("engine", h.ENGINES)
def test_engine_matches_one_process_on_the_global_batch(runs, single, engine):
    r0, r1 = _ranks(runs, engine)
    if engine in SHARDED:
        assert r0["sharded_params"] and r1["sharded_params"]
    if engine == "zero3":  # both kinds of ZeRO-3 parameter: partitioned, and persistent (kept whole)
        assert r0["persistent"] == [False, True]
    assert r0["names"] == r1["names"] == single["names"]
    # F of every step: over the global batch, whole and identical on both ranks
    for step, want in enumerate(single["F"]):
        assert r0["F"][step].keys() == want.keys()
        for name, f in want.items():
            assert torch.equal(r0["F"][step][name], r1["F"][step][name]), (step, name)
            _close(r0["F"][step][name], f, f"F step {step} {name}")
    # PEMA's counts (summed over the ranks' parts) and DEMA's alphas (from all-reduced norms)
    assert r0["pema_counts"] == r1["pema_counts"] == single["pema_counts"]
    assert r0["pema_total"] == r1["pema_total"] == single["pema_total"]
    assert r0["fallback_fraction"] == pytest.approx(single["fallback_fraction"], abs=1e-12)
    assert r0["alphas"] == r1["alphas"]
    _close(torch.tensor(r0["alphas"], dtype=torch.float64), torch.tensor(single["alphas"], dtype=torch.float64),
           "DEMA alphas", rtol=1e-4)
    assert r0["dema_total"] == r1["dema_total"] == single["dema_total"]
    assert r0["loss"] != r1["loss"]  # the ranks did see different halves
    # theta* and g_prev, saved whole
    for key, tensors in (("pema_state", ["emas"]), ("dema_state", ["emas", "prev_grads"]), ("fixed_state", ["emas"])):
        for field in tensors:
            for name, a, b, want in zip(single["names"], r0[key][field], r1[key][field], single[key][field]):
                assert torch.equal(a, b), (key, field, name)
                _close(a, want, f"{key} {field} {name}")
        assert r0[key]["steps"] == single[key]["steps"] == h.STEPS
    # the adapters after finish_task (theta <- theta*), saved whole; frozen ones untouched
    assert r0["adapters"].keys() == single["adapters"].keys()
    for name, want in single["adapters"].items():
        assert torch.equal(r0["adapters"][name], r1["adapters"][name]), name
        _close(r0["adapters"][name], want, f"adapter {name}")


@pytest.mark.parametrize("engine", h.ENGINES)
def test_each_rank_keeps_only_its_part_of_the_ema_state(runs, single, engine):
    r0, r1 = _ranks(runs, engine)
    for key in ("pema_bytes", "dema_bytes", "fixed_bytes"):
        if engine in SHARDED:  # the parts are disjoint and cover the tensors
            assert r0[key] + r1[key] == single[key] and max(r0[key], r1[key]) < single[key]
        else:  # DDP: every rank holds the whole state
            assert r0[key] == r1[key] == single[key]
    assert single["dema_bytes"] == 2 * single["pema_bytes"] == 2 * single["fixed_bytes"]


@pytest.mark.parametrize("engine", h.ENGINES)
def test_checkpoints_are_whole_and_load_back_into_the_sharded_model(runs, engine):
    for res in _ranks(runs, engine):
        assert res["ckpt_same"]  # adapter_state_dict after a load returns exactly what was loaded
        assert res["ckpt_moved"] > 1e-2  # loading other values changed the forward pass ...
        assert res["ckpt_restored"] <= 1e-5  # ... and loading the saved ones restored it
        if engine in DEEPSPEED:
            assert res["master_diff"] == 0.0  # the optimizer's fp32 master took the values too
        assert res["ema_roundtrip"]  # theta* saved whole, loaded into every rank's part


@pytest.mark.parametrize("engine", SHARDED)
def test_sharded_checkpoints_load_into_a_single_process_model(runs, single, engine):
    r0, _ = _ranks(runs, engine)
    model = h.build_model()
    mk.load_adapter_state_dict(model, r0["adapters"])
    for name, p in mk.adapter_parameters(model, trainable_only=False):
        assert torch.equal(p.detach(), r0["adapters"][name])
    pema = mk.PEMA(model)
    pema.load_state_dict(r0["pema_state"])
    for e, want in zip(pema.emas, single["pema_state"]["emas"]):
        _close(e, want, "theta* loaded into one process")
    dema = mk.DEMA(model)
    dema.load_state_dict(r0["dema_state"])
    for g, want in zip(dema.prev_grads, single["dema_state"]["prev_grads"]):
        _close(g, want, "g_prev loaded into one process")


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_update_without_gradients_raises_naming_the_tensor(runs, engine):
    for res in _ranks(runs, engine):
        msg = res["missing_grad"]
        assert msg.startswith("RuntimeError: PEMA.update: no gradient for the trainable adapter "
                              "model.layers.0.self_attn.q_proj.lora_A.0 (p.grad is None)"), msg
        assert "before zero_grad()" in msg and "grads=" in msg
        if engine == "fsdp":
            assert "FSDP2" in msg


@pytest.mark.parametrize("engine", DEEPSPEED)
def test_deepspeed_without_its_gradients_raises_naming_the_tensor(runs, engine):
    for res in _ranks(runs, engine):
        # an update before engine.step(): DeepSpeed's gradient was not captured yet
        msg = res["missing_grad"]
        assert msg.startswith("RuntimeError: PEMA.update: no gradient for the trainable adapter "
                              "model.layers.0.self_attn.q_proj.lora_A.0 (no gradient captured from DeepSpeed's "
                              "last optimizer step)"), msg
        assert "ZeroSharding(engine)" in msg and "after engine.step()" in msg
        # a PEMA over ZeRO partitions without the engine's sharding is refused up front
        msg = res["no_sharding"]
        assert msg.startswith("ValueError: the adapter model.layers.0.self_attn.q_proj.lora_A.0 is partitioned by "
                              "DeepSpeed ZeRO; pass sharding=mage_kernels.integrations.deepspeed.ZeroSharding(engine)"), msg


def test_importing_the_library_imports_no_engine():
    code = ("import sys, mage_kernels, mage_kernels.sharding, mage_kernels.integrations.deepspeed; "
            "print(sorted(m for m in ('deepspeed', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_zero_sharding_refuses_what_is_not_a_zero_engine():
    from mage_kernels.integrations.deepspeed import ZeroSharding

    with pytest.raises(TypeError, match="needs a deepspeed.DeepSpeedEngine"):
        ZeroSharding(torch.nn.Linear(2, 2))

    class Stage0:
        def zero_optimization_stage(self):
            return 0

    with pytest.raises(ValueError, match="stage 0"):
        ZeroSharding(Stage0())
    with pytest.raises(TypeError, match="Sharding"):
        mk.PEMA(h.build_model(), sharding=object())


def test_fisher_finds_adapter_parameters_replaced_after_it_was_made():
    """fully_shard swaps every parameter object for a DTensor; a Fisher made before still finds them."""
    layer = mk.MageLinear(6, 5, r=2, dropout=0.0)
    layer.set_trainable([0, 3])
    fisher = mk.Fisher(layer)
    with torch.no_grad():
        for k in (0, 3):  # new parameter objects, as a wrapper would install
            layer.lora_A._parameters[str(k)] = torch.nn.Parameter(layer.lora_A[k].detach().clone())
            layer.lora_B._parameters[str(k)] = torch.nn.Parameter(torch.randn(5, 2))
    fisher.reset()
    layer(torch.randn(3, 4, 6)).pow(2).mean(-1).mean(-1).mean().backward()
    got = fisher.for_parameters([layer.lora_A[3], layer.lora_B[0]])
    values = fisher.values()
    assert torch.equal(got[0], values["lora_A.3"]) and torch.equal(got[1], values["lora_B.0"])
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    with pytest.raises(KeyError, match="not an adapter parameter"):
        fisher.for_parameters([torch.nn.Parameter(torch.zeros(2, 6))])


def test_a_gradient_of_the_wrong_shape_is_refused_naming_the_tensor():
    layer = mk.MageLinear(6, 5, r=2, dropout=0.0)
    layer.set_trainable([1])
    pema = mk.PEMA(layer)
    layer(torch.randn(2, 6)).sum().backward()
    bad = {n: p.grad for n, p in zip(pema.names, pema.params)}
    bad["lora_B.1"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"gradient of lora_B\.1 has shape \(2, 5\), expected \(5, 2\)"):
        pema.update({n: torch.zeros_like(p) for n, p in zip(pema.names, pema.params)}, grads=bad)
    assert pema.steps == 0


@pytest.mark.parametrize("engine", ("ddp",) + SHARDED)
def test_the_authors_dense_pema_on_gathered_tensors_equals_one_process(single, runs, engine):
    """mk.AuthorsPEMA with sharding=Gathered(): whole theta* on every rank, theta gathered, whole gradients
    passed; one update from the same inputs gives the single process's alpha counts, theta* and adapters,
    and finish_task writes theta* into every rank's part (ZeRO: the optimizer's fp32 master too)."""
    assert single["authors_stats"]["outside"] > 0  # the dense form's alpha leaves (0, 1): the update is not trivial
    for rank, res in enumerate(_ranks(runs, engine)):
        assert res["authors_stats"] == single["authors_stats"], rank
        for got, want in zip(res["authors_emas"], single["authors_emas"]):
            _close(got, want, f"{engine} rank {rank} authors theta*")
        for k, want in single["authors_after"].items():
            _close(res["authors_after"][k], want, f"{engine} rank {rank} {k} after finish_task")
        assert res["authors_bytes"] == single["authors_bytes"]  # whole theta* on every rank: not sharded
        if engine == "ddp":
            assert res["authors_default_sharding"] == "accepted"
        elif engine in ("fsdp", "zero3"):  # sharded parameters without Gathered(): refused, naming the fix
            assert "sharding=mage_kernels.sharding.Gathered()" in res["authors_default_sharding"] or \
                "ZeroSharding" in res["authors_default_sharding"], res["authors_default_sharding"]
        if engine in DEEPSPEED:
            assert res["authors_master_diff"] == 0.0
