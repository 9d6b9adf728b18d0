"""The `recsys` command line.

Each sub-command lives in recsys_cli/commands/<name>.py and exposes `register(subparsers)`;
this module only assembles them and turns expected failures into one-line errors (exit 2).
Library code (service/, models/, training/) never imports this package.

Only the command being run is imported: `recsys --help` lists the commands from their one-line
helps (recsys_cli/commands/__init__.py) without importing any, so it does not import torch
(5.5 s -> 0.1 s on the 2-core box, README). Every flag's help shows its default; an unknown flag
prints the usage of the (sub-)command it was given to.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from recsys_cli.commands import COMMANDS
from recsys_cli.errors import UsageError

# top-level modules of the `train` extra (pyproject.toml); the serving install has none of them
TRAIN_EXTRA = frozenset({"torch", "onnx", "onnxscript", "tqdm", "matplotlib", "pyarrow"})


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends each flag's default to its help, unless the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or "default" in text.lower() or not action.option_strings
                or action.required):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return f"{text} (default: unset)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every (sub-)parser of the CLI: defaults shown in help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser(command: str | None = None, full: bool = False) -> argparse.ArgumentParser:
    """The parser with `command`'s own parser registered (its module imported); the other
    commands are listed by name and help only. `full`: every command registered (tests).

    Registering a sub-command can import its stack (`recsys train` and `recsys export` import
    torch), so `recsys serve` registers only itself and runs in the serving image without torch.
    """
    parser = Parser(
        prog="recsys",
        description="Train, evaluate, export, index and serve a multi-stage recommender.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, text in COMMANDS.items():
        if full or name == command:
            importlib.import_module(f"recsys_cli.commands.{name}").register(sub)
        else:
            sub.add_parser(name, help=text)
    return parser


def innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)parser that parsed the last command word (`recsys train retrieval` -> its parser)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs and subs[0].dest else None
        if name is None or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


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
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the usage of the command that was given the flag, not the top-level one
        innermost(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    from service.core.logs import configure, format_from_env

    try:
        log_format = format_from_env()
    except ValueError as exc:
        print(f"recsys {args.command}: error: {exc}", file=sys.stderr)
        return 2
    configure(log_format, logging.DEBUG if args.verbose else logging.INFO)
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
