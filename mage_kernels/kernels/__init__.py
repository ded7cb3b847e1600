"""Triton kernels. Each module is one kernel family with the same call signature
as its plain-PyTorch twin in :mod:`mage_kernels.reference`:

* :mod:`.lora` -- ``shrink`` (``u = x A^T`` over all adapters in one launch) and
  ``matmul_concat_k`` (the base GEMM fused with the adapters' expand).
* :mod:`.weight_grad` -- ``weight_grad_with_fisher``: ``dA``/``dB`` plus the
  in-place per-sample squared-gradient (Fisher) accumulation.
* :mod:`.pema` -- the multi-tensor PEMA update.
"""
