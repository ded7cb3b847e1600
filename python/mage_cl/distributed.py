"""Data-parallel training under ``torchrun`` (DDP; gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node 2 -m mage_cl.cli run ...`` sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` and the rendezvous address; :func:`init` then joins the
process group. The driver's rules for staying in lock-step:

* every rank draws the same shuffled batches from the same seed and trains on
  its own slice of each global batch (:func:`shard`);
* gradients are averaged by ``torch.nn.parallel.DistributedDataParallel`` (the
  model is re-wrapped at every task because the trainable adapters change);
* the Fisher sums are all-reduced (``fisher.sync()``) *before* PEMA reads them,
  and everything a method derives from data (EWC Fisher, PGP feature
  covariances, evaluation counts) goes through :func:`all_reduce_sum`, so the
  method state stays identical on every rank;
* only rank 0 writes results and checkpoints (:func:`is_main`).

Outside ``torchrun`` every helper is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import importlib
import os
from typing import List, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["init", "shutdown", "is_distributed", "rank", "world_size", "is_main", "shard",
           "all_reduce_sum", "all_true", "barrier", "broadcast_object", "wrap_ddp"]

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init(backend: str = "auto") -> bool:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); returns whether it did."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch._dynamo first: imported after the group exists (the first torch.library op call does),
    # it pins the default group, destroy_process_group leaves gloo's threads running, and about
    # one exit in twelve aborts (tests/test_distributed.py checks no gloo thread survives shutdown)
    importlib.import_module("torch._dynamo")

    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    return True


def shutdown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> List[T]:
    """This rank's slice of a global batch (ranks take items ``rank, rank + world, ...``)."""
    return list(items[rank():: world_size()])


def _all_reduce_(t: torch.Tensor, op) -> torch.Tensor:
    """All-reduce ``t`` in place, through the GPU when the group is nccl's (which takes no CPU tensors)."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tmp, op=op)
        t.copy_(tmp.cpu())
    else:
        dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity on one process); returns ``t``."""
    if is_distributed():
        _all_reduce_(t, dist.ReduceOp.SUM)
    return t


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (``flag`` itself on one process)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    return bool(_all_reduce_(t, dist.ReduceOp.MIN).item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` over its currently trainable parameters, or ``model`` itself."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    ids = [dev.index] if dev.type == "cuda" else None
    return DDP(model, device_ids=ids)
