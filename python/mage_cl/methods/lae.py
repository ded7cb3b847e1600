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

import mage_kernels as mk

from .base import Method, WithTaskEMA

__all__ = ["LAE"]


class LAE(WithTaskEMA, Method):
    name = "lae"
    summary = "LAE: fixed-rate (0.99) EMA of one rank-32 LoRA, adopted at each task's end"

    def __init__(self, config=None, decay: float = 0.99) -> None:
        super().__init__(config)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"LAE decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.ema = None  # mk.FixedEMA (setup): elementwise, so shard-local under FSDP2 and DeepSpeed

    def make_ema(self, model):
        return mk.FixedEMA(model, decay=self.decay)
