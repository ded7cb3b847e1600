"""CIA baseline without instruction grouping: the layer-wise dynamic EMA (DEMA, ALGORITHM.md section 4).

Paper 9.4: CIA's instruction grouping expands the LoRA parameters, so, like the
paper, this comparison removes it and keeps only the dynamic EMA update on one
rank-32 LoRA: ``mk.DEMA.update()`` after every optimizer step, the adapters take
their EMA values at the end of each task. DEMA keeps two parameter-sized buffers
per trained tensor (``theta*`` and ``g_prev``), PEMA one; the driver reports both
from the real tensors (``mk.persistent_state_bytes``).
"""

from __future__ import annotations

import mage_kernels as mk

from .base import Method

__all__ = ["CIA", "WithDEMA"]


class WithDEMA:
    """Mixin: ``mk.DEMA`` after every optimizer step, the adapters take their EMA values at
    each task's end. Used by CIA (on one LoRA) and by ``mage-dema`` (on EW + GA)."""

    def setup(self, model, prepare=None) -> None:
        super().setup(model, prepare)
        self.dema = mk.DEMA(model)
        self._engine_sharding = False  # whether the last task's engine gave DEMA its sharding (DeepSpeed)

    def before_task(self, task, task_index: int) -> None:
        super().before_task(task, task_index)
        if not self._engine_sharding:  # else bind_steps starts it, on the task's new engine
            self.dema.start_task()

    def bind_steps(self, steps) -> None:
        self._engine_sharding = steps.sharding is not None
        if self._engine_sharding:  # DeepSpeed: this task's engine holds the partitions
            self.dema.start_task(sharding=steps.sharding)

    def after_step(self, fisher) -> None:
        self.dema.update()

    def after_task(self, task, train_batches) -> None:
        self.dema.finish_task()

    def state_bytes(self) -> int:
        return int(mk.persistent_state_bytes(self.dema))

    def diagnostics(self):
        """Share of DEMA's per-tensor updates this task that used the fallback alpha (ALGORITHM.md section 4)."""
        total = self.dema.steps * len(self.dema.params)
        return {"dema_fallback_fraction": self.dema.fallback_count / total if total else float("nan")}


class CIA(WithDEMA, Method):
    name = "cia"
    summary = "CIA without instruction grouping: layer-wise dynamic EMA (DEMA) of one rank-32 LoRA"
