"""Command line entry point ``mage-cl``.

Subcommands::

    mage-cl run     --method mage --order default --preset smoke|cpu|gpu [--seed 0] [--out DIR]
                    [--resume | --overwrite] [--model PATH --data-dir DIR [--clip DIR]]
                    [--backend auto|torch|triton|cuda] [--tasks vqa,...]
                    [--backbone janus|emu3|chameleon|causal-lm] [--dtype auto|bf16|fp32]
                    [--attn-implementation sdpa|eager|flash_attention_2] [--gradient-checkpointing]
                    [--max-batch-tokens N] [--image-size PX] [--image-guidance G] [--max-examples N]
    mage-cl compare --methods lora,mage,...|all [--jobs N] [same options]
    mage-cl demo    [--steps 20]

``run`` trains one method through the six-task sequence and writes a results directory
(:mod:`mage_cl.results`; by default ``runs/<method>-<preset>-<order>-seed<k>/``);
``compare`` runs several on the same base model and writes one combined table (with MAGE's
vs CIA's measured state memory). Under ``torchrun --nproc_per_node N -m mage_cl.cli run ...``
it trains with DDP. ``mage-cl --help`` and ``mage-cl run --help`` list the methods, orders,
presets and backends.

Every argument is checked before any work starts. A bad choice (unknown method / order /
preset, a number out of range, an ``--out`` that cannot be written, an existing run without
``--resume`` / ``--overwrite``, a corrupt or mismatched checkpoint) prints one line
``mage-cl: error: ...`` and exits with 2. Ctrl-C prints one line saying where the run stopped
and exits with 130; the checkpoint of the last finished stage stays intact.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

#: Largest accepted ``--seed`` (seeds feed numpy, torch and Python's random).
MAX_SEED = 2**31 - 1

_BACKENDS = {
    "auto": "Triton on CUDA tensors, the plain-PyTorch reference on CPU",
    "torch": "the plain-PyTorch reference kernels (any device)",
    "triton": "the fused Triton kernels (CUDA, or TRITON_INTERPRET=1 on CPU)",
    "cuda": "the CUDA C++ extension where it has the op (needs a CUDA build)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format (``mage-cl: error: ...``, exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"mage-cl: error: {message} (see {self.prog} --help)\n")


def _int_in(lo: int, hi: Optional[int] = None):
    """An argparse type: an integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'}, got {v}")
        return v

    return parse


def _float_at_least(lo: float, strict: bool = False):
    """An argparse type: a finite number ``>= lo`` (``strict``: ``> lo``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not ((v > lo if strict else v >= lo) and v != float("inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {lo:g}, got {text}")
        return v

    return parse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show each option's default (where it has one), keep the epilog's line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _listing() -> str:
    """The choices with one-line descriptions, for the help epilog."""
    from .engines import ENGINES
    from .methods import METHODS
    from .presets import PRESETS
    from .tasks import ORDERS, PAPER_NAMES

    lines = ["methods:"]
    width = max(map(len, METHODS))
    lines += [f"  {name:<{width}} {cls.summary}" for name, cls in METHODS.items()]
    lines += ["", "orders (the six tasks; --model/--data-dir runs keep the tasks found there, in this order):"]
    lines += [f"  {name:<13} {', '.join(PAPER_NAMES[t] for t in tasks)}" for name, tasks in ORDERS.items()]
    lines += ["", "presets:"]
    lines += [f"  {name:<6} {p.description}" for name, p in PRESETS.items()]
    lines += ["", "engines (--distributed, under torchrun):"]
    lines += [f"  {name:<10} {text}" for name, text in ENGINES.items()]
    lines += ["", "backends:"]
    lines += [f"  {name:<7} {text}" for name, text in _BACKENDS.items()]
    lines += ["", "The algorithm, the metrics and every decision taken where the paper is silent: ALGORITHM.md."]
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    from .engines import ENGINES, LR_SCHEDULES
    from .presets import DEFAULT_PRESET, PRESETS
    from .tasks import ORDERS

    p.add_argument("--order", default="default", metavar="ORDER",
                   help="task order: " + ", ".join(ORDERS))
    p.add_argument("--preset", default=DEFAULT_PRESET, metavar="PRESET",
                   help="model size and training budget: " + ", ".join(PRESETS))
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, metavar="K",
                   help="seed of the data split, the base model, the adapters and the batches")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results directory, also holding the checkpoint after every stage "
                        "(default: runs/<method>-<preset>-<order>-seed<k>, or runs/compare-... for compare)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    again.add_argument("--overwrite", action="store_true", help="replace the run (results, checkpoint) in --out")
    p.add_argument("--model", dest="model_path", default=None, metavar="PATH", help="local transformers checkpoint directory")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="Continual-NExT annotations: <dir>/<task>/{train.jsonl,test.json}")
    p.add_argument("--backend", default="auto", metavar="BACKEND",
                   help="kernel backend: " + ", ".join(_BACKENDS))
    p.add_argument("--steps-per-task", type=_int_in(1), default=None, metavar="N",
                   help="override the preset's optimizer steps per task")
    p.add_argument("--lr", type=_float_at_least(0.0, strict=True), default=None, metavar="LR",
                   help="override the preset's AdamW learning rate (cpu: 2e-3)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="override the preset's learning-rate shape after the warm-up, per task "
                        "(constant, or cosine down to 0 at the task's last step)")
    p.add_argument("--max-stages", type=_int_in(1), default=None, metavar="N",
                   help="stop after this many stages (continue later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the order, e.g. vqa,ocr (ids or paper names)")
    d = p.add_argument_group("training at scale (under torchrun)")
    d.add_argument("--distributed", default=None, metavar="ENGINE",
                   help="data-parallel engine: " + ", ".join(ENGINES) + " (default under torchrun: ddp)")
    d.add_argument("--deepspeed-config", default=None, metavar="FILE",
                   help="DeepSpeed JSON config (zero_optimization; default stage 2); the driver sets batch "
                        "sizes, clipping, optimizer and schedule")
    m = p.add_argument_group("real checkpoints (--model)")
    m.add_argument("--backbone", default=None, help="model family: janus | emu3 | chameleon | causal-lm "
                   "(default: detected from the checkpoint's config.json)")
    m.add_argument("--clip", default=None, help="local transformers CLIPModel checkpoint judging Flickr30k / HQEdit")
    m.add_argument("--clip-threshold", default="auto", help="CLIP score (0-100) an image needs to count as correct; "
                   "auto: the 10th percentile of the task's real training pairs")
    m.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on CPU) | bf16 | fp32")
    m.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flash_attention_2 (needs flash-attn)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute the LM's activations in backward")
    m.add_argument("--max-batch-tokens", type=_int_in(1), default=None, metavar="N",
                   help="split each batch into micro-batches of at most this many padded tokens")
    m.add_argument("--image-size", type=_int_in(16), default=None, metavar="PX", help="side in pixels of generated images (Emu3; default 512)")
    m.add_argument("--image-guidance", type=_float_at_least(1.0), default=None, metavar="G",
                   help="classifier-free guidance of image generation (1: off; default Janus 5, Emu3 3)")
    m.add_argument("--max-examples", type=_int_in(1), default=None, metavar="N", help="train and test examples per task (the first ones)")


def _parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    epilog = _listing()
    parser = _Parser(prog="mage-cl", description="MAGE continual-learning driver (Continual-NExT): trains a "
                     "method through the six-task sequence and reports Avg.ACC, Forgetting, New.ACC and the "
                     "error-type metrics.", epilog=epilog, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="run one method through the continual task sequence", epilog=epilog,
                         formatter_class=_Formatter, description="Train one method through the task sequence, "
                         "evaluating every seen task after each stage.")
    run.add_argument("--method", default="mage", metavar="METHOD",
                     help="continual-learning method: " + ", ".join(METHODS))
    _common(run)
    cmp_ = sub.add_parser("compare", help="run several methods and write one combined table", epilog=epilog,
                          formatter_class=_Formatter, description="Run several methods on the same base model and "
                          "write one combined table.")
    cmp_.add_argument("--methods", required=True, help="comma-separated, e.g. lora,cia,mage (or 'all')")
    cmp_.add_argument("--jobs", type=_int_in(1), default=1,
                      help="methods to run at once in worker processes")
    _common(cmp_)
    demo = sub.add_parser("demo", help="train a small MageLinear model for a few steps and print its loss",
                          formatter_class=_Formatter)
    demo.add_argument("--steps", type=_int_in(1, 100_000), default=20, help="optimizer steps")
    return parser


def _options(args):
    from .runner import RunOptions

    return RunOptions(
        method=getattr(args, "method", "mage"), order=args.order, preset=args.preset, seed=args.seed,
        out=args.out, resume=args.resume, overwrite=args.overwrite, model_path=args.model_path,
        data_dir=args.data_dir, backend=args.backend, progress=not args.no_progress,
        max_stages=args.max_stages, steps_per_task=args.steps_per_task, lr=args.lr, lr_schedule=args.lr_schedule,
        tasks=args.tasks,
        backbone=args.backbone, clip=args.clip, clip_threshold=args.clip_threshold, dtype=args.dtype,
        attn_implementation=args.attn_implementation, gradient_checkpointing=args.gradient_checkpointing,
        max_batch_tokens=args.max_batch_tokens, image_size=args.image_size, image_guidance=args.image_guidance,
        max_examples=args.max_examples, distributed=args.distributed, deepspeed_config=args.deepspeed_config,
    )


def _methods(text: str) -> List[str]:
    from .methods import METHODS

    if text.strip() == "all":
        return list(METHODS)
    return [m.strip() for m in text.split(",") if m.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.steps)
        return 0

    from . import distributed, runner
    from .backbones import BackboneError
    from .checkpoint import CheckpointError

    distributed.init()
    try:
        opts = _options(args)
        if args.command == "run":
            record = runner.run(opts)
            if distributed.is_main():
                from .results import markdown_table

                print(markdown_table([record]), end="")
                for line in (runner.learned_line(record), runner.preset_note(record)):
                    if line:
                        print(line)
                print(runner.summary_line(record))
        else:
            _, md, out = runner.compare(_methods(args.methods), opts, jobs=args.jobs)
            if distributed.is_main():
                print(md, end="")
                print(f"mage-cl: comparison written to {out}/")
    except (runner.UsageError, CheckpointError, BackboneError) as exc:
        print(f"mage-cl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mage-cl: {runner.interrupted_line()}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
