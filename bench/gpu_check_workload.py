"""Small workload of the CUDA extension's ops, run under compute-sanitizer by ``bench/gpu_check.sh``.

Exercises every code path of ``torch.ops.mage_cuda.*`` once on small tensors:
PEMA with fp32/fp16/bf16 and mixed storage, ragged sizes, misaligned (scalar
path) and aligned (vector path) tensors; the weight gradient with and without
Fisher and token weights, for every tile shape, the direct and the split
(atomic) paths, strided inputs and a strided Fisher view. Also checks the
results against the reference, so a sanitizer-clean but wrong run still fails.
Exit status 0 = all good.
"""

from __future__ import annotations

import sys

import torch

from mage_kernels import cuda_extension, reference


def main() -> int:
    if not torch.cuda.is_available() or cuda_extension.load() is None:
        print("gpu_check_workload: needs a CUDA device and the built extension:", cuda_extension.why_unavailable())
        return 2
    torch.manual_seed(0)
    dev = "cuda"
    failures = 0

    # PEMA: aligned and misaligned, ragged sizes, mixed dtypes, NaN/inf.
    for dtypes in [(torch.float32,) * 4, (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),
                   (torch.float16, torch.float16, torch.float16, torch.float32)]:
        groups = []
        for i, n in enumerate([1, 5, 1000, 16385, 33000]):
            ts = [torch.randn(n, device=dev), None, 0.5 * torch.randn(n, device=dev), 50 * torch.rand(n, device=dev)]
            ts[1] = ts[0] + 0.5 * torch.randn(n, device=dev)
            ts[2][::97] = float("nan")
            ts[0][::131] = float("inf")
            out = []
            for t, dt in zip(ts, dtypes):
                t = t.to(dt)
                if i % 2:  # misaligned by one element
                    buf = torch.empty(n + 1, dtype=dt, device=dev)
                    buf[1:].copy_(t)
                    t = buf[1:]
                out.append(t)
            groups.append(out)
        params, emas, grads, fishers = (list(x) for x in zip(*groups))
        ref_emas = [e.clone() for e in emas]
        with torch.no_grad():
            counts = torch.ops.mage_cuda.pema_update_(params, emas, grads, fishers, 1e-5, 0.99)
            ref_counts = reference.pema_update_(params, ref_emas, grads, fishers, 1e-5, 0.99)
        torch.cuda.synchronize()
        if counts.tolist() != ref_counts.tolist():
            print("PEMA counts differ:", counts.tolist(), ref_counts.tolist())
            failures += 1
        for e, r in zip(emas, ref_emas):
            if not torch.allclose(e.float(), r.float(), rtol=1e-2, atol=1e-6, equal_nan=True):
                print("PEMA values differ for", e.dtype)
                failures += 1

    # Weight gradient + Fisher: every tile shape, direct and split paths, strided views.
    cases = [(3, 37, 8, 300), (64, 5, 13, 70), (4, 33, 200, 12), (1, 17, 65, 130), (2, 40, 70, 90)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, t, p, q in cases:
            m = n * t
            g = torch.randn(m, p + 4, device=dev, dtype=dtype)[:, 2:2 + p]
            x = torch.randn(q, m, device=dev, dtype=dtype).t()
            for with_fisher, weighted in ((False, False), (True, False), (True, True)):
                big = torch.rand(p, q + 3, device=dev)
                fisher = big[:, 1:1 + q] if with_fisher else None
                w = torch.rand(m, device=dev) if weighted else None
                want_f = None if fisher is None else fisher.double().clone()
                grad = torch.ops.mage_cuda.weight_grad_with_fisher(g, x, n, 0.5, fisher, w, 2.0)
                want = reference.weight_grad_with_fisher(g.double(), x.double(), n, 0.5, want_f,
                                                         None if w is None else w.double(), 2.0)
                torch.cuda.synchronize()
                tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
                if not torch.allclose(grad.double(), want, rtol=tol, atol=tol * (1 + want.abs().max().item())):
                    print("weight grad differs:", dtype, (n, t, p, q), with_fisher, weighted)
                    failures += 1
                if fisher is not None and not torch.allclose(fisher.double(), want_f, rtol=1e-4,
                                                             atol=1e-5 * (1 + want_f.abs().max().item())):
                    print("Fisher differs:", dtype, (n, t, p, q), weighted)
                    failures += 1
    print("gpu_check_workload:", "OK" if failures == 0 else f"{failures} FAILURES")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
