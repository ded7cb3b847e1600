"""Probe: the multitask bound's per-task accuracy along a long run.

python probe_mt_curve.py SEED SCALE EVERY OUT.jsonl [sample|token] : trains the cpu preset's multitask bound for
SCALE x 250 x 6 steps (seed SEED) and evaluates every task on its 300 test examples every EVERY steps.
"""
import json, sys, time
from dataclasses import replace
sys.path[:0] = ["/work/runs_src", "/work/runs_src/python"]
from mage_cl import presets, trainer
from mage_cl.methods import base

seed, scale, every, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
loss_kind = sys.argv[5] if len(sys.argv) > 5 else "sample"  # sample: the driver's mean of per-sample means; token: mean over all target tokens
if loss_kind == "token":
    import torch
    def token_mean_loss(model, batch):
        out_ = model(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out_.logits[:, :-1].float()
        labels = batch["labels"][:, batch["labels"].shape[1] - out_.logits.shape[1] + 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
    base.batch_loss = token_mean_loss
p = presets.PRESETS["cpu"]
presets.PRESETS["cpu"] = replace(p, train=replace(p.train, joint_steps_scale=scale))
state = {"seq": None, "step": 0, "t0": time.time()}
orig_run = trainer.Sequencer.run

def run(self, *a, **k):
    state["seq"] = self
    return orig_run(self, *a, **k)

trainer.Sequencer.run = run
orig_after = base.Multitask.after_step

def after_step(self, fisher):
    orig_after(self, fisher)
    state["step"] += 1
    if state["step"] % every == 0:
        seq = state["seq"]
        res, secs = seq.evaluate(seq.order)
        rec = {"step": state["step"], "acc": {n: r["acc"] for n, r in res.items()},
               "eval_s": secs, "elapsed_s": time.time() - state["t0"]}
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(rec, flush=True)

base.Multitask.after_step = after_step
from mage_cl.cli import main
sys.exit(main(["run", "--method", "multitask", "--preset", "cpu", "--seed", str(seed), "--no-progress",
               "--out", out + ".run", "--overwrite"]))
