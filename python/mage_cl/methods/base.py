"""The interface every continual-learning method implements, and the plain-LoRA family.

The trainer (:mod:`mage_cl.trainer`) calls, for each task in the order::

    method.setup(model)                      # once: inject adapters, build state
    method.before_task(task, task_index)     # choose trainable adapters, snapshot state
    method.bind_steps(steps)                 # the engine's steps for this task (mage_cl.engines)
    for each step:
        loss = task loss + method.loss_extra(model)      # regularizers (EWC, RegLoRA)
        loss.backward()
        method.after_backward()              # gradient surgery (PGP)
        clip gradients; method.before_step() # the authors' PEMA (mage-authors)
        optimizer step
        method.after_step(fisher)            # EMA-style updates (LAE, CIA, MAGE)
    method.after_task(task, train_batches)   # consolidate (EWC Fisher, PGP basis, ...)

``state_bytes()`` is the method's *persistent* state (what it must keep between
steps or tasks beyond the adapters themselves), measured from the real tensors
with :func:`mage_kernels.persistent_state_bytes` where the library provides the
state, else summed over the tensors the method holds.

All methods have the same total LoRA rank (ALGORITHM.md section 1 / paper 9.3): four
adapters of rank 8, or one adapter of rank 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

import mage_kernels as mk
from mage_kernels.sharding import full_shape, full_tensor, load_full_

__all__ = ["MethodConfig", "Method", "WithTaskEMA", "LoRA", "ZeroShot", "Multitask", "MultitaskTokens", "MultitaskSqrt",
           "tensor_bytes", "batch_loss", "target_tokens", "loss_weight_total", "LOSS_REDUCTIONS"]


@dataclass
class MethodConfig:
    """Adapter shape shared by all methods: total rank ``r_total`` (paper: 32), alpha 32, dropout 0.05.

    ``target_modules`` are the linears that get adapters (leaf names, or qualified names relative
    to the model given to :meth:`Method.setup`; a real backbone passes its language model's
    q/k/v/o/gate/up/down by qualified name, :meth:`mage_cl.backbones.Backbone.target_modules`).
    ``adapter_dtype``: the adapters' dtype when it must differ from the base weights' (a bf16
    model trains float32 adapters under autocast; ``None``: the base weights' dtype).
    """

    r_total: int = 32
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple = mk.LLAMA_TARGETS
    adapter_dtype: Optional[torch.dtype] = None


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total bytes of ``tensors`` (``numel * element_size``)."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


#: The loss reductions of :func:`batch_loss`: each sample's mean target-token loss weighted by 1
#: (``sample``), by its target tokens (``token``) or by their square root (``sqrt``).
LOSS_REDUCTIONS = ("sample", "token", "sqrt")


def batch_loss(model: nn.Module, batch: Dict[str, torch.Tensor], reduction: str = "sample",
               divisor: Optional[float] = None) -> torch.Tensor:
    """The next-token loss of ``batch`` over its target tokens (labels ``!= -100``).

    ``reduction="sample"`` (every method but ``multitask-tokens`` and ``multitask-sqrt``): the mean over samples of each
    sample's mean loss, written as ``(1/N) sum_n loss_n`` so that the per-sample Fisher of
    ALGORITHM.md §2 (``mk.Fisher(loss_reduction="mean")``) sees exactly the samples' losses
    ``loss_n``. ``reduction="token"``: the sum of the token losses over ``divisor`` (default:
    this batch's target tokens; the trainer passes the whole step's count, see
    :func:`mage_cl.trainer.train_task`), i.e. every target token weighs the same, so a 66-token
    image answer counts 66 times a one-token text answer (ALGORITHM.md §9, ``multitask-tokens``).
    ``reduction="sqrt"``: ``sum_n sqrt(T_n) loss_n / divisor`` with ``T_n`` the sample's target
    tokens and ``divisor`` (default: this batch's ``sum_n sqrt(T_n)``) the step's total weight, in
    between: a 66-token answer counts about 8 times a one-token one (``multitask-sqrt``).
    :func:`loss_weight_total` is a batch's total weight for either.
    Every key of ``batch`` but ``labels`` goes to the model (a real backbone's batch also holds
    ``pixel_values`` and ``logits_to_keep``); when the model returns logits for the last
    positions only (``logits_to_keep``), the labels are aligned to them.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; choose from {', '.join(LOSS_REDUCTIONS)}")
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, batch["labels"].shape[1] - out.logits.shape[1] + 1:]
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    mask = (labels != -100).to(tok.dtype)
    if reduction == "token":
        return (tok * mask).sum() / max(1.0, float(mask.sum()) if divisor is None else float(divisor))
    lengths = mask.sum(1)
    per_sample = (tok * mask).sum(1) / lengths.clamp_min(1.0)
    if reduction == "sqrt":
        w = lengths.sqrt()
        return (w * per_sample).sum() / max(1.0, float(w.sum()) if divisor is None else float(divisor))
    return per_sample.mean()


def _target_lengths(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Target tokens per sample (labels ``!= -100`` after the first position) of a collated ``batch``."""
    return (batch["labels"][:, 1:] != -100).sum(1)


def target_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """Number of target tokens (labels ``!= -100`` after the first position) of a collated ``batch``."""
    return int(_target_lengths(batch).sum())


def loss_weight_total(batch: Dict[str, torch.Tensor], reduction: str) -> float:
    """The total sample weight of ``batch`` under a weighted ``reduction`` of :func:`batch_loss`:
    its target tokens (``token``) or the sum of their square roots per sample (``sqrt``)."""
    if reduction == "token":
        return float(target_tokens(batch))
    if reduction == "sqrt":
        return float(_target_lengths(batch).double().sqrt().sum())
    raise ValueError(f"loss reduction {reduction!r} has no total weight (only 'token' and 'sqrt')")


class Method:
    """Base class; the defaults are plain sequential fine-tuning of every adapter."""

    #: CLI name (set by subclasses).
    name = "base"
    #: One line for ``mage-cl --help``.
    summary = "base class"
    #: Adapters per layer; each has rank ``r_total // num_adapters``.
    num_adapters = 1
    #: Whether the trainer trains at all (False: zero-shot).
    trains = True
    #: Whether the trainer trains once on the union of all tasks (multitask upper bound).
    joint = False
    #: Whether the trainer should accumulate the per-sample Fisher each step (ALGORITHM.md section 2).
    needs_fisher = False
    #: How the training loss averages over a batch (:func:`batch_loss`): one of :data:`LOSS_REDUCTIONS`.
    loss_reduction = "sample"

    def __init__(self, config: Optional[MethodConfig] = None) -> None:
        self.config = config or MethodConfig()
        if self.config.r_total % self.num_adapters:
            raise ValueError(f"total rank {self.config.r_total} is not divisible by {self.num_adapters} adapters")
        self.model: Optional[nn.Module] = None
        self.steps = None  # the current task's mage_cl.engines.TaskSteps (bind_steps)

    # -------------------------------------------------------------- adapters

    @property
    def r(self) -> int:
        return self.config.r_total // self.num_adapters

    def inject(self, model: nn.Module) -> None:
        mk.inject(model, self.config.target_modules, r=self.r, alpha=self.config.alpha,
                  dropout=self.config.dropout, num_adapters=self.num_adapters)
        dtype = self.config.adapter_dtype
        if dtype is not None:  # e.g. float32 adapters on a bf16 model (the forward runs under autocast)
            with torch.no_grad():
                for _, layer in mk.mage_layers(model):
                    for p in list(layer.lora_A) + list(layer.lora_B):
                        p.data = p.data.to(dtype)

    def setup(self, model: nn.Module, prepare: Optional[Callable[[nn.Module], None]] = None) -> None:
        """Inject the adapters into the (frozen) ``model``, then call ``prepare(model)``.

        ``prepare`` runs before subclasses build their state: the FSDP2 engine shards the
        model there (:meth:`mage_cl.engines.Engine.prepare`), so PEMA/DEMA see the shards.
        """
        self.inject(model)
        if prepare is not None:
            prepare(model)
        self.model = model

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable(self) -> List[tuple]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def adapter_state(self) -> Dict[str, torch.Tensor]:
        """Every adapter (and router) tensor, trainable or not, as whole CPU copies (for checkpoints).

        Under FSDP2 or ZeRO-3 the tensors are gathered from the shards: a collective, so every
        rank calls it (and gets the same dict).
        """
        return {n: full_tensor(p).cpu().clone() for n, p in self.model.named_parameters() if _is_adapter(n)}

    def load_adapter_state(self, state: Dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.model.named_parameters() if _is_adapter(n)}
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise KeyError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for n, p in own.items():  # validate everything before copying anything (all or nothing)
            v = state[n]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(full_shape(p)):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"adapter {n}: shape {got} != {tuple(full_shape(p))}")
            if not torch.isfinite(v).all():
                raise ValueError(f"adapter {n} holds non-finite values")
        with torch.no_grad():  # each rank writes the part it holds (whole tensors when nothing is sharded)
            for n, p in own.items():
                load_full_(p, state[n].to(p.device, p.dtype))

    # -------------------------------------------------------------- hooks

    def before_task(self, task, task_index: int) -> None:
        """Default: train every adapter."""
        mk.set_trainable(self.model, range(self.num_adapters))

    def bind_steps(self, steps) -> None:
        """The task's :class:`mage_cl.engines.TaskSteps`, after ``before_task``, before the first step.

        Methods with library state take ``steps.sharding`` here (DeepSpeed's partitions); methods that
        change gradients read ``self.steps`` (whole gradients under every engine:
        :meth:`~mage_cl.engines.TaskSteps.full_grad`). Overrides call ``super().bind_steps(steps)``.
        """
        self.steps = steps

    def loss_extra(self, model: nn.Module) -> Optional[torch.Tensor]:
        return None

    def after_backward(self) -> None:
        pass

    def before_step(self) -> None:
        """After gradient clipping, before ``optimizer.step()`` (the authors' PEMA runs here)."""

    def after_step(self, fisher) -> None:
        pass

    def after_task(self, task, train_batches: Callable[[], Iterable[Dict[str, torch.Tensor]]]) -> None:
        pass

    def finish(self) -> None:
        """Release hooks (called once after the last task)."""

    # -------------------------------------------------------------- state

    def state_bytes(self) -> int:
        return 0

    def diagnostics(self) -> Dict[str, float]:
        """Method-specific numbers about the task just trained (e.g. how often PEMA fell back)."""
        return {}

    def state_dict(self) -> Dict[str, object]:
        """Between-task state for checkpoints (tensors on CPU)."""
        return {}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state but the checkpoint holds {sorted(state)}")


def _is_adapter(name: str) -> bool:
    leaf = name.split(".")
    return any(part in ("lora_A", "lora_B", "router") for part in leaf)


class WithTaskEMA:
    """Mixin: a library task EMA (``mk.DEMA``, ``mk.FixedEMA``) in ``self.ema``, snapshot at each task's
    start, updated after every optimizer step, adopted by the adapters at the task's end.

    Under DeepSpeed the task's engine holds the partitions, so the EMA starts on its sharding in
    :meth:`bind_steps` (a new engine per task) rather than in :meth:`before_task`.
    """

    def make_ema(self, model):
        raise NotImplementedError

    def setup(self, model, prepare=None) -> None:
        super().setup(model, prepare)
        self.ema = self.make_ema(model)  # after prepare: FSDP2's shards
        self._engine_sharding = False  # whether the last task's engine gave the EMA its sharding (DeepSpeed)

    def before_task(self, task, task_index: int) -> None:
        super().before_task(task, task_index)
        if not self._engine_sharding:  # else bind_steps starts it, on the task's new engine
            self.ema.start_task()

    def bind_steps(self, steps) -> None:
        super().bind_steps(steps)
        self._engine_sharding = steps.sharding is not None
        if self._engine_sharding:
            self.ema.start_task(sharding=steps.sharding)

    def after_step(self, fisher) -> None:
        self.ema.update()

    def after_task(self, task, train_batches) -> None:
        self.ema.finish_task()

    def state_bytes(self) -> int:
        return int(mk.persistent_state_bytes(self.ema))


class LoRA(Method):
    """Sequential LoRA fine-tuning, one adapter of rank 32 (paper: "LoRA Fine-Tune")."""

    name = "lora"
    summary = "sequential fine-tuning of one rank-32 LoRA (the paper's LoRA Fine-Tune)"


class ZeroShot(LoRA):
    """The pretrained model without any training (adapters injected with ``B = 0``: no effect)."""

    name = "zero-shot"
    summary = "the pretrained base model, no training (chance-level reference row)"
    trains = False


class Multitask(LoRA):
    """Upper bound: one rank-32 LoRA trained on the union of all tasks at once, evaluated once."""

    name = "multitask"
    summary = "upper bound: one rank-32 LoRA trained on all tasks at once"
    joint = True


class MultitaskTokens(Multitask):
    """The multitask upper bound with the loss averaged over target tokens instead of samples.

    In a batch mixing the tasks, the per-sample mean gives each token of a 66-token image answer
    (the embedded benchmark's; a real model's are hundreds) 1/66 of a sample's weight and each
    token of a one-to-three-token text answer a third to all of it. With one task per batch (the
    continual methods) the target lengths hardly vary, so the two reductions nearly coincide
    (they are identical when every length is equal). Its reported training loss is a token mean,
    not comparable with the other methods'. ALGORITHM.md §9.
    """

    name = "multitask-tokens"
    summary = "the upper bound with its loss averaged over target tokens (an image answer weighs all its tokens)"
    loss_reduction = "token"


class MultitaskSqrt(Multitask):
    """The multitask upper bound with each sample's loss weighted by the square root of its target tokens.

    Between ``multitask`` (weight 1: a 66-token image answer's tokens each get 1/66 of a sample's
    weight, and the image tasks learn slowly) and ``multitask-tokens`` (weight ``T``: the image
    answers take most of every mixed batch's gradient, and the short text answers learn slowly):
    a 66-token answer counts ``sqrt(66/2)``, about 6 times a two-token one. Its reported training
    loss is this weighted mean. ALGORITHM.md §9.
    """

    name = "multitask-sqrt"
    summary = "the upper bound with each sample's loss weighted by sqrt(its target tokens), between the two above"
    loss_reduction = "sqrt"
