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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    overwrite: bool = False  # replace the run (results and checkpoint) already in ``out``
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
    _check_int("seed", opts.seed, 0)
    _check_int("steps_per_task", opts.steps_per_task, 1, optional=True)
    _check_int("max_stages", opts.max_stages, 1, optional=True)
    if opts.resume and opts.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if opts.steps_per_task is not None:
        preset = replace(preset, train=replace(preset.train, steps_per_task=int(opts.steps_per_task)))
    preset = replace(preset, train=replace(preset.train, seed=opts.seed))
    return preset


def _check_int(name: str, value, lo: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {value!r}")


def default_out(opts: RunOptions, command: str = "run") -> Path:
    """``runs/<method>-<preset>-<order>-seed<k>`` (``runs/compare-...`` for a comparison), under the cwd."""
    what = opts.method if command == "run" else "compare"
    return Path("runs") / f"{what}-{opts.preset}-{opts.order}-seed{opts.seed}"


def out_dir(opts: RunOptions, command: str = "run") -> Path:
    """Where a run (or comparison) writes: ``opts.out``, else :func:`default_out`."""
    return Path(opts.out) if opts.out else default_out(opts, command)


def holds_run(out: Path) -> bool:
    """Whether ``out`` already holds a run's (or a comparison's) checkpoint or results."""
    return checkpoint.exists(out) or results.has_results(out)


def check_out(out: Path, opts: RunOptions) -> None:
    """Refuse (``UsageError``) an ``out`` that cannot be written, or that holds a run nobody asked to touch.

    Side-effect free apart from a probe file created and removed in the nearest existing
    directory (the only reliable test on a read-only filesystem, even for root).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {out} cannot be created: {probe} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".mage-cl-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out} is not writable ({probe}: {exc.strerror or exc})") from None
    if holds_run(out) and not (opts.resume or opts.overwrite):
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --out")


class Workload:
    """Tasks, the frozen base model and token ids for a run (shared by every method of a comparison).

    The base model is built on first use of :attr:`base_model` (for the embedded benchmark that
    means pretraining it, or reading it from the cache), so that a run can check its options and
    its checkpoint against ``info`` -- which names the base model -- before any training.
    """

    def __init__(self, tasks, names: List[str], base_model, pad_id: int, eos_id: int, info: Dict[str, object],
                 loader: Optional[Callable[[], torch.nn.Module]] = None):
        if (base_model is None) == (loader is None):
            raise ValueError("Workload needs exactly one of base_model and loader")
        self.tasks, self.names = tasks, names
        self._base, self._loader = base_model, loader
        self.pad_id, self.eos_id, self.info = pad_id, eos_id, info

    @property
    def base_model(self):
        if self._base is None:
            self._base = self._loader()
            self._loader = None
        return self._base


def prepare(opts: RunOptions, preset: Preset) -> Workload:
    """The tasks and the frozen base model (built lazily: see :class:`Workload`)."""
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
    from .model import base_model_key, load_pretrained
    from .tasks import build_tasks
    from .vocab import Vocab

    vocab = Vocab()
    tasks = build_tasks(preset.name, opts.seed, vocab)
    key, _ = base_model_key(vocab, tasks, preset.model, preset.pretrain, opts.seed)
    info: Dict[str, object] = {"model": f"tiny-llama:{key}", "pretrain_loss": None, "data": "digits"}

    def load():
        # every rank builds the same model from the seed; rank 0 pretrains first so the others read its cache
        _STATUS.update(phase="pretrain")
        if distributed.is_main():
            model, got = load_pretrained(vocab, tasks, preset.model, preset.pretrain, opts.seed,
                                         progress=opts.progress)
        distributed.barrier()
        if not distributed.is_main():
            model, got = load_pretrained(vocab, tasks, preset.model, preset.pretrain, opts.seed)
        info["pretrain_loss"] = got.get("loss")
        return model

    return Workload(tasks, names, None, vocab.pad_id, vocab.eos_id, info, loader=load)


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


def _say(message: str) -> None:
    """One status line on stderr (rank 0 only)."""
    if distributed.is_main():
        print(f"mage-cl: {message}", file=sys.stderr, flush=True)


# Where the current process is, for the one-line Ctrl-C message (:func:`interrupted_line`).
_STATUS: Dict[str, object] = {}


def interrupted_line() -> str:
    """What was interrupted and how to continue, in one line (the CLI prints it on Ctrl-C)."""
    st = dict(_STATUS)
    out = st.get("out")
    if st.get("phase") == "compare":
        return (f"interrupted during the comparison in {out}; rerun the same command with --resume to continue "
                "(finished stages and methods are kept)")
    if st.get("phase") == "stage":
        done = int(st.get("done", 0))
        kept = f"the checkpoint in {out} holds {done} finished stage(s)" if done else "no stage had finished"
        return (f"interrupted during stage {st['stage']} of {st['of']} ({st['task']}); {kept}; "
                "rerun with --resume to continue")
    if st.get("phase") == "pretrain":
        return "interrupted while pretraining the base model (nothing to resume yet); rerun the same command"
    return "interrupted before training started; rerun the same command"


def summary_line(record: Dict[str, object]) -> str:
    """The headline numbers of a run and where its results are, in one line."""
    where = record.get("out")
    if not record["complete"]:
        n = len(record["stage_avg_acc"])
        return (f"mage-cl: stopped after {n} of {len(record['tasks'])} stage(s); the checkpoint is in {where}/: "
                "continue with --resume")
    m = record["metrics"]
    nums = ", ".join(f"{k} {results.fmt(m[k])}" for k in ("Avg.ACC", "Forgetting", "New.ACC")
                     if m.get(k) is not None and not (isinstance(m[k], float) and m[k] != m[k]))
    head = f"{record['method']} ({record['preset']} preset, {record['order']} order, seed {record['seed']})"
    return f"mage-cl: {head}: {nums}; results in {where}/" if where else f"mage-cl: {head}: {nums}"


def run(opts: RunOptions, work: Optional[Workload] = None, write: bool = True) -> Dict[str, object]:
    """Run ``opts.method`` through the order; returns the results record (also written to its out dir).

    Everything about the options is checked first (:class:`UsageError`): nothing is built or
    trained before an error. The out dir is ``opts.out`` or :func:`default_out`.
    """
    preset = _validate(opts)
    out = out_dir(opts)
    check_out(out, opts)
    with _cpu_threads(preset.cpu_threads):
        return _run(opts, preset, out, work, write)


class _DeferInterrupt:
    """Hold back SIGINT while a checkpoint is written, then deliver it (the checkpoint stays whole)."""

    def __enter__(self):
        import signal
        import threading

        self._got = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self._got = True

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        if self._got and exc[0] is None:
            raise KeyboardInterrupt
        return False


def _run(opts: RunOptions, preset: Preset, out: Path, work: Optional[Workload], write: bool) -> Dict[str, object]:
    mk.set_backend(opts.backend)
    t_start = time.perf_counter()
    _STATUS.clear()
    _STATUS.update(phase="prepare", out=out)
    work = work or prepare(opts, preset)
    method = make_method(opts.method)
    n_stages = 1 if method.joint else len(work.names)
    config = _config(opts, preset, work)
    stages: List[dict] = []
    start, elapsed_before, processes = 0, 0.0, 1
    payload = None
    if opts.resume:
        payload = checkpoint.load(out, config)  # verified: CheckpointError (one line) if corrupt or foreign
        if payload is None:
            _say(f"no checkpoint in {out}; starting from the first stage")
    elif opts.overwrite and distributed.is_main():
        removed = checkpoint.remove(out) + results.remove_results(out)
        if removed:
            _say(f"--overwrite: removed the previous run in {out} ({', '.join(removed)})")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = copy.deepcopy(work.base_model).to(device)
    torch.manual_seed(opts.seed)  # adapter initialization (A ~ N(0, 0.01^2), MoELoRA router)
    method.setup(model)
    if payload is not None:
        try:
            method.load_adapter_state(payload["adapters"])
            method.load_state_dict(payload["method_state"])
        except (KeyError, ValueError) as exc:
            raise checkpoint.CheckpointError(f"checkpoint in {out} does not fit this model/method: {exc}") from None
        stages = list(payload["stages"])
        start = int(payload["stages_done"])
        elapsed_before = float(payload.get("elapsed_seconds", 0.0))
        processes = int(payload.get("processes", 1)) + 1
        finished = [st["task"] for st in stages]
        if start >= n_stages:
            _say(f"resuming {out}: all {n_stages} stage(s) were finished; rebuilding the results")
        else:
            _say(f"resuming {out}: {start} of {n_stages} stage(s) finished ({', '.join(finished)}); "
                 f"continuing with stage {start + 1} ({work.names[start]})")
    _STATUS.update(done=start)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def on_stage_start(j: int, name: str) -> None:
        _STATUS.update(phase="stage", stage=j + 1, of=n_stages, task=name)

    def on_stage(j: int, st: StageResult) -> None:
        stages.append(asdict(st))
        if distributed.is_main():
            payload = {"stages_done": j + 1, "stages": stages, "adapters": method.adapter_state(),
                       "method_state": method.state_dict(), "elapsed_seconds": elapsed(),
                       "processes": processes}
            with _DeferInterrupt():
                checkpoint.save(out, payload, config)
        _STATUS.update(done=j + 1)
        if (opts.max_stages is not None and not method.joint and len(stages) >= opts.max_stages
                and len(stages) < len(work.names)):
            raise _Stop()

    seq = Sequencer(model, method, work.tasks, work.names, preset.train, work.pad_id, work.eos_id,
                    progress=opts.progress)
    done = start >= n_stages and bool(stages)
    if not done:
        try:
            seq.run(start_stage=start, on_stage=on_stage, on_stage_start=on_stage_start)
        except _Stop:
            pass
    method.finish()
    _STATUS.update(phase="write")
    meta = {
        "order": opts.order, "preset": opts.preset, "seed": opts.seed, "backend": mk.resolve_backend(device),
        "device": _device_name(device), "world_size": distributed.world_size(),
        "wall_seconds": elapsed(), "processes": processes, "date": datetime.date.today().isoformat(),
        "steps_per_task": preset.train.steps_per_task, "out": str(out), **work.info,
    }
    paper = [getattr(work.tasks[n], "paper_name", n) for n in work.names]
    record = results.build_record(opts.method, work.names, paper, stages, method.joint, meta)
    if write and distributed.is_main() and record["complete"]:
        with _DeferInterrupt():
            results.write_run(out, record)
    return record


class _Stop(Exception):
    """Raised by the stage callback to stop after ``max_stages``."""


def _run_in_worker(opts: RunOptions) -> Dict[str, object]:
    """One method of a comparison in a worker process (its own workload; the base model comes from the cache)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the pool
    return run(opts)


def compare(methods: Sequence[str], opts: RunOptions,
            jobs: int = 1) -> Tuple[List[Dict[str, object]], str, Path]:
    """Run every method on the same tasks and base model; write one combined table.

    Returns ``(records, markdown, out_dir)``. The out dir (``opts.out`` or
    ``runs/compare-<preset>-<order>-seed<k>``) gets the combined table and one
    subdirectory per method. ``jobs > 1`` runs that many methods at once in worker
    processes (each with the preset's thread count); the base model is pretrained once,
    before the workers start. Every method's options and out dir are checked first.
    """
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not methods:
        raise UsageError("--methods is empty")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods names a method twice: {', '.join(methods)}")
    _check_int("jobs", jobs, 1)
    if jobs > 1 and distributed.is_distributed():
        raise UsageError("--jobs cannot be combined with torchrun (DDP already uses the processes)")
    preset = _validate(replace(opts, method=methods[0]))
    out = out_dir(opts, "compare")
    subs = [replace(opts, method=m, out=str(out / m)) for m in methods]
    for sub in subs:
        _validate(sub)
        check_out(Path(sub.out), sub)
    if not (opts.resume or opts.overwrite) and results.has_results(out):
        raise UsageError(f"{out} already holds a comparison: pass --resume to continue it, --overwrite to replace "
                         "it, or choose another --out")
    mk.set_backend(opts.backend)
    t0 = time.perf_counter()
    _STATUS.clear()
    _STATUS.update(phase="prepare", out=out)
    with _cpu_threads(preset.cpu_threads):
        work = prepare(opts, preset)
        work.base_model  # pretrain once, before any worker starts
    if jobs == 1:
        records = []
        for sub in subs:
            records.append(run(sub, work))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        subs = [replace(sub, progress=False) for sub in subs]
        _STATUS.update(phase="compare")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            records = list(pool.map(_run_in_worker, subs))
    wall = time.perf_counter() - t0
    header = (f"Continual sequence ({opts.order} order, preset {opts.preset}, seed {opts.seed}); "
              f"{records[0]['device']}; backend {records[0]['backend']}; "
              f"{preset.train.steps_per_task} steps/task; {jobs} job(s); total wall time {wall / 60:.1f} min "
              f"({datetime.date.today().isoformat()}).\n\n")
    if distributed.is_main():
        md = results.write_comparison(out, records, header)
    else:
        md = header + results.markdown_table(records)
    return records, md, out
