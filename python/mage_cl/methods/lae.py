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

from .base import Method

__all__ = ["LAE"]


class LAE(Method):
    name = "lae"
    summary = "LAE: fixed-rate (0.99) EMA of one rank-32 LoRA, adopted at each task's end"

    def __init__(self, config=None, decay: float = 0.99) -> None:
        super().__init__(config)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"LAE decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.ema = None  # mk.FixedEMA: elementwise, so shard-local under FSDP2 and DeepSpeed
        self._engine_sharding = False  # whether the last task's engine gave the EMA its sharding (DeepSpeed)

    def setup(self, model, prepare=None) -> None:
        super().setup(model, prepare)
        self.ema = mk.FixedEMA(model, decay=self.decay)

    def before_task(self, task, task_index: int) -> None:
        super().before_task(task, task_index)
        if not self._engine_sharding:  # else bind_steps starts it, on the task's new engine
            self.ema.start_task()

    def bind_steps(self, steps) -> None:
        self._engine_sharding = steps.sharding is not None
        if self._engine_sharding:  # DeepSpeed: this task's engine holds the partitions
            self.ema.start_task(sharding=steps.sharding)

    def after_step(self, fisher) -> None:
        self.ema.update()

    def after_task(self, task, train_batches) -> None:
        self.ema.finish_task()

    def state_bytes(self) -> int:
        return int(mk.persistent_state_bytes(self.ema))
