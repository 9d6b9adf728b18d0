"""Prometheus metrics of the service (GET /metrics): request and per-stage latency, fallbacks,
errors, unknown history items and version reloads.

Each app owns its registry (tests build many apps in one process). With several uvicorn workers
set PROMETHEUS_MULTIPROC_DIR to an empty folder: every worker then writes its values there and
/metrics sums them (prometheus_client's multiprocess mode); without it, one worker per pod is
the deployment this is written for (deploy/k8s scales pods, not workers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

# seconds; dense below 50 ms, where the service lives
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                   0.5, 1.0, 2.5)
STAGES = ("store", "popularity", "encode", "search", "fuse", "item2item", "prerank", "rerank", "total")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The service's instruments, registered in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram("recsys_http_request_duration_seconds",
                                         "HTTP request latency by route template, method and status",
                                         ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("recsys_stage_duration_seconds", "Recommend pipeline time per stage",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.served_by = Counter("recsys_recommendations_total",
                                 "Recommendations by the last stage that ordered them", ["stage"], registry=r)
        self.fallbacks = Counter("recsys_fallbacks_total",
                                 "Recommendations served by a fallback path, by reason", ["reason"], registry=r)
        self.errors = Counter("recsys_http_errors_total", "Responses with status >= 400 by route and status",
                              ["route", "status"], registry=r)
        self.unknown_items = Counter("recsys_unknown_history_items_total",
                                     "History item ids not in the served catalog (skipped)", registry=r)
        self.reloads = Counter("recsys_reloads_total", "Artifact version reloads by result", ["result"], registry=r)
        self.store_evictions = Counter("recsys_store_evictions_total",
                                       "Users evicted from the history store: LRU beyond RECSYS_MAX_USERS "
                                       "(in-process) or Redis maxmemory evictions (evicted_keys)", registry=r)
        self.store_users = Gauge("recsys_store_users", "Users held by the in-process history store", registry=r,
                                 multiprocess_mode="liveall")
        self.store_bytes = Gauge("recsys_store_bytes", "Bytes held by the in-process history store (capped by "
                                 "RECSYS_MAX_STORE_BYTES)", registry=r, multiprocess_mode="liveall")
        self.log_errors = Counter("recsys_online_log_errors_total",
                                  "Impression records not logged, by reason (queue_full, write_failed)", ["reason"],
                                  registry=r)
        online = ["experiment", "arm", "version"]
        self.online_impressions = Gauge("recsys_online_impressions", "Impressions in the log read so far, per "
                                        "experiment, arm and version (the same on every replica: use max)", online,
                                        registry=r, multiprocess_mode="max")
        self.online_ctr = Gauge("recsys_online_ctr_at_k", "Clicked / shown among the first k positions", [*online, "k"],
                                registry=r, multiprocess_mode="max")
        self.online_ctr_position = Gauge("recsys_online_ctr_at_position", "Clicked / shown at a 0-based position",
                                         [*online, "position"], registry=r, multiprocess_mode="max")
        self.online_hit_rate = Gauge("recsys_online_hit_rate_at_k", "Impressions with a click among their first k "
                                     "/ impressions", [*online, "k"], registry=r, multiprocess_mode="max")
        self.online_items = Gauge("recsys_online_served_items", "Distinct items served (coverage)", online,
                                  registry=r, multiprocess_mode="max")
        self._evictions_seen = 0
        self.connections_closed = Counter("recsys_connections_closed_total",
                                          "Connections the HTTP server closed by a limit (service/connection_limits.py): "
                                          "idle, header_timeout, body_timeout, max_connections, header_too_large",
                                          ["reason"], registry=r)
        self._closed_seen: dict[str, int] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.version = Gauge("recsys_model_version_info", "The served artifact version (value 1)", ["version"],
                             registry=r, multiprocess_mode="liveall")
        self.current_version = Gauge("recsys_current_version_info", "The version artifacts/CURRENT names, as this "
                                     "worker last read it (value 1)", ["version"], registry=r,
                                     multiprocess_mode="liveall")
        self.drift = Gauge("recsys_version_drift", "1 when this worker serves another version than CURRENT names "
                           "(a version that failed to load, or a swap not yet done)", registry=r,
                           multiprocess_mode="liveall")
        self.arm_requests = Counter("recsys_experiment_requests_total",
                                    "Recommendations served by each experiment arm (an interleaved request counts "
                                    "for both arms)", ["experiment", "arm"], registry=r)
        self.arms = Gauge("recsys_experiment_arm_info", "The running experiment's arms: value = traffic share "
                          "(1 for interleave)", ["experiment", "mode", "arm", "version"], registry=r,
                          multiprocess_mode="liveall")
        self.versions_loaded = Gauge("recsys_versions_loaded", "Artifact versions this worker holds (the live one "
                                     "and every experiment arm's)", registry=r, multiprocess_mode="liveall")
        self.version_bytes = Gauge("recsys_version_file_bytes", "Size of each held version's files: the most its "
                                   "memory-mapped arrays and sessions can bring into memory", ["version"],
                                   registry=r, multiprocess_mode="liveall")
        self.process_memory = Gauge("recsys_process_memory_bytes", "This worker's memory from /proc/self/status "
                                    "at scrape time: rss, anon (private), file (mapped file pages, shared)",
                                    ["kind"], registry=r, multiprocess_mode="liveall")

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """metric.labels(*labels), kept: labels() validates and locks on every call (about as
        long as the observation itself), and the label sets here are few (stages, reasons, routes)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_recommendation(self, served_by: str, timings_ms: Mapping[str, float], unknown_items: int) -> None:
        """served_by is 'stage[;reason...]' as the pipeline reports it."""
        stage, *reasons = served_by.split(";")
        self.child(self.served_by, stage).inc()
        for reason in reasons:
            self.child(self.fallbacks, reason).inc()
        if stage == "popularity" and not reasons:
            self.child(self.fallbacks, "no_history").inc()
        for name, ms in timings_ms.items():
            if name in STAGES:
                self.child(self.stage_seconds, name).observe(ms / 1000.0)
        if unknown_items:
            self.unknown_items.inc(unknown_items)

    def observe_store(self, evictions: int | None, users: int | None, nbytes: int | None = None) -> None:
        """Bring the store counters up to date (called when /metrics is read): `evictions` is
        the store's running total, None when it cannot say."""
        if evictions is not None and evictions >= self._evictions_seen:
            self.store_evictions.inc(evictions - self._evictions_seen)
            self._evictions_seen = evictions
        elif evictions is not None:  # the backend restarted: its count began again
            self.store_evictions.inc(evictions)
            self._evictions_seen = evictions
        if users is not None:
            self.store_users.set(users)
        if nbytes is not None:
            self.store_bytes.set(nbytes)

    def observe_connections(self, closed: Mapping[str, int]) -> None:
        """Bring recsys_connections_closed_total up to `closed`, this process's running totals
        per reason (called when /metrics is read)."""
        for reason, total in closed.items():
            seen = self._closed_seen.get(reason, 0)
            if total > seen:
                self.child(self.connections_closed, reason).inc(total - seen)
                self._closed_seen[reason] = total

    def observe_arm(self, experiment: str, arm: str) -> None:
        self.child(self.arm_requests, experiment, arm).inc()

    def set_experiment(self, experiment: str | None, mode: str, arms: Mapping[str, tuple[str, float]]) -> None:
        """The arms gauge: arm -> (version, share); experiment None clears it."""
        self.arms.clear()
        for arm, (version, share) in arms.items():
            if experiment is not None:
                self.arms.labels(experiment, mode, arm, version).set(share)

    def set_loaded(self, version_bytes: Mapping[str, int]) -> None:
        """The versions this worker holds now and the bytes of each one's files."""
        self.versions_loaded.set(len(version_bytes))
        self.version_bytes.clear()
        for version, size in version_bytes.items():
            self.version_bytes.labels(version).set(size)

    def observe_process_memory(self) -> None:
        """Read VmRSS / RssAnon / RssFile of this process (Linux; elsewhere nothing is set)."""
        try:
            lines = Path("/proc/self/status").read_text().splitlines()
        except OSError:
            return
        kinds = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
        for line in lines:
            key, _, value = line.partition(":")
            if key in kinds:
                self.process_memory.labels(kinds[key]).set(int(value.split()[0]) * 1024)

    def observe_online(self, snapshot: Mapping[str, Any]) -> None:
        """Set the online series from OnlineMetrics.snapshot() (rates without data are left out)."""
        for g in (self.online_impressions, self.online_ctr, self.online_ctr_position, self.online_hit_rate,
                  self.online_items):
            g.clear()
        for grp in snapshot["groups"]:
            labels = (str(grp["experiment"] or ""), str(grp["arm"] or ""), grp["version"])
            self.online_impressions.labels(*labels).set(grp["impressions"])
            self.online_items.labels(*labels).set(grp["coverage"]["items"])
            for gauge, key in ((self.online_ctr, "ctr_at_k"), (self.online_ctr_position, "ctr_at_position"),
                               (self.online_hit_rate, "hit_rate_at_k")):
                for at, ci in grp[key].items():
                    if ci["rate"] is not None:
                        gauge.labels(*labels, at).set(ci["rate"])

    def set_version(self, version: str) -> None:
        self.version.clear()
        self.version.labels(version).set(1)

    def set_current(self, current: str | None, served: str) -> None:
        """The version CURRENT names (no series when it cannot be read) and whether this worker
        serves another one (recsys_version_drift 1)."""
        self.current_version.clear()
        if current is not None:
            self.current_version.labels(current).set(1)
        self.drift.set(int(current != served))

    def render(self) -> tuple[bytes, str]:
        """(exposition text, content type) for GET /metrics."""
        if os.environ.get(MULTIPROC_ENV):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
