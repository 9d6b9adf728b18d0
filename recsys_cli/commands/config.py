"""`recsys config`: every RECSYS_* setting with its default, current value and source.

Rendered from the service's Settings model (service/core/reference.py): `--markdown` prints the
README's configuration table and `--env-example` the repository's .env.example; a test keeps
both equal to it.
"""

from __future__ import annotations

import argparse
import sys

from recsys_cli.commands import COMMANDS
from recsys_cli.errors import UsageError


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("config", help=COMMANDS["config"])
    p.add_argument("--markdown", action="store_true",
                   help="print the reference table (variable, type, default, meaning) as Markdown, as in the README")
    p.add_argument("--env-example", action="store_true",
                   help="print a .env file with every setting commented out at its default (.env.example)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.core.config import Settings
    from service.core.reference import env_example, markdown_table, text_table

    if args.markdown or args.env_example:
        sys.stdout.write(markdown_table() if args.markdown else env_example())
        return 0
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"bad RECSYS_* setting: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    sys.stdout.write(text_table(settings))
    return 0
