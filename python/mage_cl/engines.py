"""How one task's training steps run under each data-parallel engine: DDP, FSDP2, DeepSpeed ZeRO.

``mage-cl run --distributed ENGINE`` under ``torchrun`` picks one of :data:`ENGINES`; a single
process, or ``torchrun`` without the option, uses ``ddp`` (plain steps on one process). The
trainer (:func:`mage_cl.trainer.train_task`) asks the engine for a :class:`TaskSteps` at the
start of every task -- the trainable adapters change from task to task, so each engine is
(re)built for the task's trainable set -- and calls, per optimizer step::

    for each micro-batch:  with steps.accumulate(last): steps.backward(loss(steps.module(batch)))
    steps.clip(); method.before_step(); steps.step()   # clip to cfg.grad_clip, optimizer, scheduler

The engines, and what each does with the library (ALGORITHM.md section 7):

* ``ddp``  -- ``torch.nn.parallel.DistributedDataParallel`` over the trainable adapters, AdamW,
  ``clip_grad_norm_``; every rank holds whole tensors (on one process: no wrapper at all).
* ``fsdp`` -- torch FSDP2: :meth:`Engine.prepare` calls ``fully_shard`` on every decoder layer
  and on the root right after the adapters (and MoELoRA's routers) are made, before PEMA, DEMA
  or LAE's FixedEMA are built, so they see DTensor shards and stay shard-local; AdamW over the
  DTensor shards; the same clipping.
* ``deepspeed`` -- ``deepspeed.initialize`` with a ZeRO config (stage 1, 2 or 3; the driver
  sets the batch sizes, clipping, AdamW and the warm-up schedule from the preset), a new engine
  for every task; PEMA, DEMA and FixedEMA read this rank's partitions through
  :class:`mage_kernels.integrations.deepspeed.ZeroSharding`.

Under ``fsdp`` and ZeRO-3 every forward is a collective, so evaluation runs in lock-step
(:attr:`Engine.lockstep`). Every method runs under every engine. Those whose updates need whole
tensors gather them: PGP projects each whole ``lora_A`` gradient, RegLoRA (under FSDP2 and ZeRO-3)
and EWC (under ZeRO-3) add their penalty's gradient computed on the gathered parameters, and the
authors' dense PEMA gathers theta and g every step (:meth:`TaskSteps.full_grad`,
:meth:`TaskSteps.set_full_grad`, :meth:`TaskSteps.step_grads`). Every rank calls these in the same
order: they are collectives where the engine shards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import mage_kernels as mk
from mage_kernels.sharding import DTensorShard, is_dtensor

from . import distributed

__all__ = ["ENGINES", "Engine", "TaskSteps", "make_engine", "read_deepspeed_config"]

#: name -> one line for ``--help``.
ENGINES: Dict[str, str] = {
    "ddp": "DistributedDataParallel: whole tensors on every rank (also a single process)",
    "fsdp": "torch FSDP2 fully_shard per decoder layer: adapters, gradients, optimizer and PEMA state sharded",
    "deepspeed": "DeepSpeed ZeRO 1/2/3 (--deepspeed-config; default stage 2): PEMA on this rank's partitions",
}

#: Keys of a ``--deepspeed-config`` that the driver sets itself from the preset.
_DRIVER_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler")


def read_deepspeed_config(path: Optional[str]) -> Dict[str, object]:
    """The ZeRO config a ``deepspeed`` run uses: ``path``'s JSON, or ``{"zero_optimization": {"stage": 2}}``.

    Raises ``ValueError`` (one line) for a file that is not a JSON object, for keys the driver
    sets itself (batch sizes, clipping, optimizer, scheduler: they come from the preset), a
    ZeRO stage other than 1, 2, 3, optimizer or parameter offload, and fp16/bf16 (the driver
    trains fp32 adapters; DeepSpeed's loss scaling would change the gradients PEMA reads).
    """
    if path is None:
        return {"zero_optimization": {"stage": 2}}
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--deepspeed-config {path}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--deepspeed-config {path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--deepspeed-config {path} must hold a JSON object, got {type(cfg).__name__}")
    own = [k for k in _DRIVER_KEYS if k in cfg]
    if own:
        raise ValueError(f"--deepspeed-config {path} sets {', '.join(own)}: the driver sets these from the preset "
                         "(batch size, clipping, AdamW and its warm-up); remove them")
    for key in ("fp16", "bf16", "bfloat16"):  # "bfloat16" is DeepSpeed's older name of "bf16"
        if isinstance(cfg.get(key), dict) and cfg[key].get("enabled"):
            raise ValueError(f"--deepspeed-config {path} enables {key}: the driver trains fp32 adapters "
                             "(mixed precision under DeepSpeed is not supported)")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"--deepspeed-config {path}: zero_optimization must be a JSON object, got {zero!r}")
    zero = {"stage": 2, **zero}  # the driver's default stage when the file names none
    if isinstance(zero["stage"], bool) or zero["stage"] not in (1, 2, 3):
        raise ValueError(f"--deepspeed-config {path}: zero_optimization.stage must be 1, 2 or 3 "
                         f"(PEMA is shard-local on ZeRO partitions), got {zero['stage']!r}")
    offload = [f"zero_optimization.{key}" for key in ("offload_optimizer", "offload_param")
               if isinstance(zero.get(key), dict) and zero[key].get("device", "none") not in (None, "none")]
    offload += [f"zero_optimization.{key}" for key in ("cpu_offload", "cpu_offload_param") if zero.get(key)]
    if offload:
        raise ValueError(f"--deepspeed-config {path}: {', '.join(offload)} is not supported "
                         "(PEMA reads the optimizer's partitions in place)")
    return {**cfg, "zero_optimization": zero}


class TaskSteps:
    """One task's optimizer steps under an engine (see the module docstring for the call order).

    ``module`` is what the trainer calls forward on; ``sharding`` is what PEMA/DEMA/FixedEMA need for
    this task (``None``: they find the parameters' own layout, whole tensors or DTensors);
    ``plain_grads`` says whether ``p.grad`` holds the whole averaged gradient after
    :meth:`step` (``ddp`` only), which MAGE's beta statistics need.
    """

    sharding = None
    plain_grads = False
    #: Whether every rank holds the trainable parameters whole between forwards (DDP, ZeRO-1/2), so a
    #: penalty on them can join the loss; under FSDP2 and ZeRO-3 a method adds its penalty's gradient
    #: after the backward instead (:meth:`full_grad` / :meth:`set_full_grad`).
    whole_params = True

    def __init__(self, module: nn.Module, params: List[nn.Parameter]) -> None:
        self.module = module
        self.params = params

    def full_grad(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        """The whole gradient of ``p`` as it stands (after the step's last backward: averaged over the ranks;
        clipped only once :meth:`clip` ran, and never under DeepSpeed, which clips inside its step). A
        collective where the engine shards it: every rank calls it, in the same order. ``None`` for a
        parameter the step's loss did not reach."""
        raise NotImplementedError

    def set_full_grad(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Replace the gradient of ``p`` by the whole tensor ``value`` (every rank passes the same one and
        each writes the part it holds), between the last backward and :meth:`clip`."""
        raise NotImplementedError

    def step_grads(self, params: List[nn.Parameter]) -> List[Optional[torch.Tensor]]:
        """The whole gradients the coming optimizer step uses: after :meth:`clip` (the clipped ones)."""
        return [self.full_grad(p) for p in params]

    def accumulate(self, last: bool):
        """Context for one micro-batch's forward and backward; gradients are synced on the ``last``."""
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self) -> None:
        """Clip the step's gradients to ``cfg.grad_clip`` (a no-op where the engine clips in :meth:`step`)."""

    def step(self) -> None:
        raise NotImplementedError

    def optimizer_state(self) -> Dict[object, Dict[str, object]]:
        """The optimizer's per-parameter state (for the memory report; empty where the engine hides it)."""
        return {}

    def close(self) -> None:
        """Release what the steps hold. The trainer calls it when training fails; after a task that
        trained, the engine's next :meth:`Engine.begin_task` (or :meth:`Engine.finish`) does, so that
        the task's evaluation and checkpoint still run on the engine. Safe to call twice."""


class _TorchSteps(TaskSteps):
    """AdamW + warm-up + ``clip_grad_norm_`` on the module's own gradients (DDP, FSDP2, one process)."""

    def __init__(self, module, params, cfg, no_sync: Optional[Callable[[bool], object]] = None) -> None:
        super().__init__(module, params)
        self.cfg = cfg
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg))
        self._no_sync = no_sync

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last or self._no_sync is None else self._no_sync(last)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def full_grad(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        g = p.grad
        return g.full_tensor() if is_dtensor(g) else g  # FSDP2: the DTensor's shards, gathered

    def set_full_grad(self, p: nn.Parameter, value: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            raise RuntimeError(f"set_full_grad: a parameter of shape {tuple(p.shape)} has no gradient to replace")
        with torch.no_grad():
            if is_dtensor(g):
                g.to_local().copy_(DTensorShard("", p).take(value))
            elif value is not g:
                g.copy_(value)

    def clip(self) -> None:
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)

    def step(self) -> None:
        self.opt.step()
        self.sched.step()

    def optimizer_state(self):
        return self.opt.state


#: The learning-rate shapes of :attr:`mage_cl.trainer.TrainConfig.lr_schedule`.
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(cfg, step: int) -> float:
    """The multiple of ``cfg.lr`` used at optimizer step ``step`` (0-based) of a task.

    A linear warm-up over ``cfg.warmup_steps`` steps, then ``1`` (``constant``) or half a cosine
    that reaches 0 after step ``cfg.steps_per_task - 1`` (``cosine``).
    """
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    warm = max(1, cfg.warmup_steps)
    if step + 1 < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps_per_task - warm + 1)
    done = min(1.0, (step + 1 - warm) / span)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def _lr_lambda(cfg) -> Callable[[int], float]:
    lr_factor(cfg, 0)  # an unknown schedule fails here, before the first step
    return lambda s: lr_factor(cfg, s)


class Engine:
    """The ``ddp`` engine (and the single-process path); see :data:`ENGINES`."""

    name = "ddp"
    #: Whether every forward is a collective (parameters gathered from shards): evaluation in lock-step.
    lockstep = False

    def prepare(self, model: nn.Module) -> None:
        """Called once, right after the adapters are injected and before any method state is made."""

    def begin_task(self, model: nn.Module, params: List[nn.Parameter], cfg) -> TaskSteps:
        """The steps of a task training ``params`` (the currently trainable adapters)."""
        wrapped = distributed.wrap_ddp(model)
        no_sync = None if wrapped is model else (lambda last: wrapped.no_sync())
        steps = _TorchSteps(wrapped, params, cfg, no_sync)
        steps.plain_grads = True
        return steps

    def finish(self) -> None:
        """Release what the engine still holds (after the last task)."""

    def describe(self) -> Dict[str, object]:
        """What a checkpoint's configuration records about the engine (a resume must match it)."""
        return {}


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks FSDP2 shards one by one: every module whose class ends in ``DecoderLayer``."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no *DecoderLayer modules to shard with FSDP2")
    return layers


class FSDPEngine(Engine):
    """FSDP2. ``shard_root``: also shard what lies outside the decoder layers (the embedded benchmark's
    embeddings and head). A real backbone calls its frozen towers (image encoders, VQ models) outside
    the root's forward, where a sharded root's parameters would stay DTensor shards, so there only the
    decoder layers that hold adapters are sharded and the rest stays whole (frozen) on every rank
    (the root is still wrapped, with its own parameters ignored, so that it drives the backward)."""

    name = "fsdp"
    lockstep = True

    def __init__(self, shard_root: bool = True) -> None:
        self.shard_root = shard_root

    def prepare(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dev = next(model.parameters()).device
        mesh = init_device_mesh(dev.type, (distributed.world_size(),))
        layers = decoder_layers(model)
        if not self.shard_root:
            layers = [m for m in layers if any(isinstance(c, mk.MageLinear) for c in m.modules())]
            if not layers:
                raise ValueError(f"{type(model).__name__} has no *DecoderLayer holding adapters to shard with FSDP2")
            inside = {id(p) for layer in layers for p in layer.parameters()}
            outside = [n for n, p in mk.adapter_parameters(model) if id(p) not in inside]
            if outside:  # the root ignores its own parameters: their gradients would never be reduced
                raise ValueError(f"--distributed fsdp shards the decoder layers only, and {len(outside)} adapter "
                                 f"tensor(s) lie outside them (e.g. {outside[0]}): use ddp or DeepSpeed ZeRO-1/2")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        if self.shard_root:
            fully_shard(model, mesh=mesh)
        else:  # the root still drives the backward's gradient reduction, but holds its own parameters whole
            fully_shard(model, mesh=mesh, ignored_params={p for p in model.parameters() if id(p) not in inside})

    def begin_task(self, model, params, cfg) -> TaskSteps:
        def no_sync(last: bool):
            return _gradient_sync(model, False)

        steps = _TorchSteps(model, params, cfg, no_sync)
        steps.whole_params = False
        return steps

    def describe(self) -> Dict[str, object]:
        return {"engine": "fsdp"}


@contextlib.contextmanager
def _gradient_sync(model, enabled: bool):
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class _DeepSpeedSteps(TaskSteps):
    def __init__(self, engine, params, grad_clip: float) -> None:
        from mage_kernels.integrations.deepspeed import ZeroSharding

        super().__init__(engine, params)
        self.engine = engine
        self.sharding = ZeroSharding(engine)
        self.whole_params = int(engine.zero_optimization_stage()) < 3
        self.grad_clip = float(grad_clip or 0.0)

    def zero_grad(self) -> None:
        pass  # DeepSpeed frees its gradient partitions inside engine.step()

    def full_grad(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)  # from the ZeRO partitions (a collective)

    def set_full_grad(self, p: nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_grad

        safe_set_full_grad(p, value.to(torch.float32))

    def step_grads(self, params: List[nn.Parameter]) -> List[Optional[torch.Tensor]]:
        """DeepSpeed clips inside ``engine.step()``: the whole gradients scaled as it will scale them
        (torch's ``clip_grad_norm_`` rule over the global norm). The norm needs every parameter the
        engine's optimizer holds -- ``self.params``, the task's trainable adapters, all given to AdamW --
        so all of them are gathered even when ``params`` is a subset."""
        grads = {id(p): self.full_grad(p) for p in self.params}
        if self.grad_clip and any(g is not None for g in grads.values()):
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()
                                                         if g is not None]))
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            grads = {k: None if g is None else g * coef for k, g in grads.items()}
        return [grads[id(p)] for p in params]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # clips to gradient_clipping, steps AdamW and the schedule

    def optimizer_state(self):
        """AdamW's state on this rank's fp32 partitions (the client optimizer inside ZeRO's wrapper)."""
        inner = getattr(getattr(self.engine, "optimizer", None), "optimizer", None)
        return getattr(inner, "state", {}) or {}

    def close(self) -> None:
        if self.engine is None:
            return  # already closed
        self.sharding.remove()
        self.engine.destroy()  # under ZeRO-3 this removes the hooks that gather parameters for a forward
        self.engine = None


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, config: Dict[str, object]) -> None:
        self.config = config
        self.stage = int(config["zero_optimization"].get("stage", 2))
        self.lockstep = self.stage == 3
        self._current: Optional[_DeepSpeedSteps] = None

    def begin_task(self, model, params, cfg) -> TaskSteps:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.finish()  # the previous task's engine, kept alive (ZeRO-3: its gather hooks) for the task's
        # evaluation, consolidation and checkpoint
        world = distributed.world_size()
        config = {**self.config, "train_batch_size": cfg.batch_size,
                  "train_micro_batch_size_per_gpu": cfg.batch_size // world, "gradient_accumulation_steps": 1,
                  "gradient_clipping": float(cfg.grad_clip or 0.0)}
        config.setdefault("steps_per_print", 10 ** 9)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
        self._current = _DeepSpeedSteps(engine, params, cfg.grad_clip)
        return self._current

    def finish(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def describe(self) -> Dict[str, object]:
        return {"engine": "deepspeed", "deepspeed_config": self.config}


def make_engine(name: str, deepspeed_config: Optional[Dict[str, object]] = None, shard_root: bool = True) -> Engine:
    """The engine called ``name`` (one of :data:`ENGINES`); ``shard_root`` see :class:`FSDPEngine`."""
    if name == "ddp":
        return Engine()
    if name == "fsdp":
        return FSDPEngine(shard_root)
    if name == "deepspeed":
        return DeepSpeedEngine(deepspeed_config or read_deepspeed_config(None))
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
