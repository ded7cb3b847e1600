"""PEMA (MAGE, ALGORITHM.md §3) and the DEMA / CIA baseline (ALGORITHM.md §4).

Both keep an exponential moving average ``theta*`` of every trainable adapter
tensor over a task, updated after each optimizer step, and copy it into the
weights at the end of the task. They share one interface::

    pema = mage_kernels.PEMA(model)            # theta* <- theta (task start)
    for batch in task:
        fisher.reset(); loss(batch).backward(); optimizer.step()
        pema.update(fisher)                    # uses p.grad and F; before zero_grad()
        optimizer.zero_grad()
    pema.finish_task()                         # theta <- theta*

PEMA, per element (the project's diagonal, elementwise form of the paper's
Eq. 3-4; the authors' code inverts an n x n matrix per tensor and never clamps,
this fallback is the documented design decision of ALGORITHM.md section 3)::

    beta   = (g + 1) / (F * (theta - theta*) + lam)
    beta   = beta if 0 < beta < 1 else beta_fallback
    theta* = beta * theta* + (1 - beta) * theta        (kept when not finite)

It runs as the custom op ``torch.ops.mage.pema_update_`` (one fused
multi-tensor Triton launch per tensor group, see :mod:`mage_kernels.kernels.pema`;
the ``"torch"`` backend is :func:`mage_kernels.reference.pema_update_foreach_`).
Persistent state: one ``theta*`` per trained tensor (``F`` is per-step workspace).

Host cost of :meth:`PEMA.update` on the Triton path (the default on CUDA): the
inputs are validated and the kernel's pointer tables built ONCE (the first
update of a task, or when a tracked tensor's storage changes), in a cached
:class:`_PemaPlan`. Each later call reads the gradients (``p.grad``) and
compares their addresses and the parameters' with the cached ones (one tuple
comparison), checks the Fisher's buffers by identity, and launches; ``F`` is
the Fisher's running sums divided by its sample count inside the kernel, so no
per-step ``F`` tensors are made. With ``pema.cuda_graph = True`` the launches
are captured in a CUDA graph on the second call and replayed from then on
(one graph launch per update). A ``{name: F}`` mapping, ``grads=``, or the
``torch`` / ``cuda`` backends take the general path: the op, validated per call.

DEMA (CIA), one scalar per tensor::

    a = |theta - theta*|_1,  b = |g|_1,  c = |g - g_prev|_1
    alpha = 2 (1 + b) / (a c), alpha_fallback unless 0 < alpha < 1
    theta* = (1 - alpha) theta* + alpha theta;  g_prev = g

The norms are computed in float64 from the tensors' exact values (never
rounded to a bf16/fp16 parameter dtype); the one implementation is
:func:`mage_kernels.reference.dema_step_`.
Persistent state: ``theta*`` AND ``g_prev``. ``g_prev`` starts as zeros at the
task start, so the first step has ``c = |g|_1``.

:class:`FixedEMA` is the same interface at one fixed rate (``theta* = decay * theta* + (1 -
decay) * theta``, no gradient, no Fisher): the LAE baseline's stable EMA, and the rate PEMA
falls back to.

Distributed training (ALGORITHM.md §7): under DDP every rank holds the whole
state; under FSDP2 (DTensor parameters, detected) and DeepSpeed ZeRO
(``sharding=mage_kernels.integrations.deepspeed.ZeroSharding(engine)``) each rank
holds and updates only its part of ``theta*`` / ``g_prev`` (see
:mod:`mage_kernels.sharding`); DEMA's norms and the counters are summed over the
ranks, ``state_dict`` gathers whole tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import reference
from .backends import BACKENDS, resolve_backend, use_backend
from .inject import adapter_parameters
from .sharding import LocalPart, Sharding, WholeTensor, all_reduce_parts

__all__ = ["PEMA", "DEMA", "FixedEMA", "pema_update_"]

#: Where :meth:`PEMA.update` / :meth:`DEMA.update` read the step's gradients: ``None`` (each
#: tensor's ``.grad``), a ``{name: tensor}`` mapping, or a sequence in the tracked order.
GradSource = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]

_PEMA_SCHEMA = (
    "(Tensor[] params, Tensor(a!)[] emas, Tensor[] grads, Tensor[] fishers, float lam, float beta_fallback) -> Tensor"
)


def _validate(params, emas, grads, fishers) -> None:
    n = len(emas)
    if not (len(params) == len(grads) == len(fishers) == n):
        raise ValueError(
            f"pema_update_ needs lists of equal length; got params={len(params)}, emas={n}, "
            f"grads={len(grads)}, fishers={len(fishers)}"
        )
    if n == 0:
        return
    dev = emas[0].device
    for i, (p, e, g, f) in enumerate(zip(params, emas, grads, fishers)):
        for what, t in (("param", p), ("ema", e), ("grad", g), ("fisher", f)):
            if not t.is_floating_point():
                raise TypeError(f"pema_update_: {what} {i} must be floating point; got {t.dtype}")
            if t.shape != e.shape:
                raise ValueError(f"pema_update_: {what} {i} has shape {tuple(t.shape)} but its ema has {tuple(e.shape)}")
            if t.device != dev:
                raise ValueError(f"pema_update_: {what} {i} is on {t.device} but ema 0 is on {dev}; use one device")
        if not e.is_contiguous():
            raise ValueError(f"pema_update_: ema {i} must be contiguous (it is updated in place)")


@torch.library.custom_op("mage::pema_update_", mutates_args=("emas",), schema=_PEMA_SCHEMA)
def _pema_update_op(
    params: List[torch.Tensor],
    emas: List[torch.Tensor],
    grads: List[torch.Tensor],
    fishers: List[torch.Tensor],
    lam: float,
    beta_fallback: float,
) -> torch.Tensor:
    _validate(params, emas, grads, fishers)
    if not emas:
        return torch.zeros(2, dtype=torch.int64)
    name = resolve_backend(emas[0].device, "pema_update_")
    if name == "torch":
        counts = reference.pema_update_foreach_(params, emas, grads, fishers, lam, beta_fallback)
    elif name == "cuda":
        from . import cuda_extension  # noqa: F401  (registers torch.ops.mage_cuda)

        counts = torch.ops.mage_cuda.pema_update_(params, emas, grads, fishers, lam, beta_fallback)
    else:
        from .kernels import pema as triton_pema

        counts = triton_pema.pema_update_(params, emas, grads, fishers, lam, beta_fallback)
    return counts


@_pema_update_op.register_fake
def _(params, emas, grads, fishers, lam, beta_fallback):
    return torch.empty(2, dtype=torch.int64, device=emas[0].device if len(emas) else "cpu")


def pema_update_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    lam: float = 1e-5,
    beta_fallback: float = 0.99,
) -> torch.Tensor:
    """PEMA update of ``emas`` in place (ALGORITHM.md section 3); the functional form of :class:`PEMA`.

    Args:
        params: the current weights ``theta`` (after the optimizer step).
        emas: the EMA copies ``theta*`` (contiguous; updated in place).
        grads: the step's batch gradients ``g``.
        fishers: the step's Fisher diagonals ``F`` (:class:`mage_kernels.Fisher`).
        lam: the damping ``lambda`` (1e-5 in the paper).
        beta_fallback: ``beta`` used where the formula's value is not in ``(0, 1)``.

    Returns:
        ``int64[2]`` on the tensors' device: (elements that used the fallback,
        elements skipped because the result was not finite). No host sync.
    """
    with torch.no_grad():
        return torch.ops.mage.pema_update_(
            [p.detach() for p in params], list(emas), [g.detach() for g in grads], [f.detach() for f in fishers],
            float(lam), float(beta_fallback),
        )


# ----------------------------------------------------------------------------- classes


class _TaskEMA:
    """What PEMA, DEMA and FixedEMA share: the theta* snapshot, finish_task, counters, state.

    Under a sharding engine (ALGORITHM.md §7) every per-element tensor here is this
    rank's part only (:attr:`parts`): ``theta*`` of the elements the rank owns, updated
    from the matching parts of ``theta``, ``g`` and ``F``; nothing is gathered per step.
    """

    def __init__(self, model: nn.Module, sharding: Optional[Sharding] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module; got {type(model).__name__}")
        self.model = model
        self.sharding: Sharding = Sharding()
        self._set_sharding(sharding)
        self.names: List[str] = []
        self.params: List[nn.Parameter] = []
        self.parts: List[LocalPart] = []
        self.emas: List[torch.Tensor] = []
        self._counts: Optional[torch.Tensor] = None  # device int64 [2], running totals
        self._last: Optional[Tuple[torch.Tensor, int]] = None  # (counts of the last update, its size)
        self.steps = 0
        self.start_task()

    def _set_sharding(self, sharding: Optional[Sharding]) -> None:
        if sharding is None:
            return
        if not isinstance(sharding, Sharding):
            raise TypeError(f"sharding must be a mage_kernels.sharding.Sharding; got {type(sharding).__name__}")
        self.sharding = sharding

    def start_task(self, sharding: Optional[Sharding] = None) -> None:
        """Snapshot ``theta* <- theta`` for the currently trainable adapters (start of a task).

        ``sharding`` replaces the one given at construction (e.g. a new DeepSpeed
        engine built for this task's trainable adapters).
        """
        self._set_sharding(sharding)
        named = list(adapter_parameters(self.model, trainable_only=True))
        if not named:
            raise ValueError("the model has no trainable adapter parameters (set_trainable / for_task first)")
        self.emas = []  # free the previous task's buffers before allocating
        self.parts = []
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.parts = self.sharding.parts(self.names, self.params)
        with torch.no_grad():
            self.emas = [part.theta().detach().clone(memory_format=torch.contiguous_format) for part in self.parts]
        self._sharded = any(part.sharded for part in self.parts)
        self._count_groups = self._shard_groups() if self._sharded else ()
        self._counts = None
        self._last = None
        self.steps = 0

    @property
    def numel(self) -> int:
        """Elements of the tracked tensors, whole (the same on every rank)."""
        return sum(part.numel for part in self.parts)

    def _gradients(self, grads: Optional[GradSource]) -> List[torch.Tensor]:
        """The step's gradient of every tracked tensor's local part, in :attr:`names` order; raises when one is missing.

        ``grads`` is ``None`` (read each part's gradient: ``p.grad``, its DTensor shard, or what
        a DeepSpeed :class:`~mage_kernels.integrations.deepspeed.ZeroSharding` captured in
        ``engine.step()``), a ``{name: tensor}`` mapping or a sequence aligned with
        :attr:`names` -- whole tensors, DTensors or this rank's parts.
        """
        what = type(self).__name__
        if grads is None:
            found = [part.grad() for part in self.parts]
        elif isinstance(grads, Mapping):
            found = [grads.get(n) for n in self.names]
        elif isinstance(grads, (list, tuple)):
            if len(grads) != len(self.params):
                raise ValueError(f"{what}.update: got {len(grads)} gradients for {len(self.params)} tracked tensors")
            found = list(grads)
        else:
            raise TypeError(f"{what}.update: grads must be None, a mapping name -> tensor or a sequence; "
                            f"got {type(grads).__name__}")
        out = []
        for name, part, g in zip(self.names, self.parts, found):
            if g is None:
                where = getattr(part, "missing_grad", "p.grad is None") if grads is None else "no entry in grads"
                raise RuntimeError(
                    f"{what}.update: no gradient for the trainable adapter {name} ({where}): {part.grad_advice}"
                )
            if not isinstance(g, torch.Tensor):
                raise ValueError(f"{what}.update: gradient of {name} is a {type(g).__name__}, not a tensor")
            out.append(part.localize(g, f"{what}.update: gradient"))
        return out

    def _local_inputs(self, fisher: object, grads: Optional[GradSource]
                      ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """This rank's parts of ``theta``, ``g`` and ``F`` for every tracked tensor (whole tensors when unsharded)."""
        grad_list = self._gradients(grads)
        if isinstance(fisher, Mapping):
            missing = [n for n in self.names if n not in fisher]
            if missing:
                raise KeyError(f"no Fisher given for {missing[:5]}")
            fishers = [part.localize(fisher[n], "Fisher") for n, part in zip(self.names, self.parts)]
        elif hasattr(fisher, "for_parameters"):
            fishers = (fisher.for_parameters(self.params, parts=self.parts) if self._sharded
                       else fisher.for_parameters(self.params))
        else:
            raise TypeError(f"fisher must be a mage_kernels.Fisher or a mapping name -> tensor; got {type(fisher).__name__}")
        if not self._sharded and all(isinstance(part, WholeTensor) for part in self.parts):
            return self.params, grad_list, fishers
        return [part.theta() for part in self.parts], grad_list, fishers

    def _shard_groups(self) -> Tuple[object, ...]:
        """The one set of process groups every tracked tensor is sharded over (counts are summed over it)."""
        groups = {tuple(id(g) for g in part.sum_groups()): part.sum_groups() for part in self.parts}
        if len(groups) != 1 or () in groups:
            raise NotImplementedError(
                f"{type(self).__name__}: the trainable adapters are sharded over different process groups (or some "
                "are held whole); shard every adapter of the model the same way (e.g. fully_shard the root module too)"
            )
        return next(iter(groups.values()))

    def _sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-rank counts of the owned elements -> whole-tensor counts (every rank gets the sum)."""
        import torch.distributed as dist

        total = counts.clone()
        for g in self._count_groups:
            dist.all_reduce(total, group=g)
        return total

    def _record(self, counts: torch.Tensor, size: int) -> None:
        self._counts = counts.clone() if self._counts is None else self._counts + counts
        self._last = (counts, size)
        self.steps += 1

    # counters: lazy (reading them syncs with the device; updating does not)
    @property
    def counts(self) -> torch.Tensor:
        """Running totals ``int64[2]`` on the device: (fallbacks, non-finite), no host sync.

        Under sharding they count the whole tensors (summed over the ranks), the same on every rank.
        """
        return self._counts if self._counts is not None else torch.zeros(2, dtype=torch.int64)

    @property
    def fallback_count(self) -> int:
        return int(self.counts[0])

    @property
    def nonfinite_count(self) -> int:
        return int(self.counts[1])

    @property
    def last_fallback_fraction(self) -> float:
        if self._last is None or self._last[1] == 0:
            return 0.0
        return float(self._last[0][0]) / self._last[1]

    def finish_task(self) -> List[str]:
        """``theta <- theta*`` for every tracked tensor; skips (and warns about) tensors whose EMA is not finite.

        Under sharding each rank writes its own part, and a tensor is skipped on every
        rank when any rank's part is not finite (a collective: every rank calls it).
        Returns the names of the skipped tensors.
        """
        if not self.emas:
            return []
        with torch.no_grad():
            bad = torch.stack([(~torch.isfinite(e)).any() for e in self.emas]).to(torch.float64)
            if self._sharded:
                all_reduce_parts(self.parts, bad[None], op="max")
            flags = bad.tolist()
            skipped = [name for name, f in zip(self.names, flags) if f]
            for part, e, f in zip(self.parts, self.emas, flags):
                if not f:
                    part.assign(e)
        self.sharding.after_assign()
        if skipped:
            warnings.warn(
                f"{type(self).__name__}.finish_task: kept the trained weights of {len(skipped)} tensor(s) whose EMA "
                f"holds NaN/inf: {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}",
                RuntimeWarning,
                stacklevel=2,
            )
        return skipped

    def persistent_tensors(self) -> List[torch.Tensor]:
        """The tensors held between steps (this rank's parts under sharding)."""
        return list(self.emas)

    def state_bytes(self) -> int:
        """Persistent bytes held (measured on the tensors, see :func:`mage_kernels.persistent_state_bytes`)."""
        from .memory import persistent_state_bytes

        return persistent_state_bytes(self)

    def _full(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [part.gather(t).detach().clone() for part, t in zip(self.parts, tensors)]

    def state_dict(self) -> Dict[str, object]:
        """``{"kind", "names", "emas", "steps"}`` with WHOLE tensors on every rank (``kind``: the class name).

        Under sharding the parts are gathered here, once (a collective: every rank
        calls it; let rank 0 write the file). It loads into a sharded or a
        single-process object alike.
        """
        return {"kind": type(self).__name__, "names": list(self.names), "emas": self._full(self.emas),
                "steps": self.steps}

    def _load_parts(self, targets: Sequence[torch.Tensor], values: Sequence[object], what: str) -> None:
        values = list(values)
        if len(values) != len(targets):
            raise ValueError(f"state_dict holds {len(values)} {what} for {len(targets)} tracked tensors")
        staged = []
        for name, part, t, v in zip(self.names, self.parts, targets, values):
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{what} of {name} is a {type(v).__name__}, not a tensor")
            staged.append((t, part.localize(v, what)))
        with torch.no_grad():
            for t, v in staged:
                t.copy_(v)

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Load :meth:`state_dict` (whole tensors; each rank keeps its part) of the same kind of EMA."""
        kind = state.get("kind")
        if kind is not None and kind != type(self).__name__:
            raise ValueError(f"state_dict is a {kind}'s, not a {type(self).__name__}'s")
        if list(state["names"]) != self.names:
            raise KeyError("state_dict tensors do not match this object's tracked parameters (call start_task() first?)")
        self._load_parts(self.emas, state["emas"], "EMA")
        self.steps = int(state.get("steps", 0))


_FISHER_A = operator.attrgetter("fisher_a")
_FISHER_B = operator.attrgetter("fisher_b")
_GRAD = operator.attrgetter("grad")


class _PemaPlan:
    """What :meth:`PEMA.update` keeps between calls on the Triton path (module docstring).

    Built from the PEMA object's tracked tensors, the Fisher object's sum buffers
    and the current gradients, after validating them once. :meth:`matches` is the
    per-call check; :meth:`step` runs one update.
    """

    def __init__(self, pema: "PEMA", fisher, grads: List[torch.Tensor]) -> None:
        from .kernels.pema import PemaLaunch

        sums = []
        for p in pema.params:
            where = fisher._param_index.get(id(p))
            if where is None:
                raise KeyError("a tensor is not an adapter parameter (lora_A[k] / lora_B[k]) of a layer this "
                               "Fisher tracks")
            sums.append(fisher._sum_view(*where))
        _validate(pema.params, pema.emas, grads, sums)
        self.fisher = fisher
        self.emas = pema.emas
        self.layers = [layer for _, layer in fisher.layers]
        self.buffers_a = [layer.fisher_a for layer in self.layers]
        self.buffers_b = [layer.fisher_b for layer in self.layers]
        self.param_ptrs = tuple(p.data_ptr() for p in pema.params)
        self.numel = sum(p.numel() for p in pema.params)
        self.launch = PemaLaunch([p.detach() for p in pema.params], pema.emas, grads, sums)
        self.last_grads = list(grads)
        self.graph = None  # torch.cuda.CUDAGraph once captured
        self.graph_counts: Optional[torch.Tensor] = None
        self.eager_steps = 0

    def matches(self, pema: "PEMA", fisher) -> bool:
        """The O(1)-per-tensor check of every call: same Fisher, buffers and EMA list, parameters in place."""
        if fisher is not self.fisher or pema.emas is not self.emas:
            return False
        if not (all(map(operator.is_, map(_FISHER_A, self.layers), self.buffers_a))
                and all(map(operator.is_, map(_FISHER_B, self.layers), self.buffers_b))):
            return False
        return tuple(map(torch.Tensor.data_ptr, pema.params)) == self.param_ptrs

    def same_grads(self, grads: List[torch.Tensor], ptrs: Tuple[int, ...]) -> bool:
        """The very gradient tensors of the last call, at the same addresses (then their layout,
        checked then, still holds)."""
        return ptrs == self.launch.grad_ptrs and all(map(operator.is_, grads, self.last_grads))

    def step(self, grad_ptrs: Tuple[int, ...], lam: float, beta_fallback: float, cuda_graph: bool) -> torch.Tensor:
        self.launch.set_grads(grad_ptrs)
        self.launch.set_divisor(self.fisher._divisor())
        device = self.launch.device
        if not (cuda_graph and device.type == "cuda"):
            counts = torch.zeros(2, dtype=torch.int64, device=device)
            self.launch.run(counts, lam, beta_fallback)
            self.eager_steps += 1
            return counts
        if self.graph is None:
            if self.eager_steps == 0:  # the first call compiles the kernels: run it eagerly
                counts = torch.zeros(2, dtype=torch.int64, device=device)
                self.launch.run(counts, lam, beta_fallback)
                self.eager_steps += 1
                return counts
            self.graph_counts = torch.zeros(2, dtype=torch.int64, device=device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_counts.zero_()
                self.launch.run(self.graph_counts, lam, beta_fallback)
            self.graph_lam = (lam, beta_fallback)
        if self.graph_lam != (lam, beta_fallback):
            raise RuntimeError("PEMA.cuda_graph: lam/beta_fallback changed after the graph was captured; "
                               "call start_task() to recapture")
        self.graph.replay()
        return self.graph_counts.clone()


class PEMA(_TaskEMA):
    """Parameter-wise EMA of MAGE (ALGORITHM.md §3) over the model's trainable adapters.

    Args:
        model: a :class:`MageLinear` or a model containing them. The tensors
            tracked are the adapters trainable when the object is created (or at
            :meth:`start_task`).
        lam: the damping ``lambda``.
        beta_fallback: ``beta`` where the formula leaves ``(0, 1)`` (NaN/inf too).
        backend: ``"triton" | "cuda" | "torch" | "auto"``; ``None`` follows
            :func:`mage_kernels.set_backend`.
        sharding: where this rank's part of each tensor lives (ALGORITHM.md §7). The
            default handles one process, DDP and FSDP2 (DTensor shards) by itself;
            DeepSpeed ZeRO needs
            :class:`mage_kernels.integrations.deepspeed.ZeroSharding` ``(engine)``.

    Under sharding the update is shard-local: each rank updates ``theta*`` of the
    elements it owns from the matching parts of ``theta``, ``g`` and ``F``, with
    no gathering; the counters are summed over the ranks once per step (an
    ``int64[2]`` all-reduce), so they count the whole tensors on every rank.

    Counters (reading them syncs with the device; :meth:`update` does not):
    ``fallback_count`` (elements that used ``beta_fallback``), ``nonfinite_count``
    (elements skipped because the new ``theta*`` would not be finite),
    ``last_fallback_fraction`` (share of the last update's elements that fell back).

    ``cuda_graph`` (attribute, default ``False``): on the Triton path with CUDA
    tensors, capture the update in a CUDA graph on its second call and replay it
    afterwards (the first call compiles the kernels). The graph reads the
    gradients' and the Fisher count through device tables that each call
    refreshes, so it stays valid across steps; :meth:`start_task` drops it.
    """

    cuda_graph: bool = False
    _plan: Optional[_PemaPlan] = None

    def __init__(self, model: nn.Module, lam: float = 1e-5, beta_fallback: float = 0.99,
                 backend: Optional[str] = None, sharding: Optional[Sharding] = None) -> None:
        if not lam > 0:
            raise ValueError(f"lam must be positive; got {lam}")
        if not 0 < beta_fallback < 1:
            raise ValueError(f"beta_fallback must be in (0, 1); got {beta_fallback}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.lam = float(lam)
        self.beta_fallback = float(beta_fallback)
        self.backend = backend
        super().__init__(model, sharding)

    def start_task(self, sharding: Optional[Sharding] = None) -> None:
        self._plan = None  # the new task tracks new tensors: rebuild the tables on the next update
        super().start_task(sharding)

    def _fast_update(self, fisher) -> Optional[torch.Tensor]:
        """The cached-plan path of :meth:`update` (module docstring); ``None`` when it does not apply."""
        if not hasattr(fisher, "_param_index") or not self.emas:
            return None
        ctx = use_backend(self.backend) if self.backend is not None else contextlib.nullcontext()
        with ctx:
            if resolve_backend(self.emas[0].device, "pema_update_") != "triton":
                return None
        grads = list(map(_GRAD, self.params))
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            self._gradients(None)  # raises the RuntimeError naming the tensor
        plan = self._plan
        if plan is None or not plan.matches(self, fisher):
            if not all(map(torch.Tensor.is_contiguous, grads)):
                return None  # the general path makes contiguous copies
            self._plan = plan = _PemaPlan(self, fisher, grads)
        ptrs = tuple(map(torch.Tensor.data_ptr, grads))
        if not plan.same_grads(grads, ptrs):  # other tensors, or storage moved: check the layout again
            if not all(map(torch.Tensor.is_contiguous, grads)):
                return None
            plan.last_grads = grads
        from .kernels.pema import TablesStale

        try:
            counts = plan.step(ptrs, self.lam, self.beta_fallback, self.cuda_graph)
        except TablesStale:  # a gradient the vector path cannot take: regroup (before anything ran)
            self._plan = plan = _PemaPlan(self, fisher, grads)
            counts = plan.step(ptrs, self.lam, self.beta_fallback, self.cuda_graph)
        self._record(counts, plan.numel)
        return counts

    def update(self, fisher: Union["Fisher", Mapping[str, torch.Tensor]],  # noqa: F821
               grads: Optional[GradSource] = None) -> torch.Tensor:
        """One PEMA step after ``optimizer.step()``: every tracked tensor's gradient and its Fisher.

        ``fisher`` is a :class:`mage_kernels.Fisher` or a ``{name: F}`` mapping
        (``Fisher.values()``). ``grads`` defaults to each tensor's ``.grad``; pass a
        ``{name: g}`` mapping (or a list in :attr:`names` order) when the training engine
        keeps gradients elsewhere (whole tensors or this rank's parts). A tracked tensor
        without a gradient raises ``RuntimeError`` naming it and saying how this engine's
        gradients are passed (nothing is updated or counted).
        Returns this step's counts ``int64[2]`` (device tensor; whole-tensor counts under sharding).
        """
        if grads is None and not isinstance(fisher, Mapping) and not self._sharded:
            counts = self._fast_update(fisher)
            if counts is not None:
                return counts
        params, grad_list, fishers = self._local_inputs(fisher, grads)
        ctx = use_backend(self.backend) if self.backend is not None else contextlib.nullcontext()
        with ctx:
            counts = pema_update_(params, self.emas, grad_list, fishers, self.lam, self.beta_fallback)
        if self._sharded:
            counts = self._sum_counts(counts)
        self._record(counts, self.numel)
        return counts


class DEMA(_TaskEMA):
    """The CIA baseline's layer-wise EMA (ALGORITHM.md section 4): one scalar ``alpha`` per tensor.

    Same interface as :class:`PEMA`; :meth:`update` ignores its ``fisher``
    argument. Keeps ``theta*`` and ``g_prev`` (zeros at the task start, so the
    first step uses ``c = |g|_1``). Counters count TENSORS here:
    ``fallback_count`` (updates that used ``alpha_fallback``), ``nonfinite_count``
    (updates whose ``a``, ``b`` or ``c`` was not finite; DEMA, as specified, does
    not guard against them), ``last_alphas`` (float64, the last step's alphas).
    """

    def __init__(self, model: nn.Module, alpha_fallback: float = 0.01, sharding: Optional[Sharding] = None) -> None:
        if not 0 < alpha_fallback < 1:
            raise ValueError(f"alpha_fallback must be in (0, 1); got {alpha_fallback}")
        self.alpha_fallback = float(alpha_fallback)
        self.prev_grads: List[torch.Tensor] = []
        self.last_alphas: Optional[torch.Tensor] = None
        super().__init__(model, sharding)

    def start_task(self, sharding: Optional[Sharding] = None) -> None:
        self.prev_grads = []
        super().start_task(sharding)
        self.prev_grads = [torch.zeros_like(e) for e in self.emas]
        self.last_alphas = None

    def update(self, fisher: object = None, grads: Optional[GradSource] = None) -> torch.Tensor:
        """One DEMA step after ``optimizer.step()``; returns the alphas (float64, device).

        Gradients as in :meth:`PEMA.update` (``.grad`` by default, or ``grads``); a tracked
        tensor without one raises ``RuntimeError`` naming it. Under sharding the three L1
        norms of each tensor are summed over the ranks (one float64 all-reduce per step),
        so every rank uses the whole-tensor alpha on its own part.
        """
        grad_list = self._gradients(grads)
        params = [part.theta() for part in self.parts]
        sums = {"reduce_norms": lambda norms: all_reduce_parts(self.parts, norms)} if self._sharded else {}
        with torch.no_grad():
            alpha, counts = reference.dema_step_(params, self.emas, grad_list, self.prev_grads,
                                                 self.alpha_fallback, **sums)
        self.last_alphas = alpha
        self._record(counts, len(self.params))
        return alpha

    def persistent_tensors(self) -> List[torch.Tensor]:
        return list(self.emas) + list(self.prev_grads)

    def state_dict(self) -> Dict[str, object]:
        out = super().state_dict()
        out["prev_grads"] = self._full(self.prev_grads)
        return out

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        super().load_state_dict(state)
        self._load_parts(self.prev_grads, state["prev_grads"], "g_prev")


class FixedEMA(_TaskEMA):
    """A fixed-rate EMA of the trainable adapters: ``theta* <- decay * theta* + (1 - decay) * theta``.

    Same interface as :class:`PEMA` (``start_task``, ``update``, ``finish_task``,
    ``state_dict``); :meth:`update` reads neither gradients nor a Fisher. It is the LAE
    baseline's "stable EMA" (decay 0.99) and PEMA's fallback rate applied everywhere.
    Elementwise, so under a sharding engine each rank updates only its part (pass
    ``sharding=`` as for PEMA; FSDP2 DTensors are detected). Persistent state: ``theta*``.
    Its counters stay 0 (there is no formula to fall back from).
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, sharding: Optional[Sharding] = None) -> None:
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1); got {decay}")
        self.decay = decay
        super().__init__(model, sharding)

    def start_task(self, sharding: Optional[Sharding] = None) -> None:
        super().start_task(sharding)
        self._no_counts = torch.zeros(2, dtype=torch.int64, device=self.emas[0].device)

    def update(self, fisher: object = None, grads: Optional[GradSource] = None) -> None:
        """One EMA step after ``optimizer.step()``, on this rank's part of every tracked tensor.

        ``fisher`` and ``grads`` are accepted for PEMA's call signature and not read. The EMA is
        kept in the adapters' dtype (float32 in the driver; with bf16 adapters a decay of 0.99
        rounds each step's change away, as a bf16 EMA buffer does anywhere).
        """
        thetas = [part.theta().detach() for part in self.parts]
        with torch.no_grad():
            torch._foreach_mul_(self.emas, self.decay)
            torch._foreach_add_(self.emas, [t.to(e.dtype) for t, e in zip(thetas, self.emas)],
                                alpha=1.0 - self.decay)
        self._record(self._no_counts, self.numel)
