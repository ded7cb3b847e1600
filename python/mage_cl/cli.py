"""Command line entry point ``mage-cl``.

Subcommands::

    mage-cl run     --method mage --order default --preset {smoke,cpu,gpu} [--seed 0] [--out DIR]
                    [--resume] [--model PATH --data-dir DIR [--clip DIR]] [--backend auto|torch|triton|cuda]
                    [--tasks vqa,...] [--backbone janus|emu3|chameleon|causal-lm] [--dtype auto|bf16|fp32]
                    [--attn-implementation sdpa|eager|flash_attention_2] [--gradient-checkpointing]
                    [--max-batch-tokens N] [--image-size PX] [--image-guidance G] [--max-examples N]
    mage-cl compare --methods lora,mage,...|all [--jobs N] [same options]
    mage-cl demo    [--steps 20]

``run`` trains one method through the six-task sequence and writes a results directory
(:mod:`mage_cl.results`); ``compare`` runs several on the same base model and writes one
combined table (with MAGE's vs CIA's measured state memory). Under
``torchrun --nproc_per_node N -m mage_cl.cli run ...`` it trains with DDP.

Errors in the user's choices (unknown method / order / preset, a missing directory, a
corrupt or mismatched checkpoint) print one line ``mage-cl: error: ...`` and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--order", default="default", help="default | reverse | alphabetical")
    p.add_argument("--preset", default="smoke", help="smoke | cpu | gpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results directory (checkpoints are written there too)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--model", dest="model_path", default=None, help="local transformers checkpoint directory")
    p.add_argument("--data-dir", default=None, help="Continual-NExT annotations: <dir>/<task>/{train.jsonl,test.json}")
    p.add_argument("--backend", default="auto", help="kernel backend: auto | torch | triton | cuda")
    p.add_argument("--steps-per-task", type=int, default=None, help="override the preset's steps per task")
    p.add_argument("--max-stages", type=int, default=None, help="stop after this many stages (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the order, e.g. vqa,ocr (ids or paper names)")
    m = p.add_argument_group("real checkpoints (--model)")
    m.add_argument("--backbone", default=None, help="model family: janus | emu3 | chameleon | causal-lm "
                   "(default: detected from the checkpoint's config.json)")
    m.add_argument("--clip", default=None, help="local transformers CLIPModel checkpoint judging Flickr30k / HQEdit")
    m.add_argument("--clip-threshold", default="auto", help="CLIP score (0-100) an image needs to count as correct; "
                   "auto: the 10th percentile of the task's real training pairs")
    m.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, fp32 on CPU) | bf16 | fp32")
    m.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flash_attention_2 (needs flash-attn)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute the LM's activations in backward")
    m.add_argument("--max-batch-tokens", type=int, default=None,
                   help="split each batch into micro-batches of at most this many padded tokens")
    m.add_argument("--image-size", type=int, default=None, help="side in pixels of generated images (Emu3; default 512)")
    m.add_argument("--image-guidance", type=float, default=None,
                   help="classifier-free guidance of image generation (1: off; default Janus 5, Emu3 3)")
    m.add_argument("--max-examples", type=int, default=None, help="train and test examples per task (the first ones)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mage-cl", description="MAGE continual-learning driver (Continual-NExT)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one method through the continual task sequence")
    run.add_argument("--method", default="mage")
    _common(run)
    cmp_ = sub.add_parser("compare", help="run several methods and write one combined table")
    cmp_.add_argument("--methods", required=True, help="comma-separated, e.g. lora,cia,mage (or 'all')")
    cmp_.add_argument("--jobs", type=int, default=1, help="methods to run at once in worker processes")
    _common(cmp_)
    demo = sub.add_parser("demo", help="train a small MageLinear model for a few steps and print its loss")
    demo.add_argument("--steps", type=int, default=20)
    return parser


def _options(args):
    from .runner import RunOptions

    return RunOptions(
        method=getattr(args, "method", "mage"), order=args.order, preset=args.preset, seed=args.seed,
        out=args.out, resume=args.resume, model_path=args.model_path, data_dir=args.data_dir,
        backend=args.backend, progress=not args.no_progress, max_stages=args.max_stages,
        steps_per_task=args.steps_per_task, tasks=args.tasks, backbone=args.backbone, clip=args.clip,
        clip_threshold=args.clip_threshold, dtype=args.dtype, attn_implementation=args.attn_implementation,
        gradient_checkpointing=args.gradient_checkpointing, max_batch_tokens=args.max_batch_tokens,
        image_size=args.image_size, image_guidance=args.image_guidance, max_examples=args.max_examples,
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.steps)
        return 0

    from . import distributed
    from .checkpoint import CheckpointError
    from .runner import UsageError, compare, run

    distributed.init()
    try:
        opts = _options(args)
        if args.command == "run":
            record = run(opts)
            if distributed.is_main():
                from .results import markdown_table

                print(markdown_table([record]), end="")
                if not record["complete"]:
                    print(f"stopped after {len(record['stage_avg_acc'])} stage(s); continue with --resume")
        else:
            if args.methods.strip() == "all":
                from .methods import METHODS

                methods = list(METHODS)
            else:
                methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            _, md = compare(methods, opts, jobs=args.jobs)
            if distributed.is_main():
                print(md, end="")
    except (UsageError, CheckpointError) as exc:
        print(f"mage-cl: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
