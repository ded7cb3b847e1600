"""Command line entry point ``mage-cl``.

Subcommands::

    mage-cl run     --method mage --order default --preset {smoke,cpu,gpu} [--seed 0] [--out DIR]
                    [--resume] [--model PATH --data-dir DIR] [--backend auto|torch|triton|cuda]
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
        steps_per_task=args.steps_per_task,
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
