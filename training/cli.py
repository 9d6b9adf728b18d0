"""The `recsys` command line.

Each sub-command lives in training/commands/<name>.py and exposes `register(subparsers)`;
this module only assembles them and turns expected failures into one-line errors (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from training.commands import COMMANDS
from training.commands.common import UsageError
from training.data.dataset import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Train, evaluate, export, index and serve a multi-stage recommender.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (DataError, UsageError, FileNotFoundError) as exc:
        print(f"recsys {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recsys {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
