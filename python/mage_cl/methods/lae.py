"""LAE baseline (Gao et al., ICCV'23) as the paper runs it: a fixed-rate EMA of the adapters.

Paper 9.4: "LAE adopts the stable EMA weight to update the LoRA parameters, which
is set to 0.99". Reading used here: during a task an offline copy
``theta_ema <- 0.99 theta_ema + 0.01 theta`` follows the online adapters after
every step (``theta_ema`` starts at ``theta`` at the task's start); at the end of
the task the adapters take the EMA values, so evaluation and the next task use
the stable (offline) weights. LAE's online/offline output ensembling at inference
is not used (the paper's description does not mention it). One rank-32 LoRA.
"""

from __future__ import annotations

from typing import Dict

import torch

from .base import Method, tensor_bytes

__all__ = ["LAE"]


class LAE(Method):
    name = "lae"
    summary = "LAE: fixed-rate (0.99) EMA of one rank-32 LoRA, adopted at each task's end"

    def __init__(self, config=None, decay: float = 0.99) -> None:
        super().__init__(config)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"LAE decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.ema: Dict[str, torch.Tensor] = {}

    def before_task(self, task, task_index: int) -> None:
        super().before_task(task, task_index)
        self.ema = {n: p.detach().clone() for n, p in self.named_trainable()}

    @torch.no_grad()
    def after_step(self, fisher) -> None:
        for n, p in self.named_trainable():
            self.ema[n].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def after_task(self, task, train_batches) -> None:
        for n, p in self.named_trainable():
            p.copy_(self.ema[n])
        self.ema = {}

    def state_bytes(self) -> int:
        return tensor_bytes(self.ema.values())
