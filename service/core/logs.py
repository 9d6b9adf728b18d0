"""Logging: one stream (stderr), text or JSON lines (RECSYS_LOG_FORMAT), each request's id on
every line logged while it is handled.

The request id lives in a context variable that service.middleware.RequestIdMiddleware sets
for the request's task; the compute thread runs each job in a copy of the caller's context
(service/compute.py), so its lines carry the id too. uvicorn's own loggers (start-up, errors,
the access log) go through the same handler: `uvicorn_config()` is passed to uvicorn.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"  # request_tag: " [<id>]" in a request
# third-party loggers whose INFO lines are start-up noise (faiss.loader: one line per AVX
# module it tries); their warnings still show
QUIET = ("faiss.loader", "faiss")

request_id: ContextVar[str | None] = ContextVar("recsys_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` ("-" outside a request) and `record.request_tag` (" [<id>]", or "")."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_id = rid or "-"
        record.request_tag = f" [{rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO-8601), level, logger, message, request_id (when in a
    request), exc (a traceback, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        rid = getattr(record, "request_id", "-")
        if rid != "-":
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def format_from_env(env_file: str | Path = ".env") -> str:
    """RECSYS_LOG_FORMAT from the environment, else from `.env`, else text; ValueError on another value."""
    value = os.environ.get("RECSYS_LOG_FORMAT")
    if value is None and Path(env_file).is_file():
        from dotenv import dotenv_values

        value = dotenv_values(env_file).get("RECSYS_LOG_FORMAT")
    value = (value or "text").strip().lower()
    if value not in FORMATS:
        raise ValueError(f"RECSYS_LOG_FORMAT must be one of {FORMATS}, got {value!r}")
    return value


def dict_config(fmt: str, level: int | str = logging.INFO) -> dict[str, Any]:
    """A logging.config.dictConfig: one stderr handler on the root logger, uvicorn's loggers
    propagating to it (none of their own handlers: uvicorn's default puts the access log on stdout)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    formatter: dict[str, Any] = {"()": f"{__name__}.JsonFormatter"} if fmt == "json" else {"format": TEXT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"recsys": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "recsys", "filters": ["request_id"]}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            **{name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            **{name: {"level": "WARNING"} for name in QUIET},
        },
    }


def configure(fmt: str, level: int | str = logging.INFO) -> None:
    """Set up this process's logging (the CLI, before a command runs)."""
    logging.config.dictConfig(dict_config(fmt, level))


def uvicorn_config(fmt: str) -> dict[str, Any]:
    """uvicorn's `log_config`: the same set-up in every server and worker process (uvicorn's
    --log-level then sets its own loggers' levels)."""
    return dict_config(fmt, logging.INFO)
