"""Integrations with training engines that keep parameters or gradients in their own buffers.

* :mod:`mage_kernels.integrations.deepspeed` -- DeepSpeed ZeRO stages 1, 2 and 3
  (:class:`~mage_kernels.integrations.deepspeed.ZeroSharding`).

DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) need no integration: their
gradients stay in ``param.grad`` and FSDP2's shards are DTensors, which
:mod:`mage_kernels.sharding` handles directly (ALGORITHM.md §7). The modules here are
imported on demand (``import mage_kernels`` imports none of them, nor their engines).
"""
