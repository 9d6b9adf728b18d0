"""`recsys serve`: run the HTTP service (uvicorn) over the CURRENT artifact version.

Flags override the matching RECSYS_* environment variables; the app itself imports no torch.
"""

from __future__ import annotations

import argparse
import os
import socket

from recsys_cli.commands import COMMANDS
from recsys_cli.errors import UsageError


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("serve", help=COMMANDS["serve"])
    p.add_argument("--artifacts", metavar="DIR", help="artifact root holding CURRENT (RECSYS_ARTIFACTS)")
    p.add_argument("--redis-url", metavar="URL", help="Redis for per-user state (RECSYS_REDIS_URL); default in-process")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (checked free before the model loads)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (> 1 needs Redis: the in-process store is per process); on Linux "
                        "each has its own SO_REUSEPORT socket (service/supervisor.py)")
    p.add_argument("--shared-socket", action="store_true",
                   help="with --workers > 1: uvicorn's own workers on one shared socket instead")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (format: RECSYS_LOG_FORMAT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.artifacts import ArtifactError, current_version
    from service.connection_limits import PROTOCOL as CONNECTION_PROTOCOL
    from service.core.config import Settings
    from service.core.logs import uvicorn_config
    from service.smoke import load_checked
    from service.supervisor import Supervisor, bind_group, reuse_port_supported

    if args.artifacts:
        os.environ["RECSYS_ARTIFACTS"] = args.artifacts
    if args.redis_url:
        os.environ["RECSYS_REDIS_URL"] = args.redis_url
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    check_port_free(args.host, args.port)  # before the model loads: a taken port fails in a second
    try:
        settings = Settings()
        # the service's own load + smoke check, to fail here with one line (exit 2) rather than
        # with a traceback inside the lifespan of every worker
        load_checked(settings.artifacts / current_version(settings.artifacts))
    except ValidationError as exc:
        raise UsageError(f"bad RECSYS_* setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    except ArtifactError as exc:
        raise UsageError(str(exc)) from None
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and settings.redis_url is None:
        # each worker process would keep its own in-process history: events sent to one
        # worker would be invisible to requests served by another
        raise UsageError("--workers > 1 needs --redis-url (RECSYS_REDIS_URL): the in-process store is per process")
    # the connection limits (RECSYS_KEEP_ALIVE_S ... RECSYS_MAX_HEADER_BYTES) live in the protocol,
    # named by its import path: spawned workers import it and read the same environment
    config = {"app": "service.main:app", "host": args.host, "port": args.port, "log_level": args.log_level,
              "http": CONNECTION_PROTOCOL, "log_config": uvicorn_config(settings.log_format)}
    if args.workers > 1 and not args.shared_socket and reuse_port_supported():
        try:
            sockets = bind_group(args.host, args.port, args.workers)
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
        return Supervisor(config, sockets).run()
    uvicorn.run(**config, workers=args.workers)
    return 0


def check_port_free(host: str, port: int) -> None:
    """UsageError when host:port cannot be bound now (taken, or an address this machine does not have)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
