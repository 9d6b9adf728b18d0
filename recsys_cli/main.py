"""The `recsys` command line.

Each sub-command lives in recsys_cli/commands/<name>.py and exposes `register(subparsers)`;
this module only assembles them and turns expected failures into one-line errors (exit 2).
Library code (service/, models/, training/) never imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from recsys_cli.commands import COMMANDS
from recsys_cli.errors import UsageError

# top-level modules of the `train` extra (pyproject.toml); the serving install has none of them
TRAIN_EXTRA = frozenset({"torch", "onnx", "onnxscript", "tqdm", "matplotlib", "pyarrow"})


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
    for name in COMMANDS:
        if command is None or name == command:
            importlib.import_module(f"recsys_cli.commands.{name}").register(sub)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command named in argv if it is a known one, else None (then the full parser
    reports the unknown name or prints the full help)."""
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words and words[0] in COMMANDS else None


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
    except (UsageError, FileNotFoundError) as exc:
        print(f"recsys {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in TRAIN_EXTRA:
            raise
        print(f"recsys {args.command}: error: {_needs_train_extra(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        # training's DataError (exit 2) and PublishError (e.g. an invalid CURRENT met before a
        # command's own handling; exit 1), matched without importing training/ (and torch) here:
        # `recsys serve` must not. A command that can raise them has imported their module.
        code = _training_error(exc)
        if code is None:
            raise
        print(f"recsys {args.command}: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"recsys {args.command}: interrupted", file=sys.stderr)
        return 130


def _training_error(exc: Exception) -> int | None:
    """The exit code of an expected training/ error (DataError 2, PublishError 1), else None."""
    for module, name, code in (("training.data.dataset", "DataError", 2), ("training.publish.versions", "PublishError", 1)):
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return code
    return None


if __name__ == "__main__":
    sys.exit(main())
