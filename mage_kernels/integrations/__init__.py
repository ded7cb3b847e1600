"""Integrations with other frameworks, one module each, imported on demand (their packages are optional).

* :mod:`mage_kernels.integrations.peft` -- export MAGE adapters as PEFT LoRA directories
  (``peft.PeftModel.from_pretrained`` loads them) and import PEFT LoRA directories.
* :mod:`mage_kernels.integrations.transformers` -- a ``transformers.TrainerCallback`` that runs
  the Fisher and PEMA/DEMA around ``Trainer``'s optimizer steps (gradient accumulation and DDP
  included), and the way to train a bitsandbytes-quantized base with ``Trainer``.
"""

__all__ = ["peft", "transformers"]
