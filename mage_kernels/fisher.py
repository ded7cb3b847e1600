"""Diagonal Fisher from per-sample squared gradients, accumulated inside the backward (ALGORITHM.md section 2).

For every trainable adapter tensor ``theta`` and the samples ``n`` seen since
:meth:`Fisher.reset`::

    F = (1 / num_samples) * sum_n (d loss_n / d theta) ** 2         (elementwise)

where a sample is one sequence: the leading index of each :class:`MageLinear`'s
input ``[N, T, d_in]`` (or ``[N, d_in]``). This is NOT the square of the batch
gradient. The sums are formed by the ``mage::lora_linear`` backward kernel
(``weight_grad_with_fisher``), which squares each sample's ``[r, d]`` gradient
tile in registers and adds it into the layer's float32 buffers
``fisher_a [R, d_in]`` / ``fisher_b [d_out, R]`` in place, without ever
materializing the ``[N, r, d]`` per-sample gradients. Frozen adapters cost
nothing and their rows stay zero.

Usage (a training step with PEMA, or a whole task for EWC)::

    fisher = mage_kernels.Fisher(model, loss_reduction="mean")
    fisher.reset()
    with fisher.token_weight(attention_mask):     # optional: padding adds nothing
        loss = model(batch).loss
    loss.backward()
    F = fisher.values()                            # {param name: F}

How the per-sample gradient is recovered from the batch backward: with
``loss_reduction="mean"`` the loss is ``(1/N) sum_n loss_n``, so the gradient
reaching a layer is ``1/N`` times the per-sample one, and each layer's forward
passes ``N / loss_scale`` to its backward (``N`` = the leading dim of that layer's
input; the layer holds ``fisher_scale = 1 / loss_scale``, set through
:attr:`Fisher.loss_scale`); with ``"sum"`` it passes ``1 / loss_scale``.
``loss_scale`` is any extra factor the backward loss carries (an AMP
``GradScaler`` scale, or ``1 / accumulation_steps``); it is read at each forward,
so it may change between micro-batches (under ``torch.compile`` a new value
recompiles: dynamo guards on the float).

Token weights: inside :meth:`Fisher.token_weight` each token's contribution
to its sample's gradient is multiplied by its weight before squaring
(``g_n = sum_t w_nt * g_nt``), so a 0 weight removes a padded token from the
Fisher even when the loss did not mask it. The batch gradient is unchanged.
For a model whose tokens do not interact (per-token layers) this is exactly
the per-sample gradient of ``sum_{t: w=1} loss_nt``; when the loss already
masks the padding, a 0/1 weight changes nothing. The weights are captured at
the forward pass, so the context only needs to enclose the forward.

Distributed training (ALGORITHM.md §7): each rank accumulates its own samples
into whole per-layer buffers (also under FSDP2 and DeepSpeed ZeRO-3, whose
backward runs on the unsharded adapters), and :meth:`Fisher.sync` sums the
buffers and the counts over the data-parallel ranks, so ``F`` is over the global
batch on every rank. A sharded update reads only its rank's slice
(:meth:`Fisher.for_parameters` with ``parts``). The Fisher may be created before
``fully_shard`` replaces the parameters by DTensors.

Counting samples: each layer's backward op adds its ``N`` to the layer's
``fisher_count`` (an int64 CPU tensor), so a forward without a backward counts
nothing, and micro-batches and accumulation windows add up. Every layer that
received a gradient must have counted the same samples (``[N, ...]`` inputs with
the samples first, every micro-batch through the same layers); reading ``F``
(or :attr:`num_samples`) raises naming two layers whose counts differ -- e.g. a
layer fed a flattened ``[N*T, d]`` input, or a branch that only some
micro-batches take -- instead of dividing by a wrong count. Layers that no
gradient reached count 0 and have zero sums. A layer applied twice in one
forward (weight tying) counts twice, so it is refused in the same way; a
backward through the same graph twice (``retain_graph``) adds sums and counts
twice, leaving ``F`` unchanged.

torch.compile: the Fisher adds no Python work to the traced forward (its only
forward pre-hook reads attributes, and writes only while :meth:`token_weight` is
active or after the model moved), and the count is a mutation inside the custom
backward op, so ``torch.compile(model, fullgraph=True)`` traces a model with a
Fisher attached without graph breaks (``tests/test_fisher_compile.py``).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .inject import mage_layers
from .layer import MageLinear

__all__ = ["Fisher"]

_REDUCTIONS = ("mean", "sum")


def _check_loss_scale(value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
        raise ValueError(f"loss_scale must be a positive finite number; got {value}")


class Fisher:
    """Enable per-sample squared-gradient accumulation on every :class:`MageLinear` of a model.

    Args:
        model: a :class:`MageLinear`, or any module containing them (e.g. after
            :func:`mage_kernels.inject`; a DDP wrapper is fine).
        loss_reduction: ``"mean"`` when the loss is the mean over the ``N``
            samples of the batch, ``"sum"`` when it is their sum.
        loss_scale: an extra constant the loss was multiplied by before
            ``backward`` (``GradScaler`` scale, ``1 / accumulation_steps``).

    The buffers are float32 (float64 for float64 adapters) and hold sums; they
    live on the layers (``layer.fisher_a``, ``layer.fisher_b``) until
    :meth:`remove`. Only one :class:`Fisher` can be attached to a layer.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean", loss_scale: float = 1.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Fisher expects an nn.Module; got {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}; got {loss_reduction!r}")
        _check_loss_scale(loss_scale)  # before any layer is touched
        self.layers: List[Tuple[str, MageLinear]] = list(mage_layers(model))
        if not self.layers:
            raise ValueError("the model has no MageLinear layers; call mage_kernels.inject(model) first")
        for name, layer in self.layers:
            if layer.fisher_a is not None:
                raise RuntimeError(f"layer {name or '<root>'} already accumulates a Fisher; call .remove() on the other Fisher first")
        self.model = model
        self.loss_reduction = loss_reduction
        self._token_weight: Optional[torch.Tensor] = None
        self._param_index: Dict[int, Tuple[MageLinear, str, int]] = {}
        self._hooks = []
        self._removed = False
        for _, layer in self.layers:
            a = layer.lora_A[0]
            dt = torch.float64 if a.dtype == torch.float64 else torch.float32
            rank = layer.r * layer.num_adapters
            layer.fisher_a = torch.zeros(rank, layer.in_features, device=a.device, dtype=dt)
            layer.fisher_b = torch.zeros(layer.out_features, rank, device=a.device, dtype=dt)
            layer.fisher_count = torch.zeros(1, dtype=torch.int64)  # CPU: read without a device sync
            layer.fisher_mean = loss_reduction == "mean"
            layer.fisher_token_weight = None
            self._hooks.append(layer.register_forward_pre_hook(self._layer_pre_hook))
        self.loss_scale = loss_scale
        self._index_parameters()

    @property
    def loss_scale(self) -> float:
        """The extra factor the backward loss carries (AMP scale, ``1 / accumulation_steps``)."""
        return self._loss_scale

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        _check_loss_scale(value)
        self._loss_scale = float(value)
        for _, layer in self.layers:
            layer.fisher_scale = 1.0 / self._loss_scale

    @staticmethod
    def _holds(where: Tuple[MageLinear, str, int], p: torch.Tensor) -> bool:
        layer, kind, k = where
        plist = layer.lora_A if kind == "a" else layer.lora_B
        return plist._parameters.get(str(k)) is p

    def _index_parameters(self) -> None:
        """Map each adapter parameter object to its (layer, kind, k).

        Rebuilt when a lookup misses: FSDP2's ``fully_shard`` replaces the parameter
        objects by DTensors, so a Fisher made before it still finds them.
        """
        self._param_index = {}
        for _, layer in self.layers:
            for kind, plist in (("a", layer.lora_A), ("b", layer.lora_B)):
                for key, p in plist._parameters.items():  # no __getitem__: DeepSpeed ZeRO-3 would gather it
                    self._param_index[id(p)] = (layer, kind, int(key))

    # ------------------------------------------------------------------ hooks

    def _layer_pre_hook(self, layer: MageLinear, args) -> None:
        # Read-only unless the model moved or a token weight is active, so that torch.compile
        # traces it without side effects (the sample count lives in the backward op).
        if layer.fisher_a.device != layer.lora_A[0].device:  # the model was moved after Fisher() was attached
            layer.fisher_a = layer.fisher_a.to(layer.lora_A[0].device)
            layer.fisher_b = layer.fisher_b.to(layer.lora_A[0].device)
        w = self._token_weight
        if w is None:
            return
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            return  # MageLinear's own input check raises the clear error
        x = args[0]
        lead = tuple(x.shape[:-1])
        if w.numel() != x.numel() // x.shape[-1] or (tuple(w.shape) != lead and not (x.dim() == 2 and w.numel() == x.shape[0])):
            raise ValueError(
                f"token weight of shape {tuple(w.shape)} does not match the layer input's leading dims {lead} "
                "(expected [num_samples, seq_len])"
            )
        layer.fisher_token_weight = w.to(device=x.device).reshape(lead)

    # ------------------------------------------------------------------ control

    def reset(self) -> None:
        """Zero the sums and the sample count (start of a step, or of a task for EWC)."""
        for _, layer in self.layers:
            self._check_attached(layer)
            layer.fisher_a.zero_()
            layer.fisher_b.zero_()
            layer.fisher_count.zero_()

    @contextlib.contextmanager
    def token_weight(self, weight: torch.Tensor) -> Iterator[None]:
        """Per-token weights ``[N, T]`` (0 = padding) for the forward passes inside the block.

        A bool or integer attention mask is accepted and converted to float32.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"token weight must be a tensor; got {type(weight).__name__}")
        if weight.dim() not in (1, 2):
            raise ValueError(f"token weight must be [num_samples, seq_len] (or [num_samples]); got shape {tuple(weight.shape)}")
        w = weight.detach().to(torch.float32)
        if not torch.isfinite(w).all():
            raise ValueError("token weight holds non-finite values")
        old = self._token_weight
        self._token_weight = w
        try:
            yield
        finally:
            self._token_weight = old
            for _, layer in self.layers:
                layer.fisher_token_weight = None

    @property
    def num_samples(self) -> int:
        """Samples whose squared gradients were accumulated since :meth:`reset`.

        Each layer's backward counts the samples that reached it; every layer with a nonzero
        count must agree (else ``RuntimeError`` naming two of them), and all of ``F`` is
        divided by that count. Layers no gradient reached count 0 and are ignored.
        """
        if self._removed:
            return 0
        counts = [layer.fisher_count for _, layer in self.layers]
        c = torch.cat(counts)
        hi = int(c.max())
        lo = int(torch.where(c > 0, c, hi).min())
        if lo != hi:
            names = [name or "<root>" for name, _ in self.layers]
            i, j = int(torch.nonzero(c == lo)[0]), int(torch.nonzero(c == hi)[0])
            raise RuntimeError(
                f"Fisher: layers counted different numbers of samples since reset() ({names[i]}: {lo}, "
                f"{names[j]}: {hi}); every layer's input must be [num_samples, ...] with the samples first, and "
                "every micro-batch of a window must pass through the same layers"
            )
        return hi

    def sync(self, group: Optional[object] = None) -> None:
        """All-reduce (sum) the sums and the sample count across the data-parallel ranks.

        Afterwards ``F`` is over the GLOBAL batch on every rank (ALGORITHM.md §7): each
        rank summed its own samples' squares, and the sums and counts add up. ``group``
        is the data-parallel process group (default: all ranks). A no-op unless
        ``torch.distributed`` is initialized. Call it once per accumulation window
        (after the backward passes, before :meth:`values` or an update); calling it twice
        would count every rank's samples twice.

        The buffers are whole on every rank under every engine (FSDP2 and ZeRO-3
        included): ``4r (d_in + d_out)`` float32 per layer, the size of all four
        adapters, plus one float64 copy of them during this call.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        bufs = [t for _, layer in self.layers for t in (self._check_attached(layer).fisher_a, layer.fisher_b)]
        counts = [layer.fisher_count for _, layer in self.layers]
        dev = bufs[0].device
        flat = torch.cat([b.reshape(-1).to(torch.float64) for b in bufs] +
                         [torch.cat(counts).to(device=dev, dtype=torch.float64)])
        dist.all_reduce(flat, group=group)
        off = 0
        for b in bufs:
            b.copy_(flat[off: off + b.numel()].view_as(b))
            off += b.numel()
        for c, total in zip(counts, flat[off:].round().to(torch.int64).cpu()):
            c.fill_(int(total))

    def remove(self) -> None:
        """Detach from the model: remove the hooks and free the buffers."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._removed = True
        for _, layer in self.layers:
            layer.fisher_a = None
            layer.fisher_b = None
            layer.fisher_count = None
            layer.fisher_scale = 1.0
            layer.fisher_mean = False
            layer.fisher_token_weight = None
        self._param_index = {}

    # ------------------------------------------------------------------ results

    def _check_attached(self, layer: MageLinear) -> MageLinear:
        if layer.fisher_a is None:
            raise RuntimeError("this Fisher was removed (or its buffers were cleared); create a new one")
        return layer

    def _divisor(self) -> float:
        if self._removed:
            raise RuntimeError("this Fisher was removed (or its buffers were cleared); create a new one")
        n = self.num_samples
        if n <= 0:
            raise RuntimeError(
                "no samples accumulated since reset(): run a forward and a backward with gradients enabled first"
            )
        return float(n)

    def _sum_view(self, layer: MageLinear, kind: str, k: int) -> torch.Tensor:
        self._check_attached(layer)
        rows = slice(k * layer.r, (k + 1) * layer.r)
        return layer.fisher_a[rows] if kind == "a" else layer.fisher_b[:, rows]

    def for_parameter(self, param: torch.Tensor) -> torch.Tensor:
        """``F`` for one adapter parameter (``lora_A[k]`` or ``lora_B[k]`` of a tracked layer), shaped like it."""
        return self.for_parameters([param])[0]

    def for_parameters(self, params: Sequence[torch.Tensor],
                       parts: Optional[Sequence["LocalPart"]] = None) -> List[torch.Tensor]:  # noqa: F821
        """:meth:`for_parameter` for many parameters at once (one multi-tensor division).

        ``F`` is whole-shaped even for a sharded parameter (a DTensor under FSDP2, a
        ZeRO-3 partition): it is accumulated from the unsharded compute of the backward.
        With ``parts`` (:class:`mage_kernels.sharding.LocalPart`, one per parameter) each
        ``F`` is this rank's part of it, taken before the division (ALGORITHM.md §7).
        """
        if parts is not None and len(parts) != len(params):
            raise ValueError(f"for_parameters: got {len(parts)} parts for {len(params)} parameters")
        views = []
        for i, p in enumerate(params):
            where = self._param_index.get(id(p))
            if where is None or not self._holds(where, p):  # replaced (a freed object's id may be reused)
                self._index_parameters()
                where = self._param_index.get(id(p))
            if where is None:
                raise KeyError("a tensor is not an adapter parameter (lora_A[k] / lora_B[k]) of a layer this Fisher tracks")
            view = self._sum_view(*where)
            views.append(view if parts is None else parts[i].take(view))
        return list(torch._foreach_div(views, self._divisor())) if views else []

    def values(self) -> Dict[str, torch.Tensor]:
        """``{name: F}`` for every TRAINABLE adapter parameter, names as in ``model.named_parameters()``."""
        div = self._divisor()
        out: Dict[str, torch.Tensor] = {}
        for name, layer in self.layers:
            prefix = f"{name}." if name else ""
            for k in range(layer.num_adapters):
                for kind, plist in (("a", layer.lora_A), ("b", layer.lora_B)):
                    if plist[k].requires_grad:
                        out[f"{prefix}lora_{kind.upper()}.{k}"] = self._sum_view(layer, kind, k) / div
        return out

    def persistent_tensors(self) -> List[torch.Tensor]:
        """The buffers this object keeps alive (for :func:`mage_kernels.persistent_state_bytes`)."""
        return [t for _, layer in self.layers for t in (layer.fisher_a, layer.fisher_b) if t is not None]

    def __repr__(self) -> str:
        return (f"Fisher(layers={len(self.layers)}, loss_reduction={self.loss_reduction!r}, "
                f"loss_scale={self.loss_scale:g}, num_samples={self.num_samples})")
