"""Integrations with other frameworks, one module each, imported on demand (their packages are optional).

* :mod:`mage_kernels.integrations.deepspeed` -- DeepSpeed ZeRO stages 1, 2 and 3
  (:class:`~mage_kernels.integrations.deepspeed.ZeroSharding`). DDP and FSDP2
  (``torch.distributed.fsdp.fully_shard``) need no integration: their gradients stay in
  ``param.grad`` and FSDP2's shards are DTensors, which :mod:`mage_kernels.sharding` handles
  directly (ALGORITHM.md §7).
* :mod:`mage_kernels.integrations.peft` -- export MAGE adapters as PEFT LoRA directories
  (``peft.PeftModel.from_pretrained`` loads them) and import PEFT LoRA directories.
* :mod:`mage_kernels.integrations.transformers` -- a ``transformers.TrainerCallback`` that runs
  the Fisher and PEMA/DEMA around ``Trainer``'s optimizer steps (gradient accumulation and DDP
  included), and the way to train a bitsandbytes-quantized base with ``Trainer``.

``import mage_kernels`` imports none of them, nor their frameworks.
"""

__all__ = ["deepspeed", "peft", "transformers"]
