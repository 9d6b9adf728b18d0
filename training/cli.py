"""The `recsys` command line.

Each sub-command lives in training/commands/<name>.py and exposes `register(subparsers)`;
this module only assembles them and turns expected failures into one-line errors (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from training.commands import COMMANDS
from training.commands.common import UsageError
from training.data.dataset import DataError


# top-level modules of the `train` extra (pyproject.toml); the serving install has none of them
TRAIN_EXTRA = frozenset({"torch", "onnx", "onnxscript", "tqdm"})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with `command` only that sub-command's parser.

    Registering a sub-command can import its stack (`recsys train` and `recsys export` import
    torch), so `recsys serve` registers only itself and runs in the serving image without torch.
    """
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Train, evaluate, export, index and serve a multi-stage recommender.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        if command is None or _name(module) == command:
            module.register(sub)
    return parser


def _name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command named in argv if it is a known one, else None (then the full parser
    reports the unknown name or prints the full help)."""
    words = [a for a in argv if not a.startswith("-")]
    known = {_name(module) for module in COMMANDS}
    return words[0] if words and words[0] in known else None


def _needs_train_extra(exc: ModuleNotFoundError) -> str:
    return f"no module {exc.name!r}: this command needs the training install (pip install 'recsys[train]')"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_command(argv))
    except ModuleNotFoundError as exc:
        if exc.name not in TRAIN_EXTRA:
            raise
        print(f"recsys: error: {_needs_train_extra(exc)}", file=sys.stderr)
        return 2
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
    except Exception as exc:
        # training.artifacts.PublishError (e.g. an invalid CURRENT met before a command's own
        # handling) without importing that module (and torch) here: `recsys serve` must not
        artifacts = sys.modules.get("training.artifacts")
        if artifacts is None or not isinstance(exc, artifacts.PublishError):
            raise
        print(f"recsys {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name not in TRAIN_EXTRA:
            raise
        print(f"recsys {args.command}: error: {_needs_train_extra(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recsys {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
