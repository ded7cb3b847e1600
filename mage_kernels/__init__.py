"""mage-kernels: fused kernels for MAGE continual learning of multimodal LLMs.

Public API (see README.md):

* :class:`MageLinear` -- frozen linear + four equally weighted LoRA adapters.
* :func:`inject`, :func:`find_target_modules`, :func:`for_task`, :func:`task_history`,
  :func:`set_trainable`, :func:`adapter_state_dict`, :func:`load_adapter_state_dict`,
  :func:`merge_and_unload` -- model-wide adapter management (PEFT-style target matching).
* :func:`save_pretrained`, :func:`from_pretrained`, :func:`load_method_state` -- adapters,
  configuration, task history and method state as a directory, loaded all or nothing.
* ``mage_kernels.integrations.peft`` (PEFT export/import) and
  ``mage_kernels.integrations.transformers`` (a ``TrainerCallback``), imported on demand.
* :func:`lora_linear` -- the fused op itself (``torch.ops.mage.lora_linear``);
  :func:`lora_linear_path` -- which implementation a call takes (cuBLAS composition,
  Triton concat-K or the torch reference); :func:`dropout_mask` -- the in-kernel
  dropout mask of a seed.
* Custom ops registered on import (Triton itself is imported lazily, only for the
  ``triton`` backend): ``torch.ops.mage.lora_linear``, ``lora_linear_backward``,
  ``weight_grad_with_fisher`` and ``pema_update_``.
* :func:`backend`, :func:`set_backend`, :func:`use_backend`, :func:`backend_info` --
  explicit kernel backend choice (``triton`` | ``cuda`` | ``torch``).
* :mod:`mage_kernels.sharding` -- each rank's part of the adapters under DDP / FSDP2 /
  DeepSpeed ZeRO (ALGORITHM.md §7); :mod:`mage_kernels.integrations.deepspeed`
  (imported on demand) -- :class:`ZeroSharding` for DeepSpeed ZeRO 1/2/3.
"""

from .backends import (
    BackendUnavailableError,
    backend,
    backend_info,
    resolve_backend,
    set_backend,
    use_backend,
)
from .inject import (
    LLAMA_TARGETS,
    adapter_parameters,
    adapter_state_dict,
    find_target_modules,
    for_task,
    inject,
    load_adapter_state_dict,
    mage_layers,
    merge_and_unload,
    set_trainable,
    task_history,
)
from .layer import ADAPTERS, MageLinear, adapters_for_task
from .lora_op import LoraLinearPath, dropout_mask, lora_linear, lora_linear_path
from . import cuda_extension  # noqa: E402  (the optional _C loader: mk.cuda_extension.schema_mismatches())
from . import weight_grad_op  # noqa: F401  (registers torch.ops.mage.weight_grad_with_fisher; no Triton import)
from .fisher import Fisher
from .ema import DEMA, PEMA, FixedEMA, pema_update_
from .authors_pema import AuthorsPEMA, authors_pema_update_
from .memory import persistent_state_bytes
from . import sharding  # noqa: E402  (mk.sharding.Sharding, full_tensor, load_full_)
from .pretrained import from_pretrained, load_method_state, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "AuthorsPEMA",
    "authors_pema_update_",
    "DEMA",
    "FixedEMA",
    "Fisher",
    "PEMA",
    "pema_update_",
    "persistent_state_bytes",
    "ADAPTERS",
    "BackendUnavailableError",
    "LLAMA_TARGETS",
    "MageLinear",
    "adapter_parameters",
    "adapter_state_dict",
    "adapters_for_task",
    "backend",
    "backend_info",
    "find_target_modules",
    "for_task",
    "from_pretrained",
    "inject",
    "load_adapter_state_dict",
    "load_method_state",
    "lora_linear",
    "lora_linear_path",
    "LoraLinearPath",
    "dropout_mask",
    "mage_layers",
    "merge_and_unload",
    "resolve_backend",
    "save_pretrained",
    "set_backend",
    "set_trainable",
    "task_history",
    "use_backend",
]
