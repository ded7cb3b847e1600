"""Run one method (or several) end to end: data, model, method, sequence, checkpoints, results.

:func:`run` is what ``mage-cl run`` does and :func:`compare` what ``mage-cl compare``
does; the CLI (:mod:`mage_cl.cli`) only parses arguments. Two data/model sources:

* the embedded digits benchmark (default): :func:`mage_cl.tasks.build_tasks` and the
  small pretrained joint-vocabulary LLaMA of :mod:`mage_cl.model`;
* ``model_path`` + ``data_dir``: a local transformers checkpoint -- Janus, Emu3, Chameleon
  or a text-only causal LM, detected from its config (:mod:`mage_cl.backbones`) -- and the
  Continual-NExT annotation files of the tasks found there (``<data_dir>/<task>/train.jsonl``
  and ``test.json``, ``<task>`` the short id or the paper name; images relative to the task
  folder), loaded by :mod:`mage_cl.tasks.realdata`; Flickr30k and HQEdit are judged with the
  CLIP checkpoint ``clip`` (:mod:`mage_cl.tasks.clip_judge`). Everything the user can get
  wrong -- the checkpoint, its processor, the family, an image file, the CLIP checkpoint, an
  image-output task the family cannot train, an example over the token budget -- is checked
  before the weights are loaded and before any training.

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
from .methods.base import MethodConfig
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
    # real checkpoints (--model); see mage_cl.backbones.BackboneOptions and mage_cl.tasks.clip_judge
    backbone: Optional[str] = None  # family; None: detected from the checkpoint's config
    tasks: Optional[str] = None  # comma-separated subset of the order (short ids or paper names)
    clip: Optional[str] = None  # CLIP checkpoint directory judging Flickr30k / HQEdit
    clip_threshold: str = "auto"  # CLIP score an image needs to count as correct ("auto" or 0-100)
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    max_batch_tokens: Optional[int] = None  # padded tokens per micro-batch
    image_size: Optional[int] = None
    image_guidance: Optional[float] = None
    max_examples: Optional[int] = None  # train and test examples per task (the first ones)


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
    _validate_model_options(opts)
    if opts.steps_per_task is not None:
        preset = replace(preset, train=replace(preset.train, steps_per_task=int(opts.steps_per_task)))
    if opts.max_batch_tokens is not None:
        preset = replace(preset, train=replace(preset.train, max_batch_tokens=int(opts.max_batch_tokens)))
    preset = replace(preset, train=replace(preset.train, seed=opts.seed))
    return preset


def _validate_model_options(opts: RunOptions) -> None:
    """The real-checkpoint options: valid values, and none of them without ``--model``."""
    from .backbones import BACKBONE_NAMES

    if opts.tasks is not None:
        _task_subset(opts.tasks, [])
    if opts.max_batch_tokens is not None and int(opts.max_batch_tokens) < 1:
        raise UsageError(f"--max-batch-tokens must be >= 1, got {opts.max_batch_tokens}")
    if opts.max_examples is not None and int(opts.max_examples) < 1:
        raise UsageError(f"--max-examples must be >= 1, got {opts.max_examples}")
    if opts.image_size is not None and int(opts.image_size) < 1:
        raise UsageError(f"--image-size must be >= 1, got {opts.image_size}")
    if str(opts.clip_threshold).strip().lower() != "auto":
        try:
            tau = float(opts.clip_threshold)
        except (TypeError, ValueError):
            raise UsageError(f"--clip-threshold must be 'auto' or a CLIP score in [0, 100], got {opts.clip_threshold!r}") from None
        if not 0.0 <= tau <= 100.0:
            raise UsageError(f"--clip-threshold must be in [0, 100] (a CLIP score), got {tau}")
    if opts.backbone is not None and opts.backbone not in BACKBONE_NAMES:
        raise UsageError(f"unknown --backbone {opts.backbone!r}; choose from {', '.join(BACKBONE_NAMES)}")
    if opts.model_path is None:
        only_model = [flag for flag, on in (
            ("--backbone", opts.backbone not in (None, "tiny")), ("--clip", opts.clip is not None),
            ("--clip-threshold", opts.clip_threshold != "auto"), ("--dtype", opts.dtype != "auto"),
            ("--attn-implementation", opts.attn_implementation != "sdpa"),
            ("--gradient-checkpointing", opts.gradient_checkpointing), ("--image-size", opts.image_size is not None),
            ("--image-guidance", opts.image_guidance is not None), ("--max-examples", opts.max_examples is not None),
        ) if on]
        if only_model:
            raise UsageError(f"{', '.join(only_model)} applies to a --model checkpoint; the embedded tiny model "
                             "runs in float32 on its own digits data")


def _task_subset(spec: str, names: Sequence[str]) -> List[str]:
    """``names`` restricted to the comma-separated task ids / paper names of ``--tasks`` (order kept)."""
    from .tasks.realdata import canonical_task_name

    try:
        want = [canonical_task_name(t.strip()) for t in spec.split(",") if t.strip()]
    except ValueError as exc:
        raise UsageError(f"--tasks: {exc}") from None
    if not want:
        raise UsageError("--tasks is empty")
    return [n for n in names if n in want]


class Workload:
    """Tasks, the frozen base model, its backbone and token ids for a run (shared by every method of a comparison)."""

    def __init__(self, tasks, names: List[str], base_model, pad_id: int, eos_id: int, info: Dict[str, object],
                 backbone=None):
        self.tasks, self.names, self.base_model = tasks, names, base_model
        self.pad_id, self.eos_id, self.info = pad_id, eos_id, info
        self.backbone = backbone


def prepare(opts: RunOptions, preset: Preset) -> Workload:
    """Load (or build) the tasks and the frozen base model."""
    from .tasks import order_names

    names = order_names(opts.order)
    if opts.tasks is not None:
        names = _task_subset(opts.tasks, names)
    if opts.model_path is not None:
        return _prepare_checkpoint(opts, preset, names)
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
    from .backbones import TinyBackbone

    return Workload(tasks, names, model, vocab.pad_id, vocab.eos_id, info, backbone=TinyBackbone(vocab))


@contextlib.contextmanager
def _hf_progress(enabled: bool):
    """transformers' own progress bars (weight loading) on or off inside the block, then as before."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _prepare_checkpoint(opts: RunOptions, preset: Preset, names: List[str]) -> Workload:
    """Tasks and model of a ``--model`` run; every user error is a :class:`UsageError` before the weights load."""
    with _hf_progress(opts.progress and distributed.is_main()):
        return _load_checkpoint_workload(opts, preset, names)


def _load_checkpoint_workload(opts: RunOptions, preset: Preset, names: List[str]) -> Workload:
    from . import backbones
    from .tasks import realdata
    from .tasks.clip_judge import ClipError, ClipJudge, ClipScorer, resolve_threshold

    bopts = backbones.BackboneOptions(
        dtype=opts.dtype, attn_implementation=opts.attn_implementation,
        gradient_checkpointing=opts.gradient_checkpointing, image_size=opts.image_size,
        guidance_scale=opts.image_guidance)
    try:
        bb = backbones.open_backbone(opts.model_path, opts.backbone, bopts)
    except backbones.BackboneError as exc:
        raise UsageError(str(exc)) from None
    found = {}
    for name in names:
        files = realdata.find_task_files(opts.data_dir, name)
        if files is not None:
            found[name] = files
        elif opts.tasks is not None:
            raise UsageError(f"--tasks {name}: --data-dir {opts.data_dir} has no {realdata.ALL_TASKS[name]}/ (or "
                             f"{name}/) with train.jsonl and test.json")
    if not found:
        raise UsageError(f"--data-dir {opts.data_dir}: found no <task>/train.jsonl + <task>/test.json for any task "
                         f"({', '.join(f'{k}/{v}' for k, v in realdata.ALL_TASKS.items())})")
    image_tasks = [n for n in found if n in realdata.IMAGE_TASKS]
    if image_tasks and not bb.writes_images:
        raise UsageError(f"{', '.join(realdata.ALL_TASKS[n] for n in image_tasks)} (in --data-dir {opts.data_dir}) "
                         f"answer with images: {bb.image_output_refusal}")
    scorer = None
    thresholds: Dict[str, object] = {}
    if image_tasks:
        if opts.clip is None:
            raise UsageError(f"{', '.join(realdata.ALL_TASKS[n] for n in image_tasks)} are judged by CLIP score: "
                             "pass --clip DIR (a local transformers CLIPModel checkpoint)")
        try:
            scorer = ClipScorer.load(opts.clip)
        except ClipError as exc:
            raise UsageError(str(exc)) from None

    def judge_for(name):
        def factory(train):
            ref = [(e.meta["target_image"], e.meta["clip_text"]) for e in train if e.meta.get("target_image")]
            tau, how = resolve_threshold(opts.clip_threshold, scorer, ref)
            thresholds[name] = {"tau": tau, "how": how}
            return ClipJudge(scorer, tau, bb.decode_image, bb.image_start_id)
        return factory

    tasks = {}
    for name, (tr, te) in found.items():
        try:
            tasks[name] = realdata.load_backbone_task(
                name, tr, te, bb, opts.max_examples, judge_for(name) if name in image_tasks else None,
                progress=opts.progress and distributed.is_main())
        except (ValueError, OSError) as exc:  # malformed annotations, bad images, CLIP: one clear line
            raise UsageError(f"{name}: {exc}") from None
    names = [n for n in names if n in tasks]
    longest = bb.max_positions
    if longest is not None:
        for name in names:
            t = tasks[name]
            for e, n in [(e, bb.num_tokens(e)) for e in t.train] + [(e, bb.prompt_tokens(e) + t.max_new_tokens)
                                                                     for e in t.test]:
                if n > longest:
                    raise UsageError(f"{e.meta.get('source')}: a {realdata.ALL_TASKS[name]} sample of {n} tokens is "
                                     f"longer than the model's context ({longest} positions)")
    budget = preset.train.max_batch_tokens
    if budget is not None:
        for name in names:
            for e in tasks[name].train:
                n = bb.num_tokens(e)
                if n > budget:
                    raise UsageError(f"{e.meta.get('source')}: a {realdata.ALL_TASKS[name]} sample of {n} tokens does "
                                     f"not fit --max-batch-tokens {budget}")
    try:
        model = bb.load_model()
    except backbones.BackboneError as exc:
        raise UsageError(str(exc)) from None
    info = {"model": os.path.abspath(opts.model_path), "data": os.path.abspath(opts.data_dir), **bb.describe()}
    if scorer is not None:
        info.update(clip=os.path.abspath(opts.clip), clip_threshold=thresholds)
    return Workload(tasks, names, model, bb.pad_id, bb.eos_id, info, backbone=bb)


def _config(opts: RunOptions, preset: Preset, work: Workload) -> Dict[str, object]:
    train = asdict(preset.train)
    if train.get("max_batch_tokens") is None:  # absent as before the option existed: old checkpoints still resume
        train.pop("max_batch_tokens", None)
    extra = {k: work.info[k] for k in ("backbone", "dtype", "clip", "clip_threshold") if k in work.info}
    return {"method": opts.method, "order": opts.order, "preset": opts.preset, "seed": opts.seed,
            "model": work.info["model"], "data": work.info["data"], "tasks": work.names,
            "train": train, "world_size": distributed.world_size(), **extra}


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
    own = work is None  # a workload of its own: train the loaded model itself (no copy of a large model)
    work = work or prepare(opts, preset)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = (work.base_model if own else copy.deepcopy(work.base_model)).to(device)
    method = make_method(opts.method, _method_config(work, model))
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
                    progress=opts.progress, backbone=work.backbone)
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


def _method_config(work: Workload, model) -> Optional[MethodConfig]:
    """Adapters on the backbone's language-model linears (``None``: the methods' default, the tiny model's)."""
    from .backbones import HFBackbone

    bb = work.backbone
    if not isinstance(bb, HFBackbone):
        return None
    try:
        targets = tuple(bb.target_modules(model))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return MethodConfig(target_modules=targets, adapter_dtype=bb.adapter_dtype)


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
