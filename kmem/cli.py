"""The ``kmem`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    result = demo.run(forget_fraction=args.forget_fraction, k=args.k, seed=args.seed)
    print(result.summary())
    exact = result.same_fingerprint and result.same_predictions and not result.forgotten_retrieved
    return 0 if exact else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kmem", description="A deletable key/value memory for models that must forget."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a memory from the bundled digits, forget rows, check exactness")
    demo.add_argument(
        "--forget-fraction", type=float, default=0.1, help="fraction of training rows to forget"
    )
    demo.add_argument("--k", type=int, default=10, help="rows retrieved per query")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
