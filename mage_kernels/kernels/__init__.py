"""Triton kernels. Each module is one kernel family with the same call signature
as its plain-PyTorch twin in :mod:`mage_kernels.reference`:

* :mod:`.lora` -- ``shrink`` (``u = x A^T`` over all adapters in one launch) and
  ``matmul_concat_k`` (the base GEMM fused with the adapters' expand).
* :mod:`.weight_grad` -- ``weight_grad_with_fisher``: ``dA``/``dB`` plus the
  in-place per-sample squared-gradient (Fisher) accumulation.
* :mod:`.pema` -- the multi-tensor PEMA update.

These modules import Triton; the library imports them lazily, only when the
``"triton"`` (or ``"cuda"``) backend is chosen, so ``import mage_kernels`` and
the ``"torch"`` backend work without Triton. The ``torch.ops.mage.*`` custom ops
that dispatch to them live outside this package (:mod:`mage_kernels.lora_op`,
:mod:`mage_kernels.weight_grad_op`, :mod:`mage_kernels.ema`).
"""
