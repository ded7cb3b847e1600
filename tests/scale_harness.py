"""Launcher for the training-at-scale tests (ALGORITHM.md §7): one tiny LLaMA step loop, every engine.

:func:`single_process` trains a tiny LLaMA (built from a config, MageLinear injected)
for a few AdamW steps in this process on the whole global batch, with Fisher, PEMA,
DEMA and the fixed-rate EMA (LAE's); :func:`distributed` runs the same loop on 2 gloo
ranks on CPU (each rank on its half of every global batch) under every engine -- DDP,
FSDP2 ``fully_shard``, DeepSpeed ZeRO 1, 2 and 3 -- in ONE pair of spawned processes
(one process group; torch, transformers and deepspeed are imported once), and returns
what each rank saw. Both are memoized, so the test files share one run.

The setting is chosen so that nothing compared is trivial: a loss gain of 1000 makes
PEMA's beta land inside (0, 1) for part of the elements and DEMA's alpha for part of
the tensors, and gradient clipping at 10 is active on every step (the raw norm is
above 100), so the g every engine hands to the update must be the CLIPPED one.
Dropout is off (the ranks' masks would differ from one process's).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
import traceback
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from gloo import init_gloo

WORLD = 2
ENGINES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
STEPS = 3
GLOBAL_BATCH = 8
SEQ = 10
VOCAB = 64
LR = 3e-2
CLIP = 10.0
LOSS_GAIN = 1000.0


# ----------------------------------------------------------------------------- the shared step loop


def build_model() -> torch.nn.Module:
    """The same tiny LLaMA on every rank and in the single process (seeded), adapters 0 and 3 trainable."""
    import mage_kernels as mk
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    mk.inject(model, r=2, dropout=0.0)
    mk.for_task(model, {"text"}, "image")  # trains adapters 0 and 3
    with torch.no_grad():  # B != 0, so every adapter tensor has a gradient (and an F) from the first step
        for name, p in mk.adapter_parameters(model, trainable_only=False):
            if ".lora_B." in name:
                p.normal_(0.0, 0.05)
    return model


def global_batches() -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS + 1)]


def my_half(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = ids.shape[0] // world
    return ids[rank * n:(rank + 1) * n]


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's mean next-token loss (what Fisher(loss_reduction="mean") expects)."""
    tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return tok.mean(1).mean() * LOSS_GAIN


def _run(forward: Callable, backward_and_step: Callable, fisher, pema, dema, fixed, batches, rank: int,
         world: int) -> Dict[str, object]:
    """The step loop every engine runs; ``backward_and_step(loss)`` is the engine's own."""
    out: Dict[str, object] = {"F": [], "pema_counts": [], "alphas": [], "loss": []}
    for ids in batches[:STEPS]:
        mine = my_half(ids, rank, world)
        fisher.reset()
        loss = loss_of(forward(mine), mine)
        backward_and_step(loss)
        fisher.sync()  # F over the global batch
        out["F"].append({k: v.clone() for k, v in fisher.values().items()})
        out["pema_counts"].append(pema.update(fisher).tolist())
        out["alphas"].append(dema.update().tolist())
        fixed.update()
        out["loss"].append(float(loss.detach()))
    out["pema_total"] = pema.counts.tolist()
    out["dema_total"] = dema.counts.tolist()
    out["fallback_fraction"] = pema.last_fallback_fraction
    out["pema_state"] = pema.state_dict()  # whole tensors, gathered here
    out["dema_state"] = dema.state_dict()
    out["fixed_state"] = fixed.state_dict()
    out["pema_bytes"] = pema.state_bytes()
    out["dema_bytes"] = dema.state_bytes()
    out["fixed_bytes"] = fixed.state_bytes()
    out["numel"] = pema.numel
    out["names"] = list(pema.names)
    pema.finish_task()
    return out


def _checkpoint_roundtrip(model, forward: Callable, ids: torch.Tensor, out: Dict[str, object], master=None) -> None:
    """Adapters saved whole; a load of other values changes the forward, loading them back restores it."""
    import mage_kernels as mk

    state = mk.adapter_state_dict(model)
    with torch.no_grad():
        before = forward(ids).clone()
    mk.load_adapter_state_dict(model, {k: v + 0.5 for k, v in state.items()})
    with torch.no_grad():
        moved = forward(ids).clone()
    mk.load_adapter_state_dict(model, state)
    with torch.no_grad():
        after = forward(ids).clone()
    again = mk.adapter_state_dict(model)
    out["adapters"] = state
    out["ckpt_moved"] = float((moved - before).abs().max())
    out["ckpt_restored"] = float((after - before).abs().max())
    out["ckpt_same"] = all(torch.equal(again[k], state[k]) for k in state)
    if master is not None:  # the optimizer's fp32 copy took the loaded values too
        out["master_diff"] = max(float((master(p) - state[n].float()).abs().max())
                                 for n, p in mk.adapter_parameters(model))


def _authors_step(model, out: Dict[str, object]) -> None:
    """The authors' dense PEMA on whole tensors (``Gathered``): one update from values set identically on
    every engine (theta* snapshot, a moved theta, whole gradients), then ``finish_task``. The dense form
    amplifies rounding differences about 1e5-fold per step, so it is compared on one step from the
    same inputs rather than after the engines' own training."""
    import mage_kernels as mk
    from mage_kernels.sharding import full_shape, load_full_

    named = list(mk.adapter_parameters(model, trainable_only=True))
    g = torch.Generator().manual_seed(7)  # the same draws on every rank and in the single process
    start = {n: 0.05 * torch.randn(full_shape(p), generator=g) for n, p in named}
    moved = {n: v + 1e-3 * torch.randn(v.shape, generator=g) for n, v in start.items()}
    grads = {n: 1e-3 * torch.randn(v.shape, generator=g) for n, v in start.items()}
    for n, p in named:
        load_full_(p, start[n].to(p.dtype))
    try:
        mk.AuthorsPEMA(model)
        out["authors_default_sharding"] = "accepted"
    except Exception as exc:  # noqa: BLE001 -- the message is what is checked
        out["authors_default_sharding"] = f"{type(exc).__name__}: {exc}"
    authors = mk.AuthorsPEMA(model, sharding=mk.sharding.Gathered())  # theta* <- start
    for n, p in named:
        load_full_(p, moved[n].to(p.dtype))
    out["authors_stats"] = authors.update(grads=grads).as_dict()
    out["authors_emas"] = [e.clone() for e in authors.emas]
    out["authors_bytes"] = authors.state_bytes()
    authors.finish_task()
    out["authors_after"] = mk.adapter_state_dict(model)


def _ema_roundtrip(pema, out: Dict[str, object]) -> None:
    """pema.load_state_dict of whole tensors puts every rank's part back (checked through a fresh gather)."""
    sd = out["pema_state"]
    pema.load_state_dict({**sd, "emas": [e + 1.0 for e in sd["emas"]]})
    pema.load_state_dict(sd)
    back = pema.state_dict()
    out["ema_roundtrip"] = all(torch.equal(a, b) for a, b in zip(back["emas"], sd["emas"]))


@functools.lru_cache(maxsize=None)
def single_process() -> Dict[str, object]:
    """The reference: one process, the whole global batch, plain torch."""
    import mage_kernels as mk

    torch.manual_seed(0)
    model = build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    fisher = mk.Fisher(model, loss_reduction="mean")
    pema, dema, fixed = mk.PEMA(model), mk.DEMA(model), mk.FixedEMA(model)
    norms = []

    def step(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        opt.step()

    batches = global_batches()
    forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    out = _run(forward, step, fisher, pema, dema, fixed, batches, 0, 1)
    out["grad_norm"] = norms
    _checkpoint_roundtrip(model, forward, batches[STEPS], out)
    _authors_step(model, out)
    return out


# ----------------------------------------------------------------------------- the engines (in the workers)


def _ddp(rank: int, world: int) -> Dict[str, object]:
    import mage_kernels as mk
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model()
    ddp = DDP(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    fisher = mk.Fisher(model, loss_reduction="mean")
    pema, dema, fixed = mk.PEMA(model), mk.DEMA(model), mk.FixedEMA(model)

    def step(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()

    batches = global_batches()
    forward = lambda ids: ddp(input_ids=ids).logits  # noqa: E731
    out = _run(forward, step, fisher, pema, dema, fixed, batches, rank, world)
    opt.zero_grad(set_to_none=True)
    out["missing_grad"] = _error_of(lambda: pema.update(fisher))  # gradients already cleared
    pema.start_task()
    _checkpoint_roundtrip(model, forward, batches[STEPS], out)
    _ema_roundtrip(pema, out)
    _authors_step(model, out)
    return out


def _fsdp(rank: int, world: int) -> Dict[str, object]:
    import mage_kernels as mk
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    fisher = mk.Fisher(model, loss_reduction="mean")  # made BEFORE fully_shard replaces the parameters
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    pema, dema, fixed = mk.PEMA(model), mk.DEMA(model), mk.FixedEMA(model)

    def step(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()

    batches = global_batches()
    forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    out = _run(forward, step, fisher, pema, dema, fixed, batches, rank, world)
    out["sharded_params"] = all(type(p).__name__ == "DTensor" for p in params)
    opt.zero_grad(set_to_none=True)
    out["missing_grad"] = _error_of(lambda: pema.update(fisher))
    pema.start_task()
    _checkpoint_roundtrip(model, forward, batches[STEPS], out)
    _ema_roundtrip(pema, out)
    _authors_step(model, out)
    return out


def _zero(stage: int, rank: int, world: int) -> Dict[str, object]:
    import deepspeed
    import mage_kernels as mk
    from deepspeed.utils import safe_get_full_fp32_param
    from mage_kernels.integrations.deepspeed import ZeroSharding

    model = build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    config = {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1, "gradient_clipping": CLIP, "steps_per_print": 10 ** 9,
        # ZeRO-3 keeps tensors below the threshold whole on every rank ("persistent"; default 1e5
        # elements): at 100 the 64-element adapters persist and the 128-element ones are partitioned,
        # so both kinds are covered
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    fisher = mk.Fisher(engine.module, loss_reduction="mean")
    out_err = {"no_sharding": _error_of(lambda: mk.PEMA(engine.module))}
    sharding = ZeroSharding(engine)
    pema = mk.PEMA(engine.module, sharding=sharding)
    dema = mk.DEMA(engine.module, sharding=sharding)
    fixed = mk.FixedEMA(engine.module, sharding=sharding)
    first = [True]

    def step(loss):
        engine.backward(loss)
        if first[0]:  # before engine.step() nothing was captured yet
            out_err["missing_grad"] = _error_of(lambda: pema.update(fisher))
            first[0] = False
        engine.step()

    batches = global_batches()
    forward = lambda ids: engine(input_ids=ids).logits  # noqa: E731
    out = _run(forward, step, fisher, pema, dema, fixed, batches, rank, world)
    out.update(out_err)
    out["sharded_params"] = (all(hasattr(p, "ds_id") for p in params) if stage == 3
                             else all(hasattr(p, "_hp_mapping") for p in params))
    if stage == 3:
        out["persistent"] = sorted({bool(p.ds_persist) for p in params})
    pema.start_task()
    _checkpoint_roundtrip(engine.module, forward, batches[STEPS], out, master=safe_get_full_fp32_param)
    _ema_roundtrip(pema, out)
    _authors_step(engine.module, out)
    out["authors_master_diff"] = max(float((safe_get_full_fp32_param(p) - out["authors_after"][n].float()).abs().max())
                                     for n, p in mk.adapter_parameters(engine.module))
    sharding.remove()
    return out


def _error_of(fn: Callable) -> str:
    try:
        fn()
    except Exception as exc:  # the test asserts the type and message
        return f"{type(exc).__name__}: {exc}"
    return ""


def _worker(rank: int, world: int, init_file: str, out_dir: str, engines) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    init_gloo(init_file, rank, world)
    try:
        for name in engines:
            t0 = time.perf_counter()
            try:
                if name == "ddp":
                    res = _ddp(rank, world)
                elif name == "fsdp":
                    res = _fsdp(rank, world)
                else:
                    _init_deepspeed()
                    res = _zero(int(name[-1]), rank, world)
            except Exception:
                res = {"error": traceback.format_exc()}
            res["seconds"] = time.perf_counter() - t0
            torch.save(res, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
            if "error" in res:
                break  # the other rank may be stuck in a collective; mp.spawn's join ends it
            dist.barrier()
    finally:
        dist.destroy_process_group()


def skip_shm_build() -> None:
    """Stop DeepSpeed's CPU accelerator from JIT-compiling its shared-memory all-reduce op.

    It compiles the op the first time its communication backend starts (about a minute of
    C++ on 2 cores); gloo does the same job for these tiny tensors, so the tests do without it.
    (``deepspeed.comm`` re-exports the torch module under the name ``torch``: import the
    submodule by its path.)
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


#: Body of a launcher script for ``torchrun``: :func:`skip_shm_build`, then ``python -m mage_cl.cli``
#: (``module``) or the script named by its first argument (``script``). See :func:`write_launcher`.
_LAUNCHER = """import runpy, sys
sys.path.insert(0, {here!r})
import scale_harness
scale_harness.skip_shm_build()
{run}
"""


def write_launcher(path, target: str = "module") -> str:
    """Write a launcher (see :data:`_LAUNCHER`) to ``path``; returns ``path`` as a string.

    ``target="module"`` runs the driver's CLI with the launcher's arguments; ``"script"`` runs
    the python file given as the first argument with the rest.
    """
    run = {"module": 'runpy.run_module("mage_cl.cli", run_name="__main__", alter_sys=True)',
           "script": 'sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name="__main__")'}[target]
    here = os.path.dirname(os.path.abspath(__file__))
    with open(path, "w", encoding="utf-8") as f:
        f.write(_LAUNCHER.format(here=here, run=run))
    return str(path)


def _init_deepspeed() -> None:
    import logging

    import deepspeed

    skip_shm_build()
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")


@functools.lru_cache(maxsize=None)
def distributed(engines=ENGINES) -> Dict[str, List[Dict[str, object]]]:
    """``{engine: [rank 0 results, rank 1 results]}`` from one 2-process gloo run of every engine."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(WORLD, os.path.join(tmp, "init"), tmp, engines), nprocs=WORLD,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=600):
                pass
        except Exception:
            pass  # a failed worker: its saved traceback (or the missing file) is reported per engine below
        out: Dict[str, List[Dict[str, object]]] = {}
        for name in engines:
            ranks = []
            for r in range(WORLD):
                path = os.path.join(tmp, f"{name}_rank{r}.pt")
                ranks.append(torch.load(path, weights_only=False) if os.path.exists(path)
                             else {"error": f"rank {r} saved no result for {name} (it died or an earlier engine failed)"})
            out[name] = ranks
    return out
