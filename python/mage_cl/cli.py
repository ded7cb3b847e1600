"""Command line entry point ``mage-cl`` (the full driver lands with issue 5)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mage-cl", description="MAGE continual-learning driver")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MageLinear model for a few steps and print its loss")
    demo.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
