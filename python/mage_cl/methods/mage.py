"""MAGE and its ablations on the four equally weighted adapters (SPEC sections 1-3; paper Table 4).

* ``ew``     -- four rank-8 adapters summed with equal weights, all four trained on every task.
* ``ew-ga``  -- the same plus MAGE's modality freezing (``mk.for_task``): only the adapters
  matching the task's input and output modalities train (SPEC section 1's table).
* ``mage``   -- EW+GA plus the parameter-wise EMA (PEMA, SPEC section 3): the per-sample Fisher
  of every step (``mk.Fisher``, SPEC section 2) drives ``mk.PEMA.update`` after each optimizer
  step, and at the end of the task the adapters take their EMA values (``finish_task``).
"""

from __future__ import annotations

import mage_kernels as mk

from .base import Method

__all__ = ["EW", "EWGA", "MAGE"]


class EW(Method):
    """Equal-weight sum of four adapters (MoELoRA's router replaced by equal weights)."""

    name = "ew"
    num_adapters = 4


class EWGA(EW):
    """EW + the General/expert Adapter freezing by task modality."""

    name = "ew-ga"

    def before_task(self, task, task_index: int) -> None:
        mk.for_task(self.model, sorted(task.inputs), task.output)


class MAGE(EWGA):
    """EW + GA + PEMA (the paper's method)."""

    name = "mage"
    needs_fisher = True

    def __init__(self, config=None, lam: float = 1e-5, beta_fallback: float = 0.99) -> None:
        super().__init__(config)
        self.lam = lam
        self.beta_fallback = beta_fallback
        self.pema = None

    def setup(self, model) -> None:
        super().setup(model)
        self.pema = mk.PEMA(model, lam=self.lam, beta_fallback=self.beta_fallback)

    def before_task(self, task, task_index: int) -> None:
        super().before_task(task, task_index)
        self.pema.start_task()

    def after_step(self, fisher) -> None:
        if fisher is None:
            raise RuntimeError("MAGE needs the step's Fisher; the trainer must pass mk.Fisher")
        self.pema.update(fisher)

    def after_task(self, task, train_batches) -> None:
        self.pema.finish_task()

    def state_bytes(self) -> int:
        return int(mk.persistent_state_bytes(self.pema))

    def diagnostics(self):
        """Share of PEMA's elementwise updates this task that used ``beta_fallback`` (SPEC section 3)."""
        total = self.pema.steps * sum(p.numel() for p in self.pema.params)
        return {"pema_fallback_fraction": self.pema.fallback_count / total if total else float("nan")}
