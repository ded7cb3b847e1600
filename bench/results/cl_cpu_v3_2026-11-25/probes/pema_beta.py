"""Why PEMA's beta always falls back on the ``cpu`` preset: the sizes of g, F and theta - theta*.

Trains MAGE on the first task of the default order (VQAv2) on the cached ``cpu`` base and, at
steps 1, 10, 50, 100, 250, prints quantiles over all trained adapter elements of |g|,
F, F*(theta - theta*) and beta = (g + 1) / (F*(theta - theta*) + lam) (ALGORITHM.md section 3; theta* is
the EMA before this step's update) and the share of elements with 0 < beta < 1.
"""
import copy

import torch

import mage_kernels as mk
from mage_cl.methods import make_method
from mage_cl.model import load_pretrained
from mage_cl.presets import get_preset
from mage_cl.tasks import build_tasks
from mage_cl.trainer import train_task
from mage_cl.vocab import Vocab

torch.set_num_threads(1)
mk.set_backend("torch")
pre = get_preset("cpu")
vocab = Vocab()
tasks = build_tasks("cpu", 0, vocab)
base, _ = load_pretrained(vocab, tasks, pre.model, pre.pretrain, 0)
model = copy.deepcopy(base)
method = make_method("mage")
torch.manual_seed(0)
method.setup(model)
task = tasks["vqa"]
method.before_task(task, 0)
step = [0]
inner = method.after_step


def q(t):
    t = t.flatten().double()
    qs = torch.quantile(t[torch.randperm(t.numel())[:100000]], torch.tensor([0.5, 0.99], dtype=torch.float64))
    return f"median {qs[0].item():.2e}  p99 {qs[1].item():.2e}  max {t.max().item():.2e}"


def after_step(fisher):
    step[0] += 1
    if step[0] in (1, 10, 50, 100, 250):
        pema = method.pema
        idx = [i for i, p in enumerate(pema.params) if p.grad is not None]
        ps = [pema.params[i] for i in idx]
        g = torch.cat([p.grad.flatten() for p in ps])
        F = torch.cat([f.flatten() for f in fisher.for_parameters(ps)])
        d = torch.cat([(p.detach() - pema.emas[i]).flatten() for i, p in zip(idx, ps)])
        beta = (g + 1) / (F * d + method.lam)
        inside = ((beta > 0) & (beta < 1)).double().mean().item()
        print(f"step {step[0]}: |g| {q(g.abs())}\n  F {q(F)}\n  |F*(theta-theta*)| {q((F * d).abs())}\n"
              f"  share of 0<beta<1: {inside:.6f}", flush=True)
    inner(fisher)


method.after_step = after_step
train_task(model, method, task.train, pre.train, vocab.pad_id, 0)
