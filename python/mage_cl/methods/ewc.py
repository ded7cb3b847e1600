"""EWC baseline (Kirkpatrick et al., 2017) on one rank-32 LoRA.

After each task the diagonal Fisher of the adapters is estimated over that task's
whole training set with the library's per-sample Fisher (``mk.Fisher``, ALGORITHM.md
section 2: mean of squared per-sample gradients), added to the running Fisher of
the earlier tasks ("online" EWC), and the adapters are anchored:

    loss += (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2,    F normalized to mean 1

(``theta*`` = adapters at the end of the previous task). Normalizing the Fisher
to mean 1 makes ``lambda`` independent of the loss scale; it is the one knob.

Under FSDP2 each rank keeps ``F`` and ``theta*`` of its own shard only and adds the penalty of
that shard (the gradient of a shard's penalty depends on that shard alone); ``state_dict``
gathers whole tensors. DeepSpeed ZeRO-1/2 keep whole parameters on every rank, as DDP does.
Under ZeRO-3 the parameters are partitioned between forwards, so every rank keeps whole ``F`` and
``theta*`` and adds the penalty's gradient ``lam F (theta - theta*)`` after each backward, on the
gathered parameters (:meth:`~mage_cl.engines.TaskSteps.set_full_grad`), before clipping.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

import mage_kernels as mk

from mage_kernels.sharding import DTensorShard, GatheredTensor, LocalPart, WholeTensor, full_tensor, is_dtensor

from .base import Method, batch_loss, tensor_bytes

__all__ = ["EWC"]


class EWC(Method):
    name = "ewc"
    summary = "EWC: quadratic anchor weighted by the per-sample Fisher, one rank-32 LoRA"

    def __init__(self, config=None, lam: float = 1.0) -> None:
        super().__init__(config)
        self.lam = lam
        self.fisher: Dict[str, torch.Tensor] = {}  # this rank's part of each tensor's F (whole without sharding)
        self.anchor: Dict[str, torch.Tensor] = {}  # ... and of theta*

    @staticmethod
    def _part(name: str, p: torch.Tensor) -> LocalPart:
        """What this rank keeps of ``p``'s F and theta*: an FSDP2 DTensor's local shard; the whole tensor
        for a ZeRO-3 partitioned parameter (gathered); else the whole tensor (one process, DDP, and
        DeepSpeed ZeRO-1/2, whose parameters stay whole on every rank)."""
        if hasattr(p, "ds_id"):
            return GatheredTensor(name, p)
        return DTensorShard(name, p) if is_dtensor(p) else WholeTensor(name, p)

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        """``p``'s local values, differentiable (an FSDP2 DTensor's shard; ``p`` itself otherwise)."""
        return p.to_local() if is_dtensor(p) else p

    def loss_extra(self, model) -> Optional[torch.Tensor]:
        if not self.fisher:
            return None
        total = None
        for n, p in self.model.named_parameters():
            if n in self.fisher and p.requires_grad and not hasattr(p, "ds_id"):  # ZeRO-3: after_backward
                term = (self.fisher[n] * (self._local(p) - self.anchor[n]).pow(2)).sum()
                total = term if total is None else total + term
        return None if total is None else 0.5 * self.lam * total

    def after_backward(self) -> None:
        """ZeRO-3: the penalty's gradient ``lam F (theta - theta*)`` of each partitioned parameter, on its
        whole (gathered) value, added to the engine's gradient before clipping and the step."""
        if not self.fisher:
            return
        for n, p in self.model.named_parameters():
            if n in self.fisher and p.requires_grad and hasattr(p, "ds_id"):
                g = self.steps.full_grad(p)
                if g is not None:
                    pen = self.lam * self.fisher[n] * (full_tensor(p) - self.anchor[n])
                    self.steps.set_full_grad(p, g + pen.view(g.shape))

    def after_task(self, task, train_batches) -> None:
        model = self.model
        params = dict(model.named_parameters())
        fisher = mk.Fisher(model, loss_reduction="mean")
        was_training = model.training
        model.eval()  # no dropout while estimating
        try:
            for batch in train_batches():
                model.zero_grad(set_to_none=True)
                # no token weights: the loss already masks prompt and padding, and the prompt
                # positions must keep their gradient path (attention) into the answer's loss
                batch_loss(model, batch).backward()
            fisher.sync()
            values = {}
            for n, p in params.items():
                if p.requires_grad:
                    f = fisher.for_parameter(p)
                    if f is not None:
                        values[n] = f.detach().clone()
        finally:
            fisher.remove()
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        mean = torch.stack([v.mean() for v in values.values()]).mean().clamp_min(1e-30)  # F is whole and synced
        for n, v in values.items():
            part = self._part(n, params[n])
            v = part.take(v / mean).contiguous()
            self.fisher[n] = self.fisher[n] + v if n in self.fisher else v
            self.anchor[n] = part.theta().detach().clone()

    def state_bytes(self) -> int:
        return tensor_bytes(self.fisher.values()) + tensor_bytes(self.anchor.values())

    def state_dict(self):
        """Whole tensors on every rank (under FSDP2 the shards are gathered: every rank calls it)."""
        params = dict(self.model.named_parameters())
        return {k: {n: self._part(n, params[n]).gather(v).cpu() for n, v in d.items()}
                for k, d in (("fisher", self.fisher), ("anchor", self.anchor))}

    def load_state_dict(self, state) -> None:
        """Whole tensors (from a sharded or a single-process run); each rank keeps its part."""
        params = dict(self.model.named_parameters())
        dev = next(self.model.parameters()).device

        def local(n, v):
            return self._part(n, params[n]).localize(v.to(dev), "EWC state").contiguous()

        self.fisher = {n: local(n, v) for n, v in state.get("fisher", {}).items()}
        self.anchor = {n: local(n, v) for n, v in state.get("anchor", {}).items()}

