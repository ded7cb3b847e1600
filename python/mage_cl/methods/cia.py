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

from .base import Method, WithTaskEMA

__all__ = ["CIA", "WithDEMA"]


class WithDEMA(WithTaskEMA):
    """Mixin: ``mk.DEMA`` after every optimizer step, the adapters take their EMA values at
    each task's end. Used by CIA (on one LoRA) and by ``mage-dema`` (on EW + GA)."""

    def make_ema(self, model):
        return mk.DEMA(model)

    @property
    def dema(self):
        return self.ema

    def diagnostics(self):
        """Share of DEMA's per-tensor updates this task that used the fallback alpha (ALGORITHM.md section 4)."""
        total = self.dema.steps * len(self.dema.params)
        return {"dema_fallback_fraction": self.dema.fallback_count / total if total else float("nan")}


class CIA(WithDEMA, Method):
    name = "cia"
    summary = "CIA without instruction grouping: layer-wise dynamic EMA (DEMA) of one rank-32 LoRA"
