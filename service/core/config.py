"""Service settings from RECSYS_* environment variables (DESIGN.md §6), validated at start-up.

Also read from a `.env` file in the working directory (environment variables win over it);
`recsys config` prints every setting with its default, current value and source
(service/core/reference.py), and the README's table is rendered from these fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.stores import DEFAULT_MAX_STORE_BYTES, MIN_STORE_BYTES

ENV_FILE = ".env"


def _comma_list(value: object) -> object:
    """"a, b" -> ("a", "b"): a list setting is written comma-separated, not as JSON."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """All service configuration; a bad value fails `Settings()` with the field named."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore", frozen=True,
                                      env_file=ENV_FILE, env_file_encoding="utf-8")

    artifacts: Path = Field(default=Path("artifacts"), description="artifact root holding CURRENT")
    redis_url: str | None = Field(default=None, description="Redis URL; unset = in-process store")
    api_key: str | None = Field(default=None, description="X-API-Key for writes and admin; unset = writes disabled "
                                                          "(403) unless allow_anonymous_writes")
    allow_anonymous_writes: bool = Field(default=False, description="without api_key, serve writes and admin to "
                                                                    "anyone (a loud warning at start-up)")
    read_key: str | None = Field(default=None, description="when set, per-user reads (a user's history, recommend "
                                                           "by user_id) need X-API-Key = read_key or api_key")
    max_users: int = Field(default=100_000, ge=1, le=100_000_000,
                           description="users kept by the in-process store (least recently used evicted)")
    max_store_bytes: int = Field(default=DEFAULT_MAX_STORE_BYTES, ge=MIN_STORE_BYTES, le=1 << 40,
                                 description="bytes the in-process store may hold (ids as Python holds them; least "
                                             "recently used users evicted beyond)")
    history_ttl_s: int = Field(default=30 * 24 * 3600, ge=0, le=10 * 365 * 24 * 3600,
                               description="Redis history keys expire this long after the user's last event (0 = never)")
    batch_max_total_k: int = Field(default=2000, ge=1, le=1_000_000, description="most sum of k over one batch")
    batch_max_total_history: int = Field(default=20_000, ge=1, le=10_000_000,
                                         description="most history + exclude ids over one batch")
    retrieval_k: int = Field(default=200, ge=1, le=100_000, description="candidates taken from the index")
    prerank_n: int = Field(default=30, ge=1, le=10_000, description="pre-rank survivors sent to the re-ranker")
    max_history: int = Field(default=200, ge=1, le=100_000, description="history items kept per user")
    store_cooldown_s: float = Field(default=1.0, ge=0, le=60,
                                    description="after a Redis failure, serve without it for this long")
    compute_threads: int = Field(default=1, ge=1, le=256,
                                 description="BLAS / OpenMP threads per worker process (ONNX Runtime sessions use 1)")
    compute_queue: int = Field(default=64, ge=1, le=100_000,
                               description="recommend requests waiting for the compute thread beyond which a 503 "
                                           "answers at once")
    timeout_ms: float = Field(default=100.0, gt=0, le=60_000,
                              description="request budget: a stage not started within it is skipped (previous order)")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20, description="larger request bodies get 413")
    # connection limits, enforced by the HTTP server (service/connection_limits.py, README
    # "Connection limits"); the defaults are safe for a service behind a pooling gateway
    keep_alive_s: float = Field(default=5.0, gt=0, le=3600,
                                description="an open connection with no request in progress (new, or between "
                                            "requests) is closed after this long; keep it above the idle timeout "
                                            "of a proxy that pools connections to the service")
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600,
                                    description="a request's head must arrive within this long of its first byte "
                                                "(else 408 and the connection closed)")
    body_timeout_s: float = Field(default=20.0, gt=0, le=3600,
                                  description="a request's body must arrive within this long of the end of its "
                                              "head (else 408 and the connection closed)")
    max_connections: int = Field(default=512, ge=1, le=1_000_000,
                                 description="open connections per worker process beyond which a new one is "
                                             "answered 503 and closed")
    max_header_bytes: int = Field(default=16 << 10, ge=1024, le=1 << 20,
                                  description="request line + headers larger than this get 431 and the connection "
                                              "closed")
    reload_poll_s: float = Field(default=5.0, ge=0, le=3600,
                                 description="how often CURRENT is checked for a new version (0 = never)")
    log_format: Literal["text", "json"] = Field(
        default="text", description="log lines as text or as one JSON object per line (all on stderr, each "
                                    "request's lines with its request id)")
    cors_origins: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)] = Field(
        default=(), description="comma-separated origins a browser may call the API from (e.g. "
                                "https://shop.example.com, or * for any); empty = no CORS headers")

    log_dir: Path | None = Field(default=None, description="without Redis: folder of the durable event and "
                                                           "impression logs (rotated JSON Lines); unset = no log")
    log_file_max_bytes: int = Field(default=64 << 20, ge=1024, le=1 << 40,
                                    description="a log file this large is closed and a new one started")
    log_fsync: bool = Field(default=False, description="fsync the log file after every write (survives a host "
                                                       "crash, not only a worker crash)")
    log_stream_maxlen: int = Field(default=1_000_000, ge=1, le=1_000_000_000,
                                   description="with Redis: entries kept per log stream (approximate MAXLEN)")
    log_stream_max_age_s: float = Field(default=0.0, ge=0, le=10 * 365 * 24 * 3600,
                                        description="with Redis: when > 0, log stream entries older than this are "
                                                    "trimmed (MINID) instead of by log_stream_maxlen")
    impression_sample_rate: float = Field(default=1.0, ge=0, le=1,
                                          description="share of served lists recorded in the impression log "
                                                      "(0 = none)")
    attribution_window_s: float = Field(default=1800.0, gt=0, le=30 * 24 * 3600,
                                        description="an event without request_id is credited to the user's latest "
                                                    "impression showing the item at most this long before it")

    @field_validator("redis_url", "api_key", "read_key")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @model_validator(mode="after")
    def _prerank_within_retrieval(self) -> Settings:
        if self.prerank_n > self.retrieval_k:
            raise ValueError(f"prerank_n ({self.prerank_n}) must be <= retrieval_k ({self.retrieval_k})")
        return self
