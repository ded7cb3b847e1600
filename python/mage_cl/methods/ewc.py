"""EWC baseline (Kirkpatrick et al., 2017) on one rank-32 LoRA.

After each task the diagonal Fisher of the adapters is estimated over that task's
whole training set with the library's per-sample Fisher (``mk.Fisher``, ALGORITHM.md
section 2: mean of squared per-sample gradients), added to the running Fisher of
the earlier tasks ("online" EWC), and the adapters are anchored:

    loss += (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2,    F normalized to mean 1

(``theta*`` = adapters at the end of the previous task). Normalizing the Fisher
to mean 1 makes ``lambda`` independent of the loss scale; it is the one knob.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

import mage_kernels as mk

from .base import Method, batch_loss, tensor_bytes

__all__ = ["EWC"]


class EWC(Method):
    name = "ewc"
    summary = "EWC: quadratic anchor weighted by the per-sample Fisher, one rank-32 LoRA"

    def __init__(self, config=None, lam: float = 1.0) -> None:
        super().__init__(config)
        self.lam = lam
        self.fisher: Dict[str, torch.Tensor] = {}
        self.anchor: Dict[str, torch.Tensor] = {}

    def loss_extra(self, model) -> Optional[torch.Tensor]:
        if not self.fisher:
            return None
        total = None
        for n, p in self.model.named_parameters():
            if n in self.fisher and p.requires_grad:
                term = (self.fisher[n] * (p - self.anchor[n]).pow(2)).sum()
                total = term if total is None else total + term
        return None if total is None else 0.5 * self.lam * total

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
        mean = torch.stack([v.mean() for v in values.values()]).mean().clamp_min(1e-30)
        for n, v in values.items():
            v = v / mean
            self.fisher[n] = self.fisher[n] + v if n in self.fisher else v
            self.anchor[n] = params[n].detach().clone()

    def state_bytes(self) -> int:
        return tensor_bytes(self.fisher.values()) + tensor_bytes(self.anchor.values())

    def state_dict(self):
        return {"fisher": {k: v.cpu() for k, v in self.fisher.items()},
                "anchor": {k: v.cpu() for k, v in self.anchor.items()}}

    def load_state_dict(self, state) -> None:
        dev = next(self.model.parameters()).device
        self.fisher = {k: v.to(dev) for k, v in state.get("fisher", {}).items()}
        self.anchor = {k: v.to(dev) for k, v in state.get("anchor", {}).items()}

