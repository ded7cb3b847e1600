"""PGP baseline (Qiao et al., ICLR'24: gradient projection) on one rank-32 LoRA.

Paper 9.4: PGP "changes the gradient direction orthogonal to the previous feature
subspace". Reading used here (GPM-style, as PGP does for prompts, applied to the
LoRA down-projections): after each task, the inputs ``x`` that reach every adapted
layer on the task's training set (target and prompt tokens, padding excluded) give
an uncentered covariance ``C = sum x x^T``; its leading eigenvectors, after removing
what the stored basis ``U`` already explains, are added to ``U`` until the basis
captures ``threshold`` (default 0.95) of the task's input energy. On later tasks
each ``lora_A`` gradient is projected onto the orthogonal complement,
``dA <- dA (I - U U^T)``, so ``A x`` stays (to first order) unchanged on old inputs.
``lora_B`` is trained freely (an approximation: PGP's prompts have no B). The
basis is capped at ``max(d_in - r, d_in // 2)`` columns so some plasticity always remains.
Covariances are summed over ranks, so every rank holds the same basis. Under FSDP2 and
DeepSpeed ZeRO the projection needs whole rows of the gradient: each step gathers every
``lora_A`` gradient (the engine's :meth:`~mage_cl.engines.TaskSteps.full_grad`), projects
it, and each rank writes its own part back before clipping and the optimizer step.
"""

from __future__ import annotations

from typing import Dict

import torch

import mage_kernels as mk

from .. import distributed
from .base import Method, tensor_bytes

__all__ = ["PGP"]


class PGP(Method):
    name = "pgp"
    summary = "PGP: gradient projection orthogonal to earlier tasks' input subspace, one rank-32 LoRA"

    def __init__(self, config=None, threshold: float = 0.95) -> None:
        super().__init__(config)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"PGP threshold must be in (0, 1); got {threshold}")
        self.threshold = threshold
        self.basis: Dict[str, torch.Tensor] = {}  # layer name -> U [d_in, k]

    def after_backward(self) -> None:
        steps = self.steps
        for name, layer in mk.mage_layers(self.model):
            u = self.basis.get(name)
            if u is None:
                continue
            for a in layer.lora_A:
                if not a.requires_grad:
                    continue
                # whole (gathered under FSDP2 / DeepSpeed), averaged, before clipping; a plain loop: p.grad
                g = a.grad if steps is None else steps.full_grad(a)
                if g is None:
                    continue
                g.sub_((g @ u) @ u.t())
                if steps is not None:
                    steps.set_full_grad(a, g)  # each rank writes its own part back (a no-op for p.grad itself)

    @torch.no_grad()
    def after_task(self, task, train_batches) -> None:
        layers = dict(mk.mage_layers(self.model))
        cov = {n: torch.zeros(l.in_features, l.in_features, dtype=torch.float64, device=l.lora_A[0].device)
               for n, l in layers.items()}
        mask_box = {}

        def hook(name):
            def fn(module, args):
                x = args[0].detach().to(torch.float64)
                m = mask_box["mask"].to(x.device)
                x = x[m]  # [tokens, d_in], padding dropped
                cov[name].add_(x.t() @ x)
            return fn

        handles = [l.register_forward_pre_hook(hook(n)) for n, l in layers.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in train_batches():
                mask_box["mask"] = batch["attention_mask"].bool()
                self.model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        for name, c in cov.items():
            distributed.all_reduce_sum(c)
            self.basis[name] = self._grow(self.basis.get(name), c, layers[name].in_features)

    def _grow(self, u, c: torch.Tensor, d_in: int) -> torch.Tensor:
        dt = c.dtype
        total = torch.trace(c).clamp_min(1e-30)
        k0 = 0 if u is None else u.shape[1]
        cap = max(d_in - self.r, d_in // 2)
        if u is None:
            u = torch.zeros(d_in, 0, dtype=dt, device=c.device)
        u = u.to(dt)
        explained = torch.trace(u.t() @ c @ u) if k0 else torch.zeros((), dtype=dt, device=c.device)
        if k0 >= cap or explained / total >= self.threshold:
            return u.float()
        p = torch.eye(d_in, dtype=dt, device=c.device) - u @ u.t()
        evals, evecs = torch.linalg.eigh(p @ c @ p)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order].clamp_min(0), evecs[:, order]
        need = self.threshold * total - explained
        k = int((torch.cumsum(evals, 0) < need).sum().item()) + 1
        k = min(k, cap - k0)
        new = evecs[:, :k]
        # re-orthogonalize against the old basis for numerical safety
        new = new - u @ (u.t() @ new)
        new, _ = torch.linalg.qr(new)
        return torch.cat([u, new], 1).float()

    def state_bytes(self) -> int:
        return tensor_bytes(self.basis.values())

    def state_dict(self):
        return {"basis": {k: v.cpu() for k, v in self.basis.items()}}

    def load_state_dict(self, state) -> None:
        dev = next(self.model.parameters()).device
        self.basis = {k: v.to(dev) for k, v in state.get("basis", {}).items()}
