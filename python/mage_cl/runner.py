"""Run one method (or several) end to end: data, model, method, sequence, checkpoints, results.

:func:`run` is what ``mage-cl run`` does and :func:`compare` what ``mage-cl compare``
does; the CLI (:mod:`mage_cl.cli`) only parses arguments. Two data/model sources:

* the embedded digits benchmark (default): :func:`mage_cl.tasks.build_tasks` and the
  small pretrained joint-vocabulary LLaMA of :mod:`mage_cl.model`;
* ``model_path`` + ``data_dir``: a local transformers checkpoint and Continual-NExT
  annotation files (``<data_dir>/<task>/train.jsonl`` and ``<data_dir>/<task>/test.json``
  for the text-output tasks found there; ``<task>`` is ``vqa`` or ``VQAv2``, ``classification``
  or ``ImageNet``, ``ocr`` or ``OCRVQA``, ``grounding`` or ``RefCOCO``), loaded by :mod:`mage_cl.tasks.realdata`.

A run writes ``<out>/checkpoint.{pt,json}`` after every stage (rank 0 only) and, when
finished, its results directory (:mod:`mage_cl.results`).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import mage_kernels as mk

from . import checkpoint, distributed, results
from .methods import METHODS, make_method
from .presets import Preset, get_preset
from .trainer import Sequencer, StageResult

__all__ = ["RunOptions", "UsageError", "prepare", "run", "compare", "TEXT_OUTPUT_TASKS"]

#: Tasks whose answers are text (the ones a text-only user model can run).
TEXT_OUTPUT_TASKS = ("vqa", "classification", "ocr", "grounding")


class UsageError(ValueError):
    """A bad command-line choice (unknown method, order, preset, missing path)."""


@dataclass
class RunOptions:
    method: str = "mage"
    order: str = "default"
    preset: str = "smoke"
    seed: int = 0
    out: Optional[str] = None
    resume: bool = False
    model_path: Optional[str] = None
    data_dir: Optional[str] = None
    backend: str = "auto"
    progress: bool = True
    max_stages: Optional[int] = None  # stop after this many stages (a deliberate interruption)
    steps_per_task: Optional[int] = None  # override the preset's


def _validate(opts: RunOptions) -> Preset:
    from .tasks import ORDERS

    if opts.method not in METHODS:
        raise UsageError(f"unknown method {opts.method!r}; choose from {', '.join(METHODS)}")
    if opts.order not in ORDERS:
        raise UsageError(f"unknown order {opts.order!r}; choose from {', '.join(ORDERS)}")
    try:
        preset = get_preset(opts.preset)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if opts.backend not in ("auto", "torch", "triton", "cuda"):
        raise UsageError(f"unknown backend {opts.backend!r}; choose from auto, torch, triton, cuda")
    if (opts.model_path is None) != (opts.data_dir is None):
        raise UsageError("--model and --data-dir go together (a user model needs user data, and vice versa)")
    for p in (opts.model_path, opts.data_dir):
        if p is not None and not os.path.isdir(p):
            raise UsageError(f"{p}: no such directory")
    if opts.steps_per_task is not None:
        preset = replace(preset, train=replace(preset.train, steps_per_task=int(opts.steps_per_task)))
    preset = replace(preset, train=replace(preset.train, seed=opts.seed))
    return preset


class Workload:
    """Tasks, the frozen base model and token ids for a run (shared by every method of a comparison)."""

    def __init__(self, tasks, names: List[str], base_model, pad_id: int, eos_id: int, info: Dict[str, object]):
        self.tasks, self.names, self.base_model = tasks, names, base_model
        self.pad_id, self.eos_id, self.info = pad_id, eos_id, info


def prepare(opts: RunOptions, preset: Preset) -> Workload:
    """Load (or build) the tasks and the frozen base model."""
    from .tasks import order_names

    names = order_names(opts.order)
    if opts.model_path is not None:
        from .model import load_local_model
        from .tasks import realdata

        found = {}
        for name in names:
            if name not in TEXT_OUTPUT_TASKS:
                continue
            for folder_name in (name, getattr(realdata, "TEXT_TASKS", {}).get(name, name)):
                folder = Path(opts.data_dir) / folder_name
                train, test = folder / "train.jsonl", folder / "test.json"
                if train.exists() and test.exists():
                    found[name] = (train, test)
                    break
        if not found:
            raise UsageError(f"--data-dir {opts.data_dir}: found no <task>/train.jsonl + <task>/test.json for the "
                             f"text-output tasks {', '.join(TEXT_OUTPUT_TASKS)}")
        model, tok = load_local_model(opts.model_path)
        tasks = {}
        for name, (tr, te) in found.items():
            try:
                tasks[name] = realdata.load_task(name, str(tr), str(te), tok)
            except (ValueError, OSError) as exc:  # malformed annotations: one clear line
                raise UsageError(f"{name}: {exc}") from None
        names = [n for n in names if n in tasks]
        info = {"model": os.path.abspath(opts.model_path), "data": os.path.abspath(opts.data_dir)}
        return Workload(tasks, names, model, tok.pad_token_id, tok.eos_token_id, info)
    from .model import load_pretrained
    from .tasks import build_tasks
    from .vocab import Vocab

    vocab = Vocab()
    tasks = build_tasks(preset.name, opts.seed, vocab)
    # every rank builds the same model from the seed; rank 0 pretrains first so the others read its cache
    if distributed.is_main():
        model, info = load_pretrained(vocab, tasks, preset.model, preset.pretrain, opts.seed, progress=opts.progress)
    distributed.barrier()
    if not distributed.is_main():
        model, info = load_pretrained(vocab, tasks, preset.model, preset.pretrain, opts.seed)
    info = {"model": f"tiny-llama:{info['key']}", "pretrain_loss": info.get("loss"), "data": "digits"}
    return Workload(tasks, names, model, vocab.pad_id, vocab.eos_id, info)


def _config(opts: RunOptions, preset: Preset, work: Workload) -> Dict[str, object]:
    return {"method": opts.method, "order": opts.order, "preset": opts.preset, "seed": opts.seed,
            "model": work.info["model"], "data": work.info["data"], "tasks": work.names,
            "train": asdict(preset.train), "world_size": distributed.world_size()}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def _cpu_threads(n: Optional[int]):
    """Use ``n`` torch CPU threads inside the block (``$MAGE_CL_THREADS`` overrides), then restore."""
    n = int(os.environ.get("MAGE_CL_THREADS", n or 0)) or None
    old = torch.get_num_threads()
    if n and not torch.cuda.is_available():
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(opts: RunOptions, work: Optional[Workload] = None, write: bool = True) -> Dict[str, object]:
    """Run ``opts.method`` through the order; returns the results record (also written under ``opts.out``)."""
    preset = _validate(opts)
    with _cpu_threads(preset.cpu_threads):
        return _run(opts, preset, work, write)


def _run(opts: RunOptions, preset: Preset, work: Optional[Workload], write: bool) -> Dict[str, object]:
    mk.set_backend(opts.backend)
    t_start = time.perf_counter()
    work = work or prepare(opts, preset)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = copy.deepcopy(work.base_model).to(device)
    method = make_method(opts.method)
    torch.manual_seed(opts.seed)  # adapter initialization (A ~ N(0, 0.01^2), MoELoRA router)
    method.setup(model)
    out = Path(opts.out) if opts.out else None
    config = _config(opts, preset, work)
    stages: List[dict] = []
    start = 0
    if out is not None and opts.resume:
        payload = checkpoint.load(out, config)
        if payload is not None:
            try:
                method.load_adapter_state(payload["adapters"])
                method.load_state_dict(payload["method_state"])
            except (KeyError, ValueError) as exc:
                raise checkpoint.CheckpointError(f"checkpoint in {out} does not fit this model/method: {exc}") from None
            stages = list(payload["stages"])
            start = int(payload["stages_done"])
    elif out is not None and checkpoint.exists(out) and distributed.is_main():
        raise UsageError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")

    def on_stage(j: int, st: StageResult) -> None:
        stages.append(asdict(st))
        if out is not None and distributed.is_main():
            payload = {"stages_done": j + 1, "stages": stages, "adapters": method.adapter_state(),
                       "method_state": method.state_dict()}
            checkpoint.save(out, payload, config)
        if (opts.max_stages is not None and not method.joint and len(stages) >= opts.max_stages
                and len(stages) < len(work.names)):
            raise _Stop()

    seq = Sequencer(model, method, work.tasks, work.names, preset.train, work.pad_id, work.eos_id,
                    progress=opts.progress)
    done = start >= (1 if method.joint else len(work.names)) and bool(stages)
    if not done:
        try:
            seq.run(start_stage=start, on_stage=on_stage)
        except _Stop:
            pass
    method.finish()
    meta = {
        "order": opts.order, "preset": opts.preset, "seed": opts.seed, "backend": mk.resolve_backend(device),
        "device": _device_name(device), "world_size": distributed.world_size(),
        "wall_seconds": time.perf_counter() - t_start, "date": datetime.date.today().isoformat(),
        "steps_per_task": preset.train.steps_per_task, **work.info,
    }
    paper = [getattr(work.tasks[n], "paper_name", n) for n in work.names]
    record = results.build_record(opts.method, work.names, paper, stages, method.joint, meta)
    if out is not None and write and distributed.is_main() and record["complete"]:
        results.write_run(out, record)
    return record


class _Stop(Exception):
    """Raised by the stage callback to stop after ``max_stages``."""


def _run_in_worker(opts: RunOptions) -> Dict[str, object]:
    """One method of a comparison in a worker process (its own workload; the base model comes from the cache)."""
    return run(opts)


def compare(methods: Sequence[str], opts: RunOptions, jobs: int = 1) -> Tuple[List[Dict[str, object]], str]:
    """Run every method on the same tasks and base model; write one combined table. Returns (records, md).

    ``jobs > 1`` runs that many methods at once in worker processes (each with the
    preset's thread count); the base model is pretrained once, before the workers start.
    """
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not methods:
        raise UsageError("--methods is empty")
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and distributed.is_distributed():
        raise UsageError("--jobs cannot be combined with torchrun (DDP already uses the processes)")
    preset = _validate(replace(opts, method=methods[0]))
    mk.set_backend(opts.backend)
    t0 = time.perf_counter()
    with _cpu_threads(preset.cpu_threads):
        work = prepare(opts, preset)
    subs = [replace(opts, method=m, out=str(Path(opts.out) / m) if opts.out else None) for m in methods]
    if jobs == 1:
        records = [run(sub, work) for sub in subs]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        subs = [replace(sub, progress=False) for sub in subs]
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            records = list(pool.map(_run_in_worker, subs))
    wall = time.perf_counter() - t0
    header = (f"Continual sequence ({opts.order} order, preset {opts.preset}, seed {opts.seed}); "
              f"{records[0]['device']}; backend {records[0]['backend']}; "
              f"{preset.train.steps_per_task} steps/task; {jobs} job(s); total wall time {wall / 60:.1f} min "
              f"({datetime.date.today().isoformat()}).\n\n")
    if opts.out and distributed.is_main():
        md = results.write_comparison(Path(opts.out), records, header)
    else:
        md = header + results.markdown_table(records)
    return records, md
