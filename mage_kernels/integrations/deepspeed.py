"""Fisher, PEMA and DEMA under DeepSpeed ZeRO stages 1, 2 and 3 (ALGORITHM.md §7).

DeepSpeed keeps the gradients in its own partitioned buffers (``p.grad`` is
``None`` after ``engine.backward``) and frees them inside ``engine.step()``, and
under ZeRO the weights the optimizer updates are fp32 partitions of flattened
parameter groups. :class:`ZeroSharding` gives PEMA and DEMA this rank's part of
every trainable adapter -- the slice of the optimizer's fp32 partition it owns --
and captures the optimizer's gradient of that slice inside ``engine.step()``
(averaged over the ranks, unscaled and clipped: exactly what the optimizer
used), so the update after the step is shard-local and needs nothing gathered::

    import deepspeed, mage_kernels as mk
    from mage_kernels.integrations.deepspeed import ZeroSharding

    mk.for_task(model, {"text"}, "image")                 # choose the trainable adapters first
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    fisher = mk.Fisher(engine.module, loss_reduction="mean")
    pema = mk.PEMA(engine.module, sharding=ZeroSharding(engine))
    for ids in loader:                                    # this rank's micro-batch
        fisher.reset()
        engine.backward(per_sample_mean_loss(engine, ids))
        engine.step()                                     # ZeroSharding copies this rank's g here
        fisher.sync()                                     # F over the global batch
        pema.update(fisher)
    pema.finish_task()                                    # theta <- theta* in the fp32 partitions and the model
    state = mk.adapter_state_dict(engine.module)          # whole tensors (ZeRO-3: gathered); every rank calls it

``F`` is accumulated whole on every rank from the unsharded compute of the
backward (ZeRO-3 gathers each layer's adapters for it) and each rank reads its
slice. ``mk.adapter_state_dict`` / ``mk.load_adapter_state_dict`` and
``pema.state_dict()`` / ``load_state_dict`` work on whole tensors (gathered at
save time; a load writes the model's copy and the optimizer's fp32 master).

A new engine is needed when the trainable adapters change (the next task): pass
its sharding to ``pema.start_task(sharding=ZeroSharding(new_engine))``.

Only what was tested is claimed: fp32, gloo on CPU (``DS_ACCELERATOR=cpu``), a
client ``torch.optim`` optimizer, no optimizer offload, gradient accumulation 1.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..sharding import LocalPart, Sharding, is_deepspeed_param
from .deepspeed_params import gather_full, load_full_

__all__ = ["ZeroSharding", "gather_full", "load_full_"]

_ADVICE = ("under DeepSpeed ZeRO the gradient lives in the engine's partitions and is freed inside engine.step(): "
           "create the object with sharding=mage_kernels.integrations.deepspeed.ZeroSharding(engine) (it captures "
           "the optimizer's gradient inside engine.step()) and call update() after engine.step(), once per applied "
           "optimizer step (engine.was_step_applied()); or pass update(..., grads={name: grad})")


class _ZeroPart(LocalPart):
    """A contiguous range ``[start, start + n)`` of the flattened tensor: this rank's slice of an fp32 partition."""

    grad_advice = _ADVICE

    def __init__(self, name: str, param: torch.Tensor, sharding: "ZeroSharding", shape: Sequence[int],
                 start: int, n: int, hp: torch.Tensor, group: object) -> None:
        super().__init__(name, shape)
        self.param = param
        self.start, self.n = int(start), int(n)
        self._hp = hp
        self._group = group
        self._sharding = sharding
        self._grad: Optional[torch.Tensor] = None
        self._grad_step = -1

    @property
    def local_shape(self) -> torch.Size:
        return torch.Size([self.n])

    @property
    def missing_grad(self) -> str:
        return "no gradient captured from DeepSpeed's last optimizer step"

    def theta(self) -> torch.Tensor:
        return self._hp

    def grad(self) -> Optional[torch.Tensor]:
        fresh = self._sharding._captured_at(self._grad_step if self.n else self._sharding._last_capture)
        if not fresh:
            return None
        return self._grad if self.n else self._hp.new_empty(0)

    def _store(self, g: torch.Tensor, step: int) -> None:
        if self._grad is None or self._grad.shape != g.shape:
            self._grad = g.detach().clone()
        else:
            self._grad.copy_(g)
        self._grad_step = step

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.reshape(-1).narrow(0, self.start, self.n).to(self._hp.device)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(self.numel, dtype=local.dtype, device=local.device)
        flat.narrow(0, self.start, self.n).copy_(local.reshape(-1))
        dist.all_reduce(flat, group=self._group)  # the parts are disjoint and cover the tensor: an exact sum
        return flat.view(self.shape)

    def sum_groups(self) -> Tuple[object, ...]:
        return (self._group,)


class _FragmentPart(_ZeroPart):
    """ZeRO 1 / 2: the fragment of the parameter inside this rank's fp32 partition of its flattened group.

    The model's copy of the parameter is whole on every rank; DeepSpeed rebuilds it
    from the partitions after each step, and :meth:`ZeroSharding.after_assign` does so
    after ``finish_task`` / ``load_state_dict``.
    """

    def assign(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self._hp.copy_(value.reshape(-1))


class _PartitionPart(_ZeroPart):
    """ZeRO 3: the parameter's own partition (rank ``r`` owns flat elements ``[r P, r P + P)``)."""

    def assign(self, value: torch.Tensor) -> None:
        p = self.param
        with torch.no_grad():
            self._hp.copy_(value.reshape(-1))
            p.ds_tensor.data.view(-1).narrow(0, 0, self.n).copy_(value.reshape(-1))
            if p.data.numel() == p.ds_numel:  # a persistent (never released) parameter: refresh its whole copy
                p.data.copy_(self.gather(value.reshape(-1).to(p.dtype)).view(p.data.shape))


def _optimizer_step_counter(engine) -> int:
    return int(engine.micro_steps)


class ZeroSharding(Sharding):
    """This rank's ZeRO partitions of the trainable adapters, for :class:`~mage_kernels.PEMA` / :class:`~mage_kernels.DEMA`.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine`` (ZeRO stage 1, 2 or 3) that trains the
            model, built after the trainable adapters were chosen.

    It registers a post-step hook on the torch optimizer ZeRO wraps: while
    ``engine.step()`` runs the optimizer on this rank's fp32 partition, the hook
    copies that partition's gradient slice of every tracked adapter (one
    gradient-sized buffer of the rank's part, kept as step workspace). An update
    reads it only when it comes from the engine's last ``step()`` (otherwise the
    missing-gradient error). :meth:`remove` detaches the hook.
    """

    name = "deepspeed"

    def __init__(self, engine) -> None:
        stage = getattr(engine, "zero_optimization_stage", None)
        if stage is None:
            raise TypeError(f"ZeroSharding needs a deepspeed.DeepSpeedEngine; got {type(engine).__name__}")
        stage = int(stage())
        if stage not in (1, 2, 3):
            raise ValueError(
                f"ZeroSharding is for ZeRO stages 1, 2 and 3; this engine runs stage {stage} (without ZeRO the "
                "gradient is in p.grad until engine.step(): pass update(..., grads=...) captured before the step)"
            )
        zero = engine.optimizer
        base = getattr(zero, "optimizer", None)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"engine.optimizer.optimizer is a {type(base).__name__}; expected the torch optimizer "
                            "that ZeRO wraps")
        if getattr(zero, "swap_optimizer", False) or getattr(zero, "cpu_offload", False) or \
                getattr(zero, "offload_optimizer", False):
            raise NotImplementedError("ZeroSharding does not support optimizer offload (the fp32 partitions and "
                                      "gradients would live off the device); disable offload_optimizer")
        self.engine = engine
        self.stage = stage
        self._zero = zero
        # id(flat fp32 partition) -> (that tensor, kept alive so its id stays its own; [(part, offset)])
        self._flats: Dict[int, Tuple[torch.Tensor, List[Tuple[_ZeroPart, int]]]] = {}
        self._parts: Dict[int, _ZeroPart] = {}
        self._last_capture = -1
        self._hook = base.register_step_post_hook(self._capture)

    # ------------------------------------------------------------------ parts

    def parts(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> List[LocalPart]:
        out: List[LocalPart] = []
        for name, p in zip(names, params):
            part = self._parts.get(id(p))
            if part is None:
                part = self._make_part(name, p)
                self._parts[id(p)] = part
            out.append(part)
        return out

    def _not_in_engine(self, name: str) -> ValueError:
        return ValueError(
            f"the trainable adapter {name} is not in this DeepSpeed engine's optimizer; choose the trainable adapters "
            "(mk.for_task / set_trainable) before deepspeed.initialize, and build a new engine when they change"
        )

    def _make_part(self, name: str, p: torch.Tensor) -> _ZeroPart:
        if not is_deepspeed_param(p):
            raise self._not_in_engine(name)
        if self.stage == 3:
            zero = self._zero
            if not hasattr(p, "ds_id") or zero.get_param_id(p) not in zero.grad_position:
                raise self._not_in_engine(name)
            group_idx, dest, _ = zero.grad_position[zero.get_param_id(p)]
            group = getattr(p, "ds_process_group", None) or zero.dp_process_group
            size = int(p.ds_tensor.ds_numel)
            start = dist.get_rank(group=group) * size
            n = max(0, min(size, int(p.ds_numel) - start))
            flat = zero.fp32_partitioned_groups_flat[group_idx]
            hp = flat.narrow(0, int(dest), n)
            part: _ZeroPart = _PartitionPart(name, p, self, p.ds_shape, start, n, hp, group)
            self._flats.setdefault(id(flat), (flat, []))[1].append((part, int(dest)))
            return part
        if not hasattr(p, "_hp_mapping"):
            raise self._not_in_engine(name)
        mapping = p._hp_mapping
        group = p._dp_group
        if mapping is None:  # this rank's partitions hold no element of p
            return _FragmentPart(name, p, self, p.shape, 0, 0, torch.empty(0, device=p.device), group)
        flat = self._zero.single_partition_of_fp32_groups[mapping.param_group_index]
        part = _FragmentPart(name, p, self, p.shape, mapping.lp_fragment_address.start,
                             mapping.lp_fragment_address.numel, mapping.hp_fragment, group)
        self._flats.setdefault(id(flat), (flat, []))[1].append((part, int(mapping.hp_fragment_address.start)))
        return part

    # ------------------------------------------------------------------ gradients

    def _capture(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Post-step hook of the wrapped optimizer: copy the (averaged, clipped) gradient of each tracked slice."""
        step = _optimizer_step_counter(self.engine)
        self._last_capture = step
        for group in optimizer.param_groups:
            for flat in group["params"]:
                held = self._flats.get(id(flat))
                if held is None or held[0] is not flat or flat.grad is None:
                    continue
                for part, offset in held[1]:
                    part._store(flat.grad.narrow(0, offset, part.n), step)

    def _captured_at(self, step: int) -> bool:
        """Whether ``step`` is the engine's last ``step()`` (whose micro-step counter has since moved on by one)."""
        return step >= 0 and step == _optimizer_step_counter(self.engine) - 1

    def after_assign(self) -> None:
        if self.stage in (1, 2):  # the fp32 partitions were written: rebuild every rank's whole model copy
            self._zero.update_lp_params()

    def remove(self) -> None:
        """Detach the gradient hook from the engine's optimizer."""
        self._hook.remove()

    def __repr__(self) -> str:
        return f"ZeroSharding(stage={self.stage}, tracked={len(self._parts)})"


# gather_full / load_full_ (whole tensors) live in deepspeed_params, re-exported here.
