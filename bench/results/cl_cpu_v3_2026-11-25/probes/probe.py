"""Probe used to choose the v3 benchmark (2026-11-25): a partial continual sequence on the cached
``cpu`` base, with lr / steps / rank / editing-op overrides, printing accuracy and IUF per stage.

Run from a checkout with the package installed (``pip install -e .``), e.g.
``python probe.py --method mage --tasks vqa,classification,ocr``. ``--edit-ops "a|b"`` keeps only
those editing instructions (filtered after the base is loaded, so the cached base is reused).
Not part of the library or its tests; kept so the logs beside it can be reproduced.
"""
import argparse, copy, dataclasses, time, sys, json
import torch
import mage_kernels as mk
from mage_cl.presets import get_preset
from mage_cl.tasks import build_tasks
from mage_cl.vocab import Vocab
from mage_cl.model import load_pretrained
from mage_cl.trainer import Sequencer
from mage_cl.methods import make_method

p = argparse.ArgumentParser()
p.add_argument("--method", default="lora")
p.add_argument("--tasks", default="vqa,classification,generation,ocr,grounding,editing")
p.add_argument("--lr", type=float, default=None)
p.add_argument("--steps", type=int, default=None)
p.add_argument("--pretrain-steps", type=int, default=None)
p.add_argument("--edit-ops", default=None)
p.add_argument("--max-eval", type=int, default=None)
p.add_argument("--r-total", type=int, default=32)
a = p.parse_args()
torch.set_num_threads(1)
mk.set_backend("torch")
pre = get_preset("cpu")
pt = pre.pretrain if a.pretrain_steps is None else dataclasses.replace(pre.pretrain, steps=a.pretrain_steps)
tr = pre.train
if a.lr: tr = dataclasses.replace(tr, lr=a.lr)
if a.steps: tr = dataclasses.replace(tr, steps_per_task=a.steps)
if a.max_eval: tr = dataclasses.replace(tr, max_eval=a.max_eval)
vocab = Vocab()
tasks = build_tasks("cpu", 0, vocab)
model, info = load_pretrained(vocab, tasks, pre.model, pt, 0, progress=False)
if a.edit_ops:
    ops = a.edit_ops.split("|")
    t = tasks["editing"]
    t.train = [e for e in t.train if e.meta["edit"] in ops]
    t.test = [e for e in t.test if e.meta["edit"] in ops]
print("pretrain", info.get("loss"), flush=True)
model = copy.deepcopy(model)
from mage_cl.methods.base import MethodConfig
m = make_method(a.method, MethodConfig(r_total=a.r_total)); torch.manual_seed(0); m.setup(model)
names = a.tasks.split(",")
seq = Sequencer(model, m, tasks, names, tr, vocab.pad_id, vocab.eos_id)
t0 = time.time()
def show(j, st):
    print(f"[{time.time()-t0:.0f}s] after {names[j]} loss {st.final_loss:.3f}: " + " ".join(f"{n}={st.acc[n]:.0f}/iuf{st.iuf[n]:.0f}" for n in names[:j+1]), st.extra, flush=True)
seq.run(on_stage=show)
