"""A ``transformers.TrainerCallback`` that runs MAGE's Fisher and PEMA (or DEMA) inside ``Trainer``.

Usage (the README shows it in full)::

    fisher = mk.Fisher(model, loss_reduction="mean")
    pema = mk.PEMA(model)                                  # after mk.for_task(...): theta* <- theta
    cb = MageCallback(fisher, pema)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                      compute_loss_func=cb.compute_loss, callbacks=[cb])
    trainer.train()                                        # ends with pema.finish_task()

What the callback does, per optimizer step (one accumulation window of ``k``
micro-batches, ``k = gradient_accumulation_steps`` except for a shorter last
window of an epoch):

* ``on_step_begin`` (once per window, before its first micro-batch):
  ``fisher.reset()`` and ``fisher.loss_scale = 1 / k``;
* :meth:`MageCallback.compute_loss` (``Trainer(compute_loss_func=...)``): the loss
  of each micro-batch is the MEAN over its samples of each sample's mean token loss
  (causal LM: logits at ``t`` predict ``labels[t+1]``, ``-100`` ignored), divided by
  ``k`` -- so the accumulated gradient is the per-sample mean over the window and the
  Fisher sees each sample's own gradient (``mage_kernels.fisher``: ``loss_scale`` is
  ``1 / accumulation_steps``); the Trainer's own rescaling of a ``compute_loss_func``
  loss (none, or times the number of processes with ``average_tokens_across_devices``)
  is undone, and CHECKED at every backward (a hook on the loss): a Trainer that scales
  the loss differently raises ``RuntimeError`` before any gradient is accumulated;
* ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``):
  ``fisher.sync()`` (the all-reduce over DDP ranks; nothing without
  ``torch.distributed``), then ``method.update(fisher)`` with the step's clipped,
  averaged gradients;
* ``on_train_end``: ``method.finish_task()`` (theta <- theta*) unless ``finish_task=False``.

``fisher_window="train"`` keeps one Fisher over the whole ``train()`` call instead
(EWC importances: reset at the start, synced once at the end, read with
``fisher.values()``). Not supported, and refused with a clear error at
``on_train_begin``: fp16 with a gradient scaler, DataParallel (``n_gpu > 1``),
DeepSpeed, FSDP, and gradient checkpointing with a Fisher.

Quantized base models: ``Trainer`` refuses a model loaded with a bitsandbytes
``quantization_config`` unless it carries PEFT's marker (``_hf_peft_config_loaded``).
:func:`quantized_base` is the documented way around it: it checks that the model
has trainable MAGE adapters -- what that Trainer check exists to ensure -- and sets
the marker only while the ``Trainer`` is constructed (the one place it is checked)::

    with quantized_base(model):
        trainer = Trainer(model=model, ...)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the module is only imported by users of transformers
    raise ImportError("mage_kernels.integrations.transformers needs the transformers package") from exc

from ..ema import DEMA, PEMA, FixedEMA
from ..fisher import Fisher
from ..inject import adapter_parameters, mage_layers

__all__ = ["MageCallback", "sample_mean_lm_loss", "quantized_base"]

_WINDOWS = ("step", "train")


def sample_mean_lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Mean over samples of each sample's mean token cross-entropy (``-100`` labels ignored).

    ``shift=True`` (causal LM): ``logits[:, t]`` predicts ``labels[:, t + 1]``, as
    transformers' causal-LM loss does. Computed in float32 (float64 for float64
    logits). Raises ``ValueError`` when a sample has no label token (its mean is undefined).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [N, T, V] and labels [N, T]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    tok = F.cross_entropy(logits.to(dt).transpose(1, 2), labels, ignore_index=-100, reduction="none")
    valid = (labels != -100).to(dt)
    count = valid.sum(1)
    if bool((count == 0).any()):
        raise ValueError(f"sample {int((count == 0).nonzero()[0])} of the batch has no label token (all -100); "
                         "its per-sample loss is undefined")
    return ((tok * valid).sum(1) / count).mean()


class MageCallback(TrainerCallback):
    """Fisher reset / sync, PEMA or DEMA updates and ``finish_task`` around ``Trainer``'s optimizer steps.

    Args:
        fisher: a :class:`mage_kernels.Fisher` with ``loss_reduction="mean"`` attached
            to the model the Trainer trains (``None`` for DEMA alone).
        method: a :class:`mage_kernels.PEMA` (needs ``fisher``), a
            :class:`mage_kernels.DEMA` or :class:`mage_kernels.FixedEMA` (LAE's fixed-rate EMA),
            or ``None`` (Fisher only, e.g. EWC).
        fisher_window: ``"step"`` (reset every optimizer step: what PEMA needs) or
            ``"train"`` (one Fisher over the whole ``train()``: EWC importances).
        finish_task: call ``method.finish_task()`` at the end of ``train()``.
        shift_labels: the loss of :meth:`compute_loss` is a causal-LM loss (``True``).

    Pass :meth:`compute_loss` as ``Trainer(compute_loss_func=...)``; the callback
    raises at the first optimizer step otherwise. See the module docstring for what
    happens when.
    """

    def __init__(
        self,
        fisher: Optional[Fisher] = None,
        method: Union[PEMA, DEMA, FixedEMA, None] = None,
        fisher_window: str = "step",
        finish_task: bool = True,
        shift_labels: bool = True,
    ) -> None:
        if fisher is None and method is None:
            raise ValueError("MageCallback needs a Fisher, a method (PEMA/DEMA/FixedEMA), or both")
        if fisher is not None and not isinstance(fisher, Fisher):
            raise TypeError(f"fisher must be a mage_kernels.Fisher; got {type(fisher).__name__}")
        if method is not None and not isinstance(method, (PEMA, DEMA, FixedEMA)):
            raise TypeError(f"method must be a mage_kernels.PEMA, DEMA or FixedEMA; got {type(method).__name__}")
        if isinstance(method, PEMA) and fisher is None:
            raise ValueError("PEMA needs the step's Fisher: pass fisher=mk.Fisher(model, loss_reduction='mean')")
        if fisher is not None and fisher.loss_reduction != "mean":
            raise ValueError("the callback's loss is a mean over samples: create the Fisher with loss_reduction='mean'")
        if fisher_window not in _WINDOWS:
            raise ValueError(f"fisher_window must be one of {_WINDOWS}; got {fisher_window!r}")
        if fisher_window == "train" and isinstance(method, PEMA):
            raise ValueError("PEMA uses each step's Fisher: use fisher_window='step' with it")
        self.fisher = fisher
        self.method = method
        self.fisher_window = fisher_window
        self.finish_task = bool(finish_task)
        self.shift_labels = bool(shift_labels)
        self._args: Any = None
        self._ga = 1
        self._steps_in_epoch: Optional[int] = None
        self._micro = 0          # micro-batches done in this epoch
        self._k = 0              # micro-batches in the current window
        self._seen = 0           # micro-batches done in the current window
        self._losses = 0         # training calls of compute_loss in the current window
        self._in_window = False

    # ------------------------------------------------------------------ the loss

    def _trainer_factor(self, num_items_in_batch: Any) -> float:
        """What Trainer multiplies a ``compute_loss_func`` loss by (transformers 5.x): the number of
        processes when it averages tokens across devices, else 1."""
        args = self._args
        if args is not None and getattr(args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
            return float(max(1, int(getattr(args, "world_size", 1))))
        return 1.0

    def compute_loss(self, outputs: Any, labels: Optional[torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
        """The loss for ``Trainer(compute_loss_func=...)``: per-sample mean, scaled for the window (see the module doc)."""
        if labels is None:
            raise ValueError("MageCallback.compute_loss needs labels in the batch")
        logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[0]
        loss = sample_mean_lm_loss(logits, labels, shift=self.shift_labels)
        factor = self._trainer_factor(num_items_in_batch)
        if not (torch.is_grad_enabled() and loss.requires_grad):  # evaluation: the plain per-sample mean
            return loss / factor
        if not self._in_window:
            raise RuntimeError("MageCallback.compute_loss was called for training outside an optimizer step; add "
                               "the callback to the Trainer (callbacks=[cb]) as well as compute_loss_func=cb.compute_loss")
        self._losses += 1
        out = loss / (self._k * factor)

        def check(grad: torch.Tensor) -> None:
            got = float(grad.detach().reshape(-1)[0])
            if abs(got - factor) > 1e-6 * factor:
                raise RuntimeError(
                    f"MageCallback: the Trainer scaled the compute_loss_func loss by {got:g} before backward, the "
                    f"callback expected {factor:g} (transformers 5.x: unchanged, or times the number of processes "
                    "with average_tokens_across_devices); the Fisher and the gradients would be off by that ratio. "
                    "Do not set trainer.loss_is_scaled_for_ga, and report the transformers version if this persists"
                )

        out.register_hook(check)
        return out

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        if getattr(args, "fp16", False):
            raise ValueError("MageCallback does not support fp16 with a gradient scaler (the Fisher would need the "
                             "scale at every forward); use bf16 or fp32")
        if getattr(args, "n_gpu", 1) > 1:
            raise ValueError("MageCallback does not support DataParallel (n_gpu > 1); launch one process per GPU "
                             "(torchrun / accelerate launch) for DDP")
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError("MageCallback supports single-process and DDP training, not DeepSpeed or FSDP")
        if model is not None:
            ours = {id(layer) for _, layer in mage_layers(model)}
            if self.fisher is not None and {id(layer) for _, layer in self.fisher.layers} != ours:
                raise ValueError("the Fisher is not attached to the MageLinear layers of the model the Trainer trains")
            if self.method is not None:
                params = {id(p) for _, p in adapter_parameters(model, trainable_only=False)}
                if not all(id(p) in params for p in self.method.params):
                    raise ValueError(f"the {type(self.method).__name__} tracks tensors that are not adapters of the "
                                     "model the Trainer trains")
        self._args = args
        self._ga = int(args.gradient_accumulation_steps)
        self._in_window = False
        if self.fisher is not None:
            self.fisher.reset()
            self.fisher.loss_scale = 1.0

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self._micro = 0
        try:
            self._steps_in_epoch = len(train_dataloader)
        except TypeError:  # an iterable dataset: Trainer then counts max_steps * accumulation steps
            self._steps_in_epoch = None

    def on_step_begin(self, args, state, control, **kwargs):
        left = None if self._steps_in_epoch is None else self._steps_in_epoch - self._micro
        self._k = self._ga if left is None else max(1, min(self._ga, left))
        self._seen = 0
        self._losses = 0
        self._in_window = True
        if self.fisher is not None:
            if self.fisher_window == "step":
                self.fisher.reset()
            self.fisher.loss_scale = 1.0 / self._k

    def on_substep_end(self, args, state, control, **kwargs):
        self._seen += 1
        self._micro += 1

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._seen += 1
        self._micro += 1
        self._in_window = False
        if self._losses != self._seen:
            raise RuntimeError(
                f"MageCallback: {self._seen} micro-batch(es) in this optimizer step but compute_loss ran for "
                f"{self._losses}; pass compute_loss_func=callback.compute_loss to the Trainer (its default loss is a "
                "token mean that the Fisher cannot split into per-sample gradients)"
            )
        if self._seen != self._k:
            raise RuntimeError(
                f"MageCallback: this optimizer step accumulated {self._seen} micro-batches, the callback scaled the "
                f"loss for {self._k} (resuming in the middle of an epoch, or a dataloader whose length changed, is "
                "not supported)"
            )
        if self.fisher_window == "step":
            if self.fisher is not None:
                self.fisher.sync()
            if self.method is not None:
                self.method.update(self.fisher)

    def on_train_end(self, args, state, control, **kwargs):
        if self.fisher is not None and self.fisher_window == "train" and self.fisher.num_samples > 0:
            self.fisher.sync()
        if self.method is not None and self.finish_task:
            self.method.finish_task()


@contextlib.contextmanager
def quantized_base(model: nn.Module) -> Iterator[nn.Module]:
    """Let ``Trainer(...)`` accept a bitsandbytes-quantized model that carries trainable MAGE adapters.

    ``Trainer.__init__`` refuses a model loaded with a quantization config unless it
    carries PEFT's marker ``_hf_peft_config_loaded``: the check exists to stop
    training a quantized model with no adapters. Inside this block the marker is set
    (and restored on exit) after checking that the model does have trainable
    MageLinear adapters; construct the Trainer inside it, train outside it. Raises
    ``ValueError`` when the model has no trainable adapters.
    """
    trainable = list(adapter_parameters(model, trainable_only=True))
    if not trainable:
        raise ValueError("the model has no trainable MageLinear adapters; inject (and for_task) before training a "
                         "quantized base")
    had = "_hf_peft_config_loaded" in model.__dict__
    old = model.__dict__.get("_hf_peft_config_loaded")
    model._hf_peft_config_loaded = True
    try:
        yield model
    finally:
        if had:
            model._hf_peft_config_loaded = old
        else:
            del model._hf_peft_config_loaded
