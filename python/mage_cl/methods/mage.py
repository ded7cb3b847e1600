"""MAGE, its ablations and its two update variants on the four equally weighted adapters.

(ALGORITHM.md §1-4 and §6; paper Table 4 and Fig. 8.)

* ``ew``     -- four rank-8 adapters summed with equal weights, all four trained on every task.
* ``ew-ga``  -- the same plus MAGE's modality freezing (``mk.for_task``): only the adapters
  matching the task's input and output modalities train (ALGORITHM.md §1's table).
* ``mage``   -- EW+GA plus the parameter-wise EMA (PEMA, ALGORITHM.md §3): the per-sample Fisher
  of every step (``mk.Fisher``, §2) drives ``mk.PEMA.update`` after each optimizer step, and at
  the end of the task the adapters take their EMA values (``finish_task``).
* ``mage-dema`` -- EW+GA with CIA's layer-wise DEMA (§4) in place of PEMA (the paper's Fig. 8
  comparison of the two updates).
* ``mage-authors`` -- EW+GA with PEMA as the authors' code writes it (§6: a dense ``d x d``
  inverse per tensor per step from batch-gradient squares, before the optimizer step, no clamp),
  a reference for how the elementwise form compares. Under FSDP2 / DeepSpeed it gathers every
  trained tensor and its gradient each step and keeps ``theta*`` whole on every rank
  (:class:`mage_kernels.sharding.Gathered`): the dense form cannot be shard-local.

``mage`` also records, per task, how PEMA's ``beta`` behaved: the share of elements where the
formula's value (not the fallback) was used, and the distribution of ``F * (theta - theta*)``
against ``g + 1`` (``beta`` lies in ``(0, 1)`` exactly when ``|F (theta - theta*) + lambda| >
|g + 1|`` with the same sign), as quantiles and log10 histograms in the run's ``diagnostics``.
"""

from __future__ import annotations

from typing import Dict, List

import torch

import mage_kernels as mk

from .base import Method, WithTaskEMA
from .cia import WithDEMA

__all__ = ["EW", "EWGA", "MAGE", "MAGEDEMA", "MAGEAuthors", "BetaTracker"]


class EW(Method):
    """Equal-weight sum of four adapters (MoELoRA's router replaced by equal weights)."""

    name = "ew"
    summary = "ablation: four rank-8 adapters summed with equal weights, all trained"
    num_adapters = 4


class EWGA(EW):
    """EW + the General/expert Adapter freezing by task modality."""

    name = "ew-ga"
    summary = "ablation: EW + modality freezing (only the task's adapters train)"

    def before_task(self, task, task_index: int) -> None:
        mk.for_task(self.model, sorted(task.inputs), task.output)


#: Edges of the log10 histograms of |F (theta - theta*)| and |g + 1| (one bin below and above).
LOG10_EDGES = tuple(range(-14, 5))
_QUANTILES = (0.0, 0.5, 0.9, 0.99, 1.0)


class BetaTracker:
    """Accumulates, over a task, what PEMA's ``beta = (g + 1) / (F (theta - theta*) + lambda)`` saw.

    ``observe`` is called before each PEMA update with the tensors the update uses. Quantiles
    come from a bounded sample of the elements (at most ``sample`` per step, evenly strided),
    the histograms and the in-range share from all of them.
    """

    def __init__(self, lam: float, sample: int = 4096) -> None:
        self.lam = lam
        self.sample = sample
        self.reset()

    def reset(self) -> None:
        self.elements = 0
        self.inside = 0
        self.hist_fd = [0] * (len(LOG10_EDGES) + 1)
        self.hist_g1 = [0] * (len(LOG10_EDGES) + 1)
        self._fd: List[torch.Tensor] = []
        self._g1: List[torch.Tensor] = []

    @staticmethod
    def _hist(values: torch.Tensor) -> List[int]:
        edges = torch.tensor([float(e) for e in LOG10_EDGES], dtype=torch.float64)
        logs = torch.log10(values.abs().double().clamp_min(1e-300))
        return torch.bincount(torch.bucketize(logs, edges), minlength=len(LOG10_EDGES) + 1).tolist()

    @torch.no_grad()
    def observe(self, params, emas, grads, fishers) -> None:
        fd = torch.cat([(f.double() * (p.double() - e.double())).reshape(-1) for p, e, f in zip(params, emas, fishers)])
        g1 = torch.cat([(g.double() + 1).reshape(-1) for g in grads])
        beta = g1 / (fd + self.lam)
        self.elements += fd.numel()
        self.inside += int(((beta > 0) & (beta < 1)).sum())
        self.hist_fd = [a + b for a, b in zip(self.hist_fd, self._hist(fd))]
        self.hist_g1 = [a + b for a, b in zip(self.hist_g1, self._hist(g1))]
        step = max(1, fd.numel() // self.sample)
        self._fd.append(fd[::step].abs().float())
        self._g1.append(g1[::step].abs().float())

    def summary(self) -> Dict[str, object]:
        if not self.elements:
            return {}
        q = torch.tensor(_QUANTILES)
        fd, g1 = torch.cat(self._fd), torch.cat(self._g1)
        return {
            "pema_beta_inside_fraction": self.inside / self.elements,
            "pema_abs_F_dtheta_quantiles": dict(zip(map(str, _QUANTILES), torch.quantile(fd, q).tolist())),
            "pema_abs_g_plus_1_quantiles": dict(zip(map(str, _QUANTILES), torch.quantile(g1, q).tolist())),
            "pema_log10_edges": list(LOG10_EDGES),
            "pema_hist_abs_F_dtheta": self.hist_fd,
            "pema_hist_abs_g_plus_1": self.hist_g1,
        }


class MAGE(WithTaskEMA, EWGA):
    """EW + GA + PEMA (the paper's method)."""

    name = "mage"
    summary = "MAGE: EW + modality freezing + parameter-wise EMA (PEMA) driven by the Fisher"
    needs_fisher = True

    def __init__(self, config=None, lam: float = 1e-5, beta_fallback: float = 0.99, track_beta: bool = True) -> None:
        super().__init__(config)
        self.lam = lam
        self.beta_fallback = beta_fallback
        self.ema = None  # mk.PEMA (setup)
        self.beta = BetaTracker(lam) if track_beta else None
        self._observe = self.beta is not None

    def make_ema(self, model):
        return mk.PEMA(model, lam=self.lam, beta_fallback=self.beta_fallback)

    @property
    def pema(self):
        return self.ema

    def before_task(self, task, task_index: int) -> None:
        super().before_task(task, task_index)
        if self.beta is not None:
            self.beta.reset()

    def bind_steps(self, steps) -> None:
        super().bind_steps(steps)
        # the beta statistics read whole p.grad and F; under FSDP2 / ZeRO they are not recorded
        self._observe = self.beta is not None and steps.plain_grads

    def after_step(self, fisher) -> None:
        if fisher is None:
            raise RuntimeError("MAGE needs the step's Fisher; the trainer must pass mk.Fisher")
        if self._observe:
            p = self.pema.params
            self.beta.observe(p, self.pema.emas, [t.grad for t in p], fisher.for_parameters(p))
        self.pema.update(fisher)

    def diagnostics(self):
        """PEMA's fallback share this task (exact, from the kernel's counter) and the beta statistics."""
        total = self.pema.steps * self.pema.numel
        out = {"pema_fallback_fraction": self.pema.fallback_count / total if total else float("nan")}
        if self.beta is not None:
            out.update(self.beta.summary())
        return out


class MAGEDEMA(WithDEMA, EWGA):
    """EW + GA + CIA's DEMA instead of PEMA (paper Fig. 8)."""

    name = "mage-dema"
    summary = "MAGE with CIA's layer-wise DEMA in place of PEMA (the paper's Fig. 8 comparison)"


class MAGEAuthors(EWGA):
    """EW + GA + PEMA as the authors' code writes it (ALGORITHM.md §6), before each optimizer step."""

    name = "mage-authors"
    summary = "MAGE with the authors' dense PEMA (a d x d inverse per tensor per step, no clamp)"

    def __init__(self, config=None, lam: float = 1e-5, fallback: float = 0.99) -> None:
        super().__init__(config)
        self.lam, self.fallback = lam, fallback

    def setup(self, model, prepare=None) -> None:
        super().setup(model, prepare)
        self.pema = None  # made at the first task's bind_steps, once the engine says how it holds the tensors

    def bind_steps(self, steps) -> None:
        """The task's start: theta* <- theta. Under FSDP2 / DeepSpeed the dense form needs whole tensors:
        theta* is kept whole on every rank and theta and g are gathered each step."""
        super().bind_steps(steps)
        sharding = mk.sharding.Sharding() if steps.plain_grads else mk.sharding.Gathered()
        if self.pema is None:
            self.pema = mk.AuthorsPEMA(self.model, lam=self.lam, fallback=self.fallback, sharding=sharding)
        else:
            self.pema.start_task(sharding=sharding)

    def before_step(self) -> None:
        # the whole gradients the optimizer will step with (p.grad under DDP; DeepSpeed: clipped as its step clips)
        self.pema.update(grads=self.steps.step_grads(self.pema.params))

    def after_task(self, task, train_batches) -> None:
        self.pema.finish_task()

    def state_bytes(self) -> int:
        return 0 if self.pema is None else int(mk.persistent_state_bytes(self.pema))

    def diagnostics(self):
        s = self.pema.stats
        return {"authors_alpha_outside_fraction": s.outside / s.elements if s.elements else float("nan"),
                **{f"authors_{k}": v for k, v in s.as_dict().items()}}
