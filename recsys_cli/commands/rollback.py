"""`recsys rollback`: point CURRENT back at an older version once it loads and passes a smoke run.

--to defaults to the newest version created before the live one (manifest created_at). A target
that does not load (missing or corrupt files) is refused with the reason and CURRENT is left as
it was (exit 1). After the flip the version is announced on Redis when a URL is known.
"""

from __future__ import annotations

import argparse
import os
import sys

from recsys_cli.commands import COMMANDS
from recsys_cli.errors import UsageError


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("rollback", help=COMMANDS["rollback"])
    p.add_argument("--artifacts", required=True, metavar="DIR", help="artifacts root (holds <version>/ and CURRENT)")
    p.add_argument("--to", metavar="VERSION", help="target version (default: the one before CURRENT)")
    p.add_argument("--redis-url", default=os.environ.get("RECSYS_REDIS_URL") or None, metavar="URL",
                   help="announce the version on this Redis (default: $RECSYS_REDIS_URL)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.publish.publisher import Publisher
    from training.publish.versions import PublishError

    if not os.path.isdir(args.artifacts):
        raise UsageError(f"--artifacts {args.artifacts}: not a folder")
    try:
        res = Publisher(args.artifacts).rollback(args.to, args.redis_url)
    except PublishError as exc:
        print(f"recsys rollback: refused, CURRENT unchanged: {exc}", file=sys.stderr)
        return 1
    print(f"CURRENT: {res.previous} -> {res.current}")
    print(f"announced: {'no Redis' if res.notified is None else f'{res.notified} subscriber(s)'}")
    return 0
