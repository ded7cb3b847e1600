"""Which part of each adapter tensor this rank holds, under every data-parallel engine (ALGORITHM.md §7).

PEMA is elementwise and DEMA needs only whole-tensor sums, so neither has to
see a whole sharded tensor: each rank keeps ``theta*`` (and DEMA's ``g_prev``)
for the elements it owns and updates them with the matching elements of
``theta``, ``g`` and ``F``. A :class:`LocalPart` is that view of one tracked
tensor; a :class:`Sharding` makes the parts of a model's tracked tensors.

==========================  ==========================================  ===============================
engine                      what a rank owns of a tensor                part
==========================  ==========================================  ===============================
one process, DDP            the whole tensor (every rank the same)      :class:`WholeTensor`
FSDP2 (``fully_shard``)     its DTensor local shard                     :class:`DTensorShard`
DeepSpeed ZeRO 1 / 2 / 3    its fp32 partition in the optimizer         ``mage_kernels.integrations.deepspeed``
any of them, gathered       the whole tensor, gathered when read        :class:`GatheredTensor`
==========================  ==========================================  ===============================

The default :class:`Sharding` handles whole tensors and DTensors by itself;
DeepSpeed's partitions need the engine
(:class:`mage_kernels.integrations.deepspeed.ZeroSharding`), and a model whose
adapters DeepSpeed partitions is refused without it (never silently treated
as whole tensors). :class:`Gathered` is for updates that cannot be elementwise (the
authors' dense PEMA, :class:`mage_kernels.AuthorsPEMA`): every rank holds the whole
``theta*`` and reads the whole ``theta`` each step (a gather), at the memory and
communication cost that implies.

:func:`full_tensor` and :func:`load_full_` read and write whole adapter tensors
of a sharded model (they are collectives where the engine shards: every rank
calls them); :func:`mage_kernels.adapter_state_dict` and
:func:`mage_kernels.load_adapter_state_dict` use them, so adapter checkpoints
hold full tensors under every engine.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "LocalPart",
    "WholeTensor",
    "DTensorShard",
    "Sharding",
    "GatheredTensor",
    "Gathered",
    "full_shape",
    "full_tensor",
    "load_full_",
    "all_reduce_parts",
    "is_deepspeed_param",
]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and gradients are)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_deepspeed_param(p: torch.Tensor) -> bool:
    """Whether DeepSpeed manages ``p`` (a ZeRO-3 partitioned parameter, or one a ZeRO 1/2 optimizer maps)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


class LocalPart:
    """This rank's part of one tracked tensor ``name`` (full shape :attr:`shape`).

    Subclasses say where the owned elements of ``theta`` and ``g`` live. Every
    tensor a part returns has the shape :attr:`local_shape`.
    """

    #: How to hand this engine's gradients to ``update()`` (ends the missing-gradient error).
    grad_advice: str = (
        "call update() after backward() and optimizer.step() but before zero_grad(); an engine that keeps "
        "gradients in its own buffers needs them passed: update(..., grads={name: grad}) (DeepSpeed ZeRO: create "
        "the object with sharding=mage_kernels.integrations.deepspeed.ZeroSharding(engine)); and create the object "
        "after wrapping the model (fully_shard and deepspeed.initialize replace or move the parameters)"
    )

    def __init__(self, name: str, shape: Sequence[int]) -> None:
        self.name = name
        self.shape = torch.Size(shape)

    @property
    def numel(self) -> int:
        """Elements of the whole tensor."""
        return self.shape.numel()

    @property
    def local_shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def sharded(self) -> bool:
        """Whether other ranks own other elements of the tensor."""
        return bool(self.sum_groups())

    def theta(self) -> torch.Tensor:
        """The owned elements of ``theta``: a view of the tensor the optimizer updates."""
        raise NotImplementedError

    def grad(self) -> Optional[torch.Tensor]:
        """The owned elements of the optimizer's gradient of the last step, or ``None``."""
        raise NotImplementedError

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The owned elements of a full-shaped tensor (``F``, a checkpoint entry), shaped :attr:`local_shape`."""
        raise NotImplementedError

    def assign(self, value: torch.Tensor) -> None:
        """``theta[owned] <- value`` (and whatever copy of it the engine keeps coherent)."""
        raise NotImplementedError

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's local part (a collective when sharded; every rank gets it)."""
        raise NotImplementedError

    def sum_groups(self) -> Tuple[object, ...]:
        """Process groups over which the owned parts' sums add up to the whole tensor's; ``()`` when whole."""
        return ()

    def localize(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` for the owned elements: ``t`` may be full-shaped, a DTensor, or already local."""
        if is_dtensor(t):
            t = t.to_local()
        if tuple(t.shape) == tuple(self.shape):
            return self.take(t)
        if t.numel() == self.local_shape.numel():
            return t.reshape(self.local_shape)
        raise ValueError(
            f"{what} of {self.name} has shape {tuple(t.shape)}, expected {tuple(self.shape)} (the whole tensor) "
            f"or this rank's part {tuple(self.local_shape)}"
        )


class WholeTensor(LocalPart):
    """A tensor every rank holds whole (one process; DDP, where the ranks hold identical copies)."""

    def __init__(self, name: str, param: torch.Tensor) -> None:
        super().__init__(name, param.shape)
        self.param = param

    @property
    def local_shape(self) -> torch.Size:
        return self.shape

    def theta(self) -> torch.Tensor:
        return self.param.detach()

    def grad(self) -> Optional[torch.Tensor]:
        return self.param.grad

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full

    def assign(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.param.copy_(value)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def localize(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if is_dtensor(t) or tuple(t.shape) != tuple(self.shape):
            got = f"a DTensor of shape {tuple(t.shape)}" if is_dtensor(t) else f"shape {tuple(t.shape)}"
            raise ValueError(f"{what} of {self.name} has {got}, expected {tuple(self.shape)}")
        return t


class DTensorShard(LocalPart):
    """The local shard of a DTensor parameter (FSDP2 ``fully_shard``: ``Shard(0)`` over the mesh).

    ``theta``, ``g`` (``param.grad``, a DTensor with the same placements) and the
    optimizer state are all local shards; ``F`` is full-shaped (accumulated from
    the unsharded compute) and :meth:`take` narrows it to the shard's rows.
    """

    grad_advice = ("under FSDP2 the gradient is the DTensor param.grad: call update() after backward() and "
                   "optimizer.step() but before zero_grad(), or pass update(..., grads={name: grad})")

    def __init__(self, name: str, param: torch.Tensor) -> None:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        super().__init__(name, param.shape)
        for pl in param.placements:
            if type(pl) not in (Shard, Replicate):
                raise NotImplementedError(
                    f"{name}: DTensor placement {pl} is not supported (only Shard(dim) and Replicate, as "
                    "fully_shard uses)"
                )
        self.param = param
        self.mesh = param.device_mesh
        self.placements = tuple(param.placements)
        local_shape, offset = compute_local_shape_and_global_offset(param.shape, self.mesh, self.placements)
        self._local_shape = torch.Size(local_shape)
        self.offset = tuple(offset)
        self._groups = tuple(self.mesh.get_group(i) for i, pl in enumerate(self.placements) if pl.is_shard())

    @property
    def local_shape(self) -> torch.Size:
        return self._local_shape

    def theta(self) -> torch.Tensor:
        with torch.no_grad():
            return self.param.to_local()

    def grad(self) -> Optional[torch.Tensor]:
        g = self.param.grad
        if g is None:
            return None
        return g.to_local() if is_dtensor(g) else self.take(g)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        t = full
        for dim, (n, off) in enumerate(zip(self._local_shape, self.offset)):
            if n != t.shape[dim]:
                t = t.narrow(dim, off, n)
        return t

    def assign(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.param.to_local().copy_(value.reshape(self._local_shape))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        stride = torch.empty(self.shape, device="meta").stride()
        dt = DTensor.from_local(local.reshape(self._local_shape), self.mesh, self.placements, run_check=False,
                                shape=self.shape, stride=stride)
        return dt.full_tensor()

    def sum_groups(self) -> Tuple[object, ...]:
        return self._groups


class Sharding:
    """Makes the :class:`LocalPart` of each tracked tensor (the default: whole tensors and DTensors).

    Engines that keep parameters or gradients in their own buffers subclass it
    (:class:`mage_kernels.integrations.deepspeed.ZeroSharding`).
    """

    name = "auto"

    def parts(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> List[LocalPart]:
        out: List[LocalPart] = []
        for name, p in zip(names, params):
            if is_deepspeed_param(p):
                raise ValueError(
                    f"the adapter {name} is partitioned by DeepSpeed ZeRO; pass "
                    "sharding=mage_kernels.integrations.deepspeed.ZeroSharding(engine) so the update reads this "
                    "rank's partitions and the optimizer's gradients"
                )
            out.append(DTensorShard(name, p) if is_dtensor(p) else WholeTensor(name, p))
        return out

    def after_assign(self) -> None:
        """Called on every rank after ``finish_task`` / ``load_state_dict`` wrote ``theta`` (a collective hook)."""


class GatheredTensor(LocalPart):
    """The whole tensor on every rank, however the engine holds it: read gathered, written back to each holder.

    :meth:`theta` is a collective under FSDP2 and ZeRO-3 (every rank calls it, in the same
    order) and returns a fresh whole copy; :meth:`assign` writes each rank's own part
    (:func:`load_full_`, DeepSpeed's fp32 master included). Its gradient must be passed
    whole: engines that shard gradients do not keep a whole one in ``p.grad``.
    """

    grad_advice = ("the tensor is held whole (Gathered sharding): pass the whole gradients, update(..., "
                   "grads={name: grad}), e.g. an FSDP2 DTensor grad's full_tensor() or DeepSpeed's "
                   "deepspeed.utils.safe_get_full_grad(p) between engine.backward() and engine.step()")

    def __init__(self, name: str, param: torch.Tensor) -> None:
        super().__init__(name, full_shape(param))
        self.param = param

    @property
    def local_shape(self) -> torch.Size:
        return self.shape

    def theta(self) -> torch.Tensor:
        return full_tensor(self.param)

    def grad(self) -> Optional[torch.Tensor]:
        if is_dtensor(self.param) or is_deepspeed_param(self.param):
            return None  # the engine holds the gradient in shards: it must be passed whole
        return self.param.grad

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full

    def assign(self, value: torch.Tensor) -> None:
        load_full_(self.param, value.reshape(self.shape).to(self.param.dtype))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def localize(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if is_dtensor(t):
            t = t.full_tensor()
        if tuple(t.shape) != tuple(self.shape):
            raise ValueError(f"{what} of {self.name} has shape {tuple(t.shape)}, expected the whole tensor "
                             f"{tuple(self.shape)}")
        return t


class Gathered(Sharding):
    """Whole tensors on every rank under any engine (:class:`GatheredTensor`), for non-elementwise updates."""

    name = "gathered"

    def parts(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> List[LocalPart]:
        return [GatheredTensor(n, p) for n, p in zip(names, params)]


def all_reduce_parts(parts: Sequence[LocalPart], values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``values[..., i]`` (a partial result of part ``i``) over that part's :meth:`LocalPart.sum_groups`.

    In place; returns ``values``. Parts held whole are left alone. Parts that share
    the same groups are reduced in one collective.
    """
    import torch.distributed as dist

    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    by_groups: Dict[Tuple[int, ...], Tuple[Tuple[object, ...], List[int]]] = {}
    for i, part in enumerate(parts):
        groups = part.sum_groups()
        if groups:
            by_groups.setdefault(tuple(id(g) for g in groups), (groups, []))[1].append(i)
    for groups, cols in by_groups.values():
        idx = torch.tensor(cols, device=values.device)
        sel = values.index_select(-1, idx)
        for g in groups:
            dist.all_reduce(sel, op=reduce_op, group=g)
        values.index_copy_(-1, idx, sel)
    return values


# ------------------------------------------------------------------ whole tensors of a sharded model


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor (a ZeRO-3 partitioned parameter's ``.shape`` is its empty local stub)."""
    return torch.Size(p.ds_shape) if hasattr(p, "ds_shape") else p.shape


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole value of ``p``, detached: gathered from the shards when the engine shards it.

    A collective for a DTensor (FSDP2) or a ZeRO-3 parameter: every rank of the
    group calls it and gets the whole tensor.
    """
    if is_dtensor(p):
        return p.detach().full_tensor()
    if hasattr(p, "ds_id"):
        from .integrations.deepspeed_params import gather_full

        return gather_full(p)
    return p.detach()


def load_full_(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole tensor ``value`` into ``p``: each rank copies the part it holds.

    Under DeepSpeed the optimizer's fp32 master copy is written too (otherwise the
    next step would overwrite the model's copy). ``value`` has the full shape and
    ``p``'s dtype and device; every rank passes the same ``value``.
    """
    with torch.no_grad():
        if is_dtensor(p):
            part = DTensorShard("", p)
            part.assign(part.take(value))
        elif is_deepspeed_param(p):
            from .integrations.deepspeed_params import load_full_ as _load_zero

            _load_zero(p, value)
        else:
            p.copy_(value)
