"""Fused multi-tensor PEMA update in Triton (ALGORITHM.md §3).

One launch updates every EMA tensor of a group. :class:`PemaLaunch` is built
ONCE for a list of ``(theta, theta*, g, F)`` tensors and keeps, on the device:

* a **tensor table** ``[num_tensors, 5]`` int64 per group: the addresses of
  ``theta``, ``theta*``, ``g`` and ``F`` and the element count of each tensor;
* a **chunk table** ``[num_chunks, 2]``: for every program, the tensor it works
  on and the first element of its chunk (``CHUNK = BLOCK * BLOCKS_PER_PROGRAM``
  elements, the tensor's tail chunk is ragged and masked);
* a float32 ``[1]`` **divisor**: ``F`` is read as ``F_sum / divisor`` (the Fisher
  object's running sums divided by its sample count, inside the kernel, so PEMA
  needs no per-step ``F`` tensors; 1 for an ``F`` given as is).

Afterwards a step only compares the gradients' addresses with the table's
(:meth:`PemaLaunch.set_grads`; a gradient that moved costs one small
host-to-device copy of the table, never a sync) and launches. The tables keep
their device addresses, so the launches can be captured in a CUDA graph
(:class:`mage_kernels.PEMA` with ``cuda_graph = True``).

Tensors are grouped by what the kernel must know at compile time: the four
dtypes, whether every pointer is 16-byte aligned and every size a multiple of
8 elements (then ``tl.multiple_of`` tells the compiler, and the loads and
stores become 128-bit vector accesses), and the layout of ``F``: contiguous, or
the column block of a bigger row-major buffer (``fisher_b[:, k*r:(k+1)*r]`` of
:class:`mage_kernels.Fisher`, row length and row stride compile-time constants).
In a MAGE model that is two groups (the ``A`` and the ``B`` tensors), so two
launches.

Per element, in float32 (float64 when ``theta`` is float64)::

    F      = F_sum / divisor
    beta   = (g + 1) / (F * (theta - theta*) + lam)
    beta   = beta if 0 < beta < 1 else beta_fallback      (NaN / inf fall back; counted)
    new    = beta * theta* + (1 - beta) * theta
    theta* = new if new is finite else theta*              (counted; theta* never turns NaN)

and each program adds its two counts (fallback elements, non-finite skips) into
the int64 ``counts[2]`` with one atomic each (exact counts). This is the diagonal,
elementwise form of the paper's Eq. 3-4 with the fallback: the project's
documented design decision (ALGORITHM.md §3). The reference is
:func:`mage_kernels.reference.pema_update_`.
"""

from __future__ import annotations

import array
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .launch import launch

__all__ = ["pema_update_", "PemaLaunch", "TablesStale", "BLOCK", "CHUNK"]


class TablesStale(Exception):
    """A gradient moved to an address the tables' compile-time grouping cannot take (misaligned):
    build a new :class:`PemaLaunch`."""

BLOCK = 1024
BLOCKS_PER_PROGRAM = 4
CHUNK = BLOCK * BLOCKS_PER_PROGRAM
ALIGN_BYTES = 16
ALIGN_ELEMENTS = 8  # sizes and F row layouts that are multiples of this get the vector path

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
_FINITE_MAX = {tl.float32: 3.4028234663852886e38, tl.float64: 1.7976931348623157e308}


@triton.jit
def _pema_kernel(
    tensor_table,  # int64 [num_tensors, 5]: theta, theta*, g, F addresses; numel
    chunk_table,  # int64 [num_chunks, 2]: tensor index, first element
    counts,  # int64 [2]: fallback elements, non-finite skips
    divisor_ptr,  # float32 [1]: F = F_sum / divisor
    lam,
    beta_fallback,
    P_DT: tl.constexpr,
    E_DT: tl.constexpr,
    G_DT: tl.constexpr,
    F_DT: tl.constexpr,
    C_DT: tl.constexpr,  # compute dtype
    FINITE_MAX: tl.constexpr,
    ALIGNED: tl.constexpr,  # 16-byte aligned pointers, sizes multiples of ALIGN
    ALIGN: tl.constexpr,
    F_COLS: tl.constexpr,  # 0: F contiguous; else F is [rows, F_COLS] with row stride F_STRIDE
    F_STRIDE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_table + 2 * pid)
    start = tl.load(chunk_table + 2 * pid + 1)
    row = tensor_table + 5 * t
    p_ptr = tl.load(row).to(tl.pointer_type(P_DT))
    e_ptr = tl.load(row + 1).to(tl.pointer_type(E_DT))
    g_ptr = tl.load(row + 2).to(tl.pointer_type(G_DT))
    f_ptr = tl.load(row + 3).to(tl.pointer_type(F_DT))
    n = tl.load(row + 4)
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        f_ptr = tl.multiple_of(f_ptr, 16)
        n = tl.multiple_of(n, ALIGN)
    start = tl.multiple_of(start, BLOCK)
    divisor = tl.load(divisor_ptr).to(C_DT)
    n_fallback = tl.zeros([BLOCK], dtype=tl.int32)
    n_nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(BLOCKS_PER_PROGRAM):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        if F_COLS == 0:
            f_offs = offs
        else:
            f_offs = (offs // F_COLS) * F_STRIDE + offs % F_COLS
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(C_DT)
        e = tl.load(e_ptr + offs, mask=m, other=0.0).to(C_DT)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(C_DT)
        f = tl.load(f_ptr + f_offs, mask=m, other=0.0).to(C_DT) / divisor
        beta = (g + 1.0) / (f * (p - e) + lam)
        ok = (beta > 0.0) & (beta < 1.0)  # False for NaN
        beta = tl.where(ok, beta, beta_fallback)
        new = beta * e + (1.0 - beta) * p
        finite = tl.abs(new) <= FINITE_MAX  # False for NaN and +-inf
        tl.store(e_ptr + offs, new.to(E_DT), mask=m & finite)
        n_fallback += (m & (ok == 0)).to(tl.int32)
        n_nonfinite += (m & (finite == 0)).to(tl.int32)
    tl.atomic_add(counts, tl.sum(n_fallback, axis=0).to(tl.int64))
    tl.atomic_add(counts + 1, tl.sum(n_nonfinite, axis=0).to(tl.int64))


def _f_layout(f: torch.Tensor) -> Tuple[int, int]:
    """``(F_COLS, F_STRIDE)``: ``(0, 0)`` for a contiguous ``F``, ``(cols, row stride)`` for a row-major
    column block (unit column stride); raises ``ValueError`` for anything else (callers copy first)."""
    if f.is_contiguous():
        return 0, 0
    if f.dim() == 2 and f.stride(1) == 1 and f.stride(0) >= f.shape[1]:
        return int(f.shape[1]), int(f.stride(0))
    raise ValueError("F must be contiguous or a row-major column block")


def _aligned(tensors: Sequence[torch.Tensor], f_layout: Tuple[int, int]) -> bool:
    if any(t.data_ptr() % ALIGN_BYTES for t in tensors):
        return False
    if tensors[1].numel() % ALIGN_ELEMENTS:
        return False
    return all(v % ALIGN_ELEMENTS == 0 for v in f_layout)


def _chunk_table(numels: Sequence[int]) -> torch.Tensor:
    """int64 ``[num_chunks, 2]``: (tensor index, first element) for every program, built vectorized."""
    n = torch.tensor(list(numels), dtype=torch.int64)
    per = (n + CHUNK - 1) // CHUNK
    idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), per)
    first = torch.cumsum(per, 0) - per  # first chunk of each tensor
    start = (torch.arange(idx.numel(), dtype=torch.int64) - first[idx]) * CHUNK
    return torch.stack([idx, start], 1).contiguous()


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class _Group:
    def __init__(self, key: tuple, members: List[int], rows: List[List[int]], device: torch.device) -> None:
        self.key = key
        self.members = members
        self.index = torch.tensor(members, dtype=torch.int64)
        self.host = torch.tensor(rows, dtype=torch.int64)
        self.table = _to_device(self.host, device)
        self.chunks = _to_device(_chunk_table([r[4] for r in rows]), device)
        pd, ed, gd, fd, aligned, f_cols, f_stride = key
        cdt = tl.float64 if tl.float64 in (_TL_DTYPES[pd], _TL_DTYPES[ed]) else tl.float32
        self.constexprs = dict(
            P_DT=_TL_DTYPES[pd], E_DT=_TL_DTYPES[ed], G_DT=_TL_DTYPES[gd], F_DT=_TL_DTYPES[fd],
            C_DT=cdt, FINITE_MAX=_FINITE_MAX[cdt], ALIGNED=aligned, ALIGN=ALIGN_ELEMENTS,
            F_COLS=f_cols, F_STRIDE=f_stride, BLOCK=BLOCK, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
        )


class PemaLaunch:
    """The device tables of one PEMA update, built once; a step is :meth:`set_grads` + :meth:`run`.

    Args:
        params, emas, grads, fishers: equal-length lists, validated by the caller
            (same shapes, one device, floating point); ``params``, ``emas`` and
            ``grads`` contiguous, each ``F`` contiguous or a row-major column block.
            The tensors must stay alive and in place while this object is used
            (the caller checks their addresses; :meth:`set_grads` re-reads the
            gradients' on every step).
    """

    def __init__(self, params: Sequence[torch.Tensor], emas: Sequence[torch.Tensor],
                 grads: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor]) -> None:
        self.device = emas[0].device if len(emas) else torch.device("cpu")
        self.divisor = torch.ones(1, dtype=torch.float32, device=self.device)
        self._divisor_value = 1.0
        members: Dict[tuple, List[int]] = {}
        rows: Dict[tuple, List[List[int]]] = {}
        for i, (p, e, g, f) in enumerate(zip(params, emas, grads, fishers)):
            if e.numel() == 0:
                continue
            layout = _f_layout(f)
            key = (p.dtype, e.dtype, g.dtype, f.dtype, _aligned((p, e, g, f), layout)) + layout
            members.setdefault(key, []).append(i)
            rows.setdefault(key, []).append([p.data_ptr(), e.data_ptr(), g.data_ptr(), f.data_ptr(), e.numel()])
        self.groups = [_Group(key, members[key], rows[key], self.device) for key in members]
        self.grad_ptrs = tuple(g.data_ptr() for g in grads)

    def set_grads(self, grad_ptrs: Tuple[int, ...]) -> bool:
        """Point the tables at these gradient addresses (one per tensor); False when nothing changed.

        The gradients must have the dtypes, sizes and alignment of the ones the
        tables were built with (the caller checks); only their addresses move."""
        if grad_ptrs == self.grad_ptrs:
            return False
        ptrs = torch.frombuffer(array.array("q", grad_ptrs), dtype=torch.int64)
        misaligned = (ptrs % ALIGN_BYTES) != 0
        for group in self.groups:
            if group.key[4] and bool(misaligned[group.index].any()):
                raise TablesStale("a gradient moved to an address that is not 16-byte aligned")
        for group in self.groups:
            column = ptrs[group.index]
            group.host[:, 2] = column
            # A fresh pinned copy per change: the caching host allocator keeps it alive until the
            # asynchronous copy has run, so the host table can be rewritten at once.
            src = group.host.pin_memory() if self.device.type == "cuda" else group.host
            group.table.copy_(src, non_blocking=True)
        self.grad_ptrs = grad_ptrs
        return True

    def set_divisor(self, value: float) -> None:
        """``F`` is read as ``F_sum / value`` from now on (kept on the device; rewritten only on change)."""
        value = float(value)
        if value != self._divisor_value:
            self.divisor.fill_(value)
            self._divisor_value = value

    def run(self, counts: torch.Tensor, lam: float, beta_fallback: float) -> None:
        """Launch the update of every group, adding (fallbacks, non-finite) into ``counts``."""
        for group in self.groups:
            launch(_pema_kernel, (group.chunks.shape[0],), group.table, group.chunks, counts, self.divisor,
                   float(lam), float(beta_fallback), **group.constexprs)


# Small LRU cache for the functional form: the tables depend on the tensors' addresses, sizes and
# dtypes (stable while a caller keeps its buffers).
_CACHE: "OrderedDict[tuple, PemaLaunch]" = OrderedDict()
_CACHE_SIZE = 8


def pema_update_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    lam: float = 1e-5,
    beta_fallback: float = 0.99,
) -> torch.Tensor:
    """Triton twin of :func:`mage_kernels.reference.pema_update_` (in place on ``emas``).

    Inputs are validated by the caller (:func:`mage_kernels.ema.pema_update_`):
    equal lengths and shapes, one device, contiguous ``emas``. ``params`` and
    ``grads`` are made contiguous here when they are not, and so is an ``F``
    that is neither contiguous nor a row-major column block.
    Returns ``int64[2]`` on the device: (fallback elements, non-finite skips).
    """
    device = emas[0].device if len(emas) else torch.device("cpu")
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    if not len(emas):
        return counts
    ps, gs, fs = [], [], []
    for p, g, f in zip(params, grads, fishers):
        ps.append(p if p.is_contiguous() else p.contiguous())
        gs.append(g if g.is_contiguous() else g.contiguous())
        try:
            _f_layout(f)
        except ValueError:
            f = f.contiguous()
        fs.append(f)
    key = tuple((t.data_ptr(), t.dtype, tuple(t.stride()), t.numel()) for quad in zip(ps, emas, gs, fs) for t in quad)
    plan = _CACHE.get(key)
    if plan is None:
        plan = _CACHE[key] = PemaLaunch(ps, emas, gs, fs)
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    plan.run(counts, lam, beta_fallback)
    del ps, gs, fs  # contiguous copies lived until the launches were queued
    return counts
