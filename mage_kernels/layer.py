"""``MageLinear``: a frozen linear layer with MAGE's four LoRA adapters (ALGORITHM.md §1).

    y = x W0^T (+ bias) + s * sum_k B_k A_k drop(x),      s = alpha / (num_adapters * r)

Adapters, in the authors' order: ``0`` text-input ("text general"), ``1``
image-input ("image general"), ``2`` text-output ("text expert"), ``3``
image-output ("image expert"). All four always take part in the forward pass;
only the trainable ones (``requires_grad``) receive gradients, and the backward
kernel does no work for the frozen ones.

Dropout: this implementation uses ONE dropout mask shared by the four adapters
(ALGORITHM.md §1's allowed simplification; the authors' code draws an independent
mask per adapter). ``tests/test_layer.py::test_dropout_mask_is_shared_by_the_four_adapters``
pins it down. The mask is never materialized on the Triton/cuBLAS paths: each
training forward draws a fresh int64 seed from torch's generator of the input's
device (reproducible under ``torch.manual_seed``), the kernels generate the mask
from it (Philox) and the backward regenerates it; ``mk.dropout_mask(x.shape, p,
seed)`` returns the mask of a seed. The ``torch`` backend draws its mask from a
``torch.Generator`` with the same seed (same semantics, different bits); on a CPU it draws it
once per forward and keeps it for the backward, with the dropped input (1 byte plus one input
element per element of the layer's input).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterable, List, Optional, Union

import torch
from torch import nn

from .lora_op import lora_linear, new_dropout_seed

__all__ = ["ADAPTERS", "MageLinear", "adapters_for_task"]

#: Adapter names by index (ALGORITHM.md section 1).
ADAPTERS = ("text_in", "image_in", "text_out", "image_out")
_MODALITIES = ("text", "image")
AdapterRef = Union[int, str]


def adapters_for_task(inputs: Iterable[str], output: str) -> List[int]:
    """Indices of the adapters MAGE trains for a task (the table in ALGORITHM.md section 1).

    ``adapters_for_task({"image", "text"}, "text") == [0, 1, 2]``;
    ``({"text"}, "image") -> [0, 3]``; ``({"image", "text"}, "image") -> [0, 1, 3]``.
    """
    ins = set(inputs)
    bad = (ins | {output}) - set(_MODALITIES)
    if bad or not ins:
        raise ValueError(f"modalities must be drawn from {_MODALITIES}; got inputs={sorted(ins)}, output={output!r}")
    chosen = set()
    if "text" in ins:
        chosen.add(0)
    if "image" in ins:
        chosen.add(1)
    chosen.add(2 if output == "text" else 3)
    return sorted(chosen)


def _is_quantized(base: nn.Module) -> bool:
    return type(base).__module__.startswith("bitsandbytes")


class MageLinear(nn.Module):
    """A frozen linear layer plus four equally weighted LoRA adapters.

    Args:
        in_features, out_features: sizes of the layer (checked against ``base``).
        r: rank of each adapter (total rank ``num_adapters * r``).
        alpha: LoRA alpha; scaling ``s = alpha / (num_adapters * r)`` (1.0 for the paper's 32 / 32).
        dropout: dropout on the adapters' input, one mask shared by all adapters.
        bias: whether a new base layer has a bias (ignored when ``base`` is given).
        base: an existing ``nn.Linear`` (or bitsandbytes 4/8-bit linear) to wrap; it is frozen.
        num_adapters: 4 for MAGE; 1 gives plain LoRA of rank ``r``.
        device, dtype: for a new base layer and the adapters.

    Adapters are ``lora_A[k]: [r, in_features]`` (normal, std 0.01) and
    ``lora_B[k]: [out_features, r]`` (zeros).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 32,
        dropout: float = 0.05,
        bias: bool = True,
        base: Optional[nn.Module] = None,
        num_adapters: int = 4,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for what, v in (("r", r), ("num_adapters", num_adapters)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"{what} must be a positive integer; got {v!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number; got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if base is None:
            base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        bin_, bout = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if (bin_, bout) != (in_features, out_features):
            raise ValueError(
                f"base layer is {bin_} -> {bout} but MageLinear was asked for {in_features} -> {out_features}"
            )
        base.requires_grad_(False)
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.r = r = int(r)
        self.alpha = alpha = float(alpha)
        self.num_adapters = num_adapters = int(num_adapters)
        self.scaling = alpha / (num_adapters * r)
        self.dropout = dropout
        self.quantized = _is_quantized(base)
        if dtype is None:
            w = getattr(base, "weight", None)
            if self.quantized:  # bitsandbytes: adapters in the layer's compute dtype (the activations' dtype)
                dtype = getattr(base, "compute_dtype", None) or torch.float32
            else:
                dtype = w.dtype if (w is not None and w.is_floating_point()) else torch.float32
        if device is None and getattr(base, "weight", None) is not None:
            device = base.weight.device
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype)) for _ in range(num_adapters)]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype)) for _ in range(num_adapters)]
        )
        self.reset_adapters()
        self.merged = False
        # Fisher accumulation (ALGORITHM.md section 2); managed by mage_kernels.fisher.
        self.fisher_a: Optional[torch.Tensor] = None
        self.fisher_b: Optional[torch.Tensor] = None
        #: int64 [1] on the CPU: samples whose gradient reached this layer (added by the backward op).
        self.fisher_count: Optional[torch.Tensor] = None
        #: The per-sample gradient is ``fisher_scale * (N if fisher_mean else 1)`` times the one
        #: reaching the layer (N: the input's leading dim); set by the Fisher (loss reduction, loss scale).
        self.fisher_scale: float = 1.0
        self.fisher_mean: bool = False
        self.fisher_token_weight: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ adapters

    def reset_adapters(self) -> None:
        """Re-initialize: ``A_k ~ N(0, 0.01^2)``, ``B_k = 0`` (ALGORITHM.md section 1)."""
        with torch.no_grad():
            for a in self.lora_A:
                a.normal_(0.0, 0.01)
            for b in self.lora_B:
                b.zero_()

    def _index(self, ref: AdapterRef) -> int:
        if isinstance(ref, str):
            if ref not in ADAPTERS[: self.num_adapters]:
                raise KeyError(f"unknown adapter {ref!r}; this layer has {list(ADAPTERS[: self.num_adapters])}")
            return ADAPTERS.index(ref)
        if not 0 <= int(ref) < self.num_adapters:
            raise IndexError(f"adapter index {ref} out of range for {self.num_adapters} adapters")
        return int(ref)

    def set_trainable(self, adapters: Iterable[AdapterRef]) -> None:
        """Train exactly these adapters (indices or names); freeze the others."""
        keep = {self._index(a) for a in adapters}
        for k in range(self.num_adapters):
            self.lora_A[k].requires_grad_(k in keep)
            self.lora_B[k].requires_grad_(k in keep)

    def for_task(self, inputs: Iterable[str] = ("image", "text"), output: str = "text") -> List[int]:
        """Freeze all but the adapters matching the task's modalities; returns their indices."""
        if self.num_adapters != 4:
            raise RuntimeError("for_task needs the four MAGE adapters (num_adapters=4)")
        chosen = adapters_for_task(inputs, output)
        self.set_trainable(chosen)
        return chosen

    def trainable_adapters(self) -> List[int]:
        return [k for k in range(self.num_adapters) if self.lora_A[k].requires_grad or self.lora_B[k].requires_grad]

    def lora_weights(self):
        """The concatenated ``(A [R, K], B [N, R])`` (autograd flows to each adapter)."""
        return torch.cat(list(self.lora_A), 0), torch.cat(list(self.lora_B), 1)

    def delta_weight(self) -> torch.Tensor:
        """``s * B A``: the dense update the adapters add to ``W0``."""
        a, b = self.lora_weights()
        return self.scaling * (b @ a)

    # ------------------------------------------------------------------ merge

    def merge(self) -> None:
        """Fold ``s B A`` into the base weight for inference (no adapter cost)."""
        if self.merged:
            return
        if self.quantized:
            raise RuntimeError("merge() is not supported for a quantized base layer")
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the base dtype's rounding)."""
        if not self.merged:
            return
        with torch.no_grad():
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    # ------------------------------------------------------------------ forward

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MageLinear expects a tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"MageLinear expects input of shape [batch, ..., {self.in_features}]; got a {x.dim()}-D tensor "
                f"of shape {tuple(x.shape)} (add a batch dimension with x.unsqueeze(0))"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features but MageLinear.in_features is {self.in_features}")
        if not x.is_floating_point():
            raise TypeError(f"MageLinear needs a floating-point input; got {x.dtype}")
        a0 = self.lora_A[0]
        if a0.device != x.device:
            raise RuntimeError(f"adapters are on {a0.device} but the input is on {x.device}; move the layer with .to()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.merged:
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                raise RuntimeError("MageLinear is merged; call unmerge() before training the adapters")
            return self.base(x)
        a, b = self.lora_weights()
        weight = None if self.quantized else self.base.weight
        bias = None if self.quantized else self.base.bias
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            x, a, b = x.to(dt), a.to(dt), b.to(dt)
            weight = None if weight is None else weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        if a.dtype != x.dtype:
            raise TypeError(
                f"adapters are {a.dtype} but the input is {x.dtype}; cast the layer (.to(dtype)) or use autocast"
            )
        if weight is not None and weight.dtype != x.dtype:
            raise TypeError(f"base weight is {weight.dtype} but the input is {x.dtype}")
        p = self.dropout if (self.training and self.dropout > 0) else 0.0
        seed = new_dropout_seed(x.device) if p else None
        fisher_on = self.fisher_a is not None and torch.is_grad_enabled()
        rows = [k * self.r + i for k in self.trainable_adapters() for i in range(self.r)]
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext():
            y = lora_linear(
                x, weight, bias, a, b, self.scaling,
                dropout_p=p,
                dropout_seed=seed,
                trainable_rows=rows,
                fisher_a=self.fisher_a if fisher_on else None,
                fisher_b=self.fisher_b if fisher_on else None,
                fisher_count=self.fisher_count if fisher_on else None,
                token_weight=self.fisher_token_weight if fisher_on else None,
                fisher_scale=self.fisher_scale * (x.shape[0] if self.fisher_mean and x.dim() >= 2 else 1),
            )
        if self.quantized:
            y = y + self.base(x)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"num_adapters={self.num_adapters}, scaling={self.scaling:g}, dropout={self.dropout}, "
            f"trainable={self.trainable_adapters()}"
        )
