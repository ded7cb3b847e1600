"""A minimal demo: fit a two-layer MageLinear model to a random teacher for a few steps."""

from __future__ import annotations

import torch
from torch import nn

import mage_kernels as mk


def run_demo(steps: int = 20, seed: int = 0) -> list:
    torch.manual_seed(seed)
    model = nn.Sequential(mk.MageLinear(64, 128), nn.GELU(), mk.MageLinear(128, 64))
    model[0].for_task({"image", "text"}, "text")
    model[2].for_task({"image", "text"}, "text")
    teacher = nn.Linear(64, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        x = torch.randn(8, 16, 64)
        loss = nn.functional.mse_loss(model(x), teacher(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}  backend {mk.resolve_backend(x.device)}")
    return losses
