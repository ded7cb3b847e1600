"""Probe: python probe_schedule.py METHOD LR SCHEDULE OUT [more mage-cl args]; SCHEDULE constant|cosine|wsdF (cosine over the last F of each task)."""
import math, sys
from dataclasses import replace
sys.path[:0] = ["/work/main", "/work/main/python"]
from mage_cl import presets, engines
method, lr, sched, out = sys.argv[1:5]
p = presets.PRESETS["cpu"]
if sched.startswith("wsd"):
    frac = float(sched[3:])
    def f(cfg, step, frac=frac):
        warm = max(1, cfg.warmup_steps)
        if step + 1 < warm:
            return (step + 1) / warm
        T = cfg.steps_per_task
        start = int(T * (1 - frac))
        if step < start:
            return 1.0
        done = min(1.0, (step + 1 - start) / max(1, T - start + 1))
        return 0.5 * (1 + math.cos(math.pi * done))
    engines.lr_factor = f
    sched = "constant"
presets.PRESETS["cpu"] = replace(p, train=replace(p.train, lr_schedule=sched))
from mage_cl.cli import main
sys.exit(main(["run", "--method", method, "--preset", "cpu", "--lr", lr, "--no-progress", "--out", out, "--overwrite", *sys.argv[5:]]))
