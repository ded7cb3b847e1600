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
import importlib.util
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
from .engines import ENGINES, LR_SCHEDULES, Engine, make_engine, read_deepspeed_config
from .methods import METHODS, make_method
from .methods.base import MethodConfig
from .presets import MAIN_JOB_PRESET, PRESETS, Preset, get_preset
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
    lr: Optional[float] = None  # override the preset's AdamW learning rate
    lr_schedule: Optional[str] = None  # override the preset's learning-rate shape (mage_cl.engines.LR_SCHEDULES)
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
    distributed: Optional[str] = None  # data-parallel engine under torchrun (mage_cl.engines; None: ddp)
    deepspeed_config: Optional[str] = None  # ZeRO config file of the deepspeed engine

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
    if opts.lr is not None and (isinstance(opts.lr, bool) or not isinstance(opts.lr, (int, float))
                                or not 0.0 < float(opts.lr) < float("inf")):
        raise UsageError(f"--lr must be a finite number > 0, got {opts.lr!r}")
    if opts.lr_schedule is not None and opts.lr_schedule not in LR_SCHEDULES:
        raise UsageError(f"unknown --lr-schedule {opts.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    _validate_model_options(opts)
    _validate_engine(opts, preset)
    if opts.resume and opts.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if opts.steps_per_task is not None:
        preset = replace(preset, train=replace(preset.train, steps_per_task=int(opts.steps_per_task)))
    if opts.lr is not None:
        preset = replace(preset, train=replace(preset.train, lr=float(opts.lr)))
    if opts.lr_schedule is not None:
        preset = replace(preset, train=replace(preset.train, lr_schedule=opts.lr_schedule))
    if opts.max_batch_tokens is not None:
        preset = replace(preset, train=replace(preset.train, max_batch_tokens=int(opts.max_batch_tokens)))
    preset = replace(preset, train=replace(preset.train, seed=opts.seed))
    return preset


def _validate_engine(opts: RunOptions, preset: Preset) -> None:
    """``--distributed`` / ``--deepspeed-config``: a known engine, several processes, a method it can run."""
    if opts.deepspeed_config is not None and opts.distributed != "deepspeed":
        raise UsageError("--deepspeed-config goes with --distributed deepspeed")
    world = distributed.world_size() if distributed.is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and preset.train.batch_size % world:
        # each rank takes an equal share of every global batch (an empty share would stall the others)
        raise UsageError(f"{world} processes need the batch size ({preset.train.batch_size}) to be a multiple "
                         f"of {world}; launch a number of processes that divides it")
    if opts.distributed is None:
        return
    if opts.distributed not in ENGINES:
        raise UsageError(f"unknown engine {opts.distributed!r}; choose from {', '.join(ENGINES)}")
    if world < 2:
        raise UsageError(f"--distributed {opts.distributed} needs several processes: launch with "
                         "torchrun --nproc_per_node N -m mage_cl.cli ...")
    if opts.distributed == "ddp":
        return
    if opts.max_batch_tokens is not None:
        # ranks would split their shares into different numbers of micro-batches, and under FSDP2 /
        # DeepSpeed every micro-batch's forward and backward is a collective
        raise UsageError(f"--max-batch-tokens is not supported with --distributed {opts.distributed} "
                         "(it runs under ddp)")
    if opts.distributed == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError("--distributed deepspeed needs DeepSpeed: pip install 'mage-kernels[deepspeed]'")
        try:
            cfg = read_deepspeed_config(opts.deepspeed_config)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if opts.model_path is not None and cfg["zero_optimization"]["stage"] == 3:
            # ZeRO-3 partitions the frozen towers too, and the backbones call them (image encoding, the
            # judge's image decoding) a different number of times on each rank
            raise UsageError("a --model runs under ZeRO stage 1 or 2, --distributed fsdp or ddp; ZeRO-3 runs the "
                             "embedded benchmark only")


def _engine(opts: RunOptions) -> Engine:
    return make_engine(opts.distributed or "ddp", read_deepspeed_config(opts.deepspeed_config)
                       if opts.distributed == "deepspeed" else None, shard_root=opts.model_path is None)


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
    """Tasks, the frozen base model, its backbone and token ids for a run (shared by every method of a comparison).

    The base model is built on first use of :attr:`base_model` (for the embedded benchmark that
    means pretraining it, or reading it from the cache), so that a run can check its options and
    its checkpoint against ``info`` -- which names the base model -- before any training.
    """

    def __init__(self, tasks, names: List[str], base_model, pad_id: int, eos_id: int, info: Dict[str, object],
                 loader: Optional[Callable[[], torch.nn.Module]] = None, backbone=None):
        if (base_model is None) == (loader is None):
            raise ValueError("Workload needs exactly one of base_model and loader")
        self.tasks, self.names = tasks, names
        self._base, self._loader = base_model, loader
        self.pad_id, self.eos_id, self.info = pad_id, eos_id, info
        self.backbone = backbone

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
    if opts.tasks is not None:
        names = _task_subset(opts.tasks, names)
    if opts.model_path is not None:
        return _prepare_checkpoint(opts, preset, names)
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

    from .backbones import TinyBackbone

    return Workload(tasks, names, None, vocab.pad_id, vocab.eos_id, info, loader=load, backbone=TinyBackbone(vocab))

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




def _config(opts: RunOptions, preset: Preset, work: Workload, engine: Engine) -> Dict[str, object]:
    train = asdict(preset.train)
    if train.get("max_batch_tokens") is None:  # absent as before the option existed: old checkpoints still resume
        train.pop("max_batch_tokens", None)
    if train.get("lr_schedule") == "constant":  # likewise: runs from before the option resume
        train.pop("lr_schedule")
    if train.get("joint_steps_scale") == 1:
        train.pop("joint_steps_scale")
    extra = {k: work.info[k] for k in ("backbone", "dtype", "clip", "clip_threshold") if k in work.info}
    return {"method": opts.method, "order": opts.order, "preset": opts.preset, "seed": opts.seed,
            "model": work.info["model"], "data": work.info["data"], "tasks": work.names,
            "train": train, "world_size": distributed.world_size(), **extra, **engine.describe()}


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


def preset_note(record: Dict[str, object]) -> Optional[str]:
    """A line saying that a finished run's accuracies mean nothing, for a plumbing-check preset (else None)."""
    preset = PRESETS.get(str(record.get("preset")))
    if preset is None or not preset.plumbing_check or not record["complete"]:
        return None
    return (f"mage-cl: note: the {preset.name} preset is a plumbing check ({preset.train.steps_per_task} steps per "
            f"task, {preset.train.max_eval} test examples): its accuracies mean nothing; "
            f"--preset {MAIN_JOB_PRESET} learns every task")


def _scores(pairs) -> str:
    """``"VQAv2 50.7, ImageNet 62.0"`` from ``(name, accuracy)`` pairs."""
    return ", ".join(f"{name} {acc:.1f}" for name, acc in pairs)


def stage_line(j: int, n_stages: int, st: StageResult, paper_of: Dict[str, str], joint: bool,
               elapsed: float) -> str:
    """What a finished stage scored, in one line: the task just learned first, then the earlier ones."""
    accs = st.acc
    if joint:
        scores = _scores((paper_of[n], a) for n, a in accs.items())
        return f"multitask stage finished ({elapsed / 60:.1f} min): {scores}"
    name = st.task
    earlier = _scores((paper_of[n], a) for n, a in accs.items() if n != name)
    tail = f"; earlier tasks now: {earlier}" if earlier else ""
    return (f"stage {j + 1}/{n_stages} finished ({elapsed / 60:.1f} min): {paper_of[name]} "
            f"{accs[name]:.1f} right after learning it{tail}")


def learned_line(record: Dict[str, object]) -> Optional[str]:
    """Each task's accuracy right after it was learned (the mean is New.ACC), for a complete continual run."""
    cls = METHODS.get(str(record["method"]))
    if record["joint"] or not record["complete"] or cls is None or not cls.trains:
        return None
    acc = record["acc"]
    parts = _scores((name, acc[j][j]) for j, name in enumerate(record["paper_names"]))
    return f"mage-cl: accuracy right after learning each task (New.ACC is their mean): {parts}"


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
    own = work is None  # a workload of its own: train the loaded model itself (no copy of a large model)
    work = work or prepare(opts, preset)
    method = make_method(opts.method)
    n_stages = 1 if method.joint else len(work.names)
    engine = _engine(opts)
    config = _config(opts, preset, work, engine)
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
    model = (work.base_model if own else copy.deepcopy(work.base_model)).to(device)
    config_of_backbone = _method_config(work, model)
    if config_of_backbone is not None:  # adapters on the backbone's language model
        method = make_method(opts.method, config_of_backbone)
    torch.manual_seed(opts.seed)  # adapter initialization (A ~ N(0, 0.01^2), MoELoRA router)
    method.setup(model, None if engine.name == "ddp" else engine.prepare)
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

    paper_of = {n: getattr(work.tasks[n], "paper_name", n) for n in work.names}

    def on_stage(j: int, st: StageResult) -> None:
        stages.append(asdict(st))
        # every rank gathers (a collective under FSDP2 / ZeRO-3), rank 0 writes
        payload = {"stages_done": j + 1, "stages": stages, "adapters": method.adapter_state(),
                   "method_state": method.state_dict(), "elapsed_seconds": elapsed(), "processes": processes}
        failed: Optional[BaseException] = None
        if distributed.is_main():
            try:
                with _DeferInterrupt():
                    checkpoint.save(out, payload, config)
            except Exception as exc:  # the other ranks must not go on into the next stage's collectives
                failed = exc
        if not distributed.all_true(failed is None):
            if failed is not None:
                raise failed
            raise RuntimeError("rank 0 could not write the checkpoint (its error is above); stopping")
        _STATUS.update(done=j + 1)
        if opts.progress and method.trains:
            _say(stage_line(j, n_stages, st, paper_of, method.joint, elapsed()))
        if (opts.max_stages is not None and not method.joint and len(stages) >= opts.max_stages
                and len(stages) < len(work.names)):
            raise _Stop()

    seq = Sequencer(model, method, work.tasks, work.names, preset.train, work.pad_id, work.eos_id,
                    progress=opts.progress, backbone=work.backbone, engine=engine)
    done = start >= n_stages and bool(stages)
    try:
        if not done:
            try:
                seq.run(start_stage=start, on_stage=on_stage, on_stage_start=on_stage_start)
            except _Stop:
                pass
    finally:
        engine.finish()
    method.finish()
    _STATUS.update(phase="write")
    meta = {
        "order": opts.order, "preset": opts.preset, "seed": opts.seed, "backend": mk.resolve_backend(device),
        "device": _device_name(device), "world_size": distributed.world_size(), "engine": engine.name,
        "wall_seconds": elapsed(), "processes": processes, "date": datetime.date.today().isoformat(),
        "steps_per_task": preset.train.steps_per_task, "lr": preset.train.lr,
        "lr_schedule": preset.train.lr_schedule, "out": str(out), **work.info,
    }
    paper = [paper_of[n] for n in work.names]
    record = results.build_record(opts.method, work.names, paper, stages, method.joint, meta)
    if write and distributed.is_main() and record["complete"]:
        with _DeferInterrupt():
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
