"""Joining a gloo process group from a test's ``mp.spawn`` worker without the exit-time abort.

torch pins the default process group when ``torch._dynamo`` is first imported after
``init_process_group`` (the first call of any ``torch.library`` op imports it, and so does
``transformers``' model code): ``destroy_process_group`` then leaves gloo's threads running, and
about one worker exit in twelve aborts with SIGABRT ("terminate called without an active
exception"; measured 5 of 60 two-process runs of ``test_fisher``'s sync worker, 0 of 60 with
the import first). The driver imports it before joining (:func:`mage_cl.distributed.init`);
these workers import it here.
"""

from __future__ import annotations


def init_gloo(init_file: str, rank: int, world: int) -> None:
    """``init_process_group("gloo")`` over ``file://init_file``, with ``torch._dynamo`` imported first."""
    import torch._dynamo  # noqa: F401  (before the group exists: see the module docstring)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
