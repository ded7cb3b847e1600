"""Host-side cost of one ``PEMA.update`` for 1,680 adapter tensors, with the kernel launch a no-op.

    TRITON_INTERPRET=1 python bench/pema_host_overhead.py               # this tree
    TRITON_INTERPRET=1 python bench/pema_host_overhead.py --tree OLD    # another checkout (before/after)

The workload is the tensor COUNT of MAGE on LLaMA-13B: 40 blocks x 7 projections x 3
trainable adapters x (A, B) = 1,680 tensors, each with a gradient and a Fisher. The
host work per call does not depend on the tensors' sizes, so the layers are narrow
(``--d``, default 64) to keep memory small. Everything runs on CPU tensors with backend
``triton`` (``TRITON_INTERPRET=1`` lets it accept CPU tensors) and the Triton kernel
replaced by a no-op (``mage_kernels.kernels.pema._pema_kernel``), so the time is
exactly the Python/PyTorch host path: validation, table bookkeeping, dispatch, the
counters. On a GPU the launch itself (~tens of microseconds per kernel) and the small
CUDA tensor ops cost more than on CPU; the CUDA-graph mode (``pema.cuda_graph = True``)
cannot run here.

Modes (each a median over ``--calls`` calls, ms per call):

* ``grads-move``: every step gets NEW gradient tensors (``zero_grad(set_to_none=True)``,
  PyTorch's default), so their addresses can change at every call.
* ``grads-stay``: the same gradient tensors every step (``set_to_none=False``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", help="import mage_kernels from this source tree (default: this one)")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()
    root = args.tree or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)

    import torch
    from torch import nn

    import mage_kernels as mk
    from mage_kernels.kernels import pema as kpema

    assert os.path.abspath(mk.__file__).startswith(os.path.abspath(root)), mk.__file__

    class _Noop:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    kpema._pema_kernel = _Noop()  # the launch costs nothing: only the host path is timed

    class _Shape(nn.Module):  # a weightless base: PEMA needs the adapters only
        def __init__(self, i, o):
            super().__init__()
            self.in_features, self.out_features = i, o

    d, ffn = args.d, 2 * args.d
    projections = [(d, d)] * 4 + [(d, ffn), (d, ffn), (ffn, d)]
    model = nn.ModuleList()
    for _ in range(40):
        for i, o in projections:
            layer = mk.MageLinear(i, o, r=8, dropout=0.0, base=_Shape(i, o))
            layer.set_trainable([0, 1, 2])
            model.append(layer)
    fisher = mk.Fisher(model)
    for _, layer in fisher.layers:  # as if a backward of 4 samples had run (the sums' values do not matter)
        layer.fisher_count.fill_(4)
    pema = mk.PEMA(model, backend="triton")
    params = pema.params
    assert len(params) == 1680, len(params)
    grads = [[torch.randn_like(p) for p in params] for _ in range(2)]

    out = {"label": args.label, "tree": root, "tensors": len(params), "d": d, "torch": torch.__version__}
    for mode in ("grads-move", "grads-stay"):
        times = []
        for call in range(args.calls + 5):
            if mode == "grads-move":
                for p, g in zip(params, grads[call % 2]):  # new tensor objects at other addresses
                    p.grad = g
            elif call == 0:
                for p, g in zip(params, grads[0]):
                    p.grad = g
            t0 = time.perf_counter()
            pema.update(fisher)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times[5:]) * 1e3
        out[mode] = round(med, 3)
        print(f"{args.label:>14}  {mode:<11} PEMA.update host time: {med:7.3f} ms per call "
              f"(median of {args.calls}, {len(params)} tensors, launch = no-op)")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
