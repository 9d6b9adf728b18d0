"""Every file name of the training -> serving contract, in one place (DESIGN.md §5).

A published version is one folder, artifacts/<version>/, whose manifest names its files; the
service reads the names from the manifest and never builds one itself, but training writes them
and tests look for them, so each name is spelled here and imported everywhere else. The stage
folders that `recsys train ...` writes (and `recsys export` reads) are named here as well: the
pre-rank and re-rank serving files are written next to the checkpoint and copied into a version.

The root's own rules live here too, for training (which writes) and the service (which reads):
what a version may be called, the one reader of CURRENT, the atomic write that replaces it and
the lock that serialises publishes. No torch, nothing from training/.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# --- the artifacts root ---
CURRENT = "CURRENT"  # the name of the live version, replaced atomically
LOCK = ".reindex.lock"  # flock: one reindex / rollback / export publish at a time
PENDING_ITEMS = "catalog_pending.jsonl"  # catalog updates waiting for the next reindex (no Redis)
EXPERIMENT = "EXPERIMENT.json"  # the running experiment (service/experiments.py); absent = none

# --- one version folder ---
MANIFEST = "manifest.json"
CATALOG = "catalog.npz"
RETRIEVAL_ONNX = "retrieval.onnx"
ONNX_DATA_SUFFIX = ".data"  # retrieval.onnx.data: the graph's external weights
ITEMS_NPY = "items.npy"
INDEX_FAISS = "index.faiss"
ITEM2ITEM = "item2item.npz"
PRERANK_USER_ONNX = "prerank_user.onnx"
PRERANK_ITEMS = "prerank_items.npy"
PRERANK_FEATURES = "prerank_features.json"
PRERANK_MANIFEST = "prerank_manifest.json"
RERANK_ONNX = "rerank.onnx"
RERANK_ITEMS = "rerank_items.npy"
RERANK_MANIFEST = "rerank_manifest.json"
PAIR_ITEMS = "pair_items.npy"  # (N + 1, 2) float32 per-item columns of the pair features (contract/pair_features.py)

# --- stage folders written by `recsys train` ---
RETRIEVAL_CHECKPOINT = "checkpoint.pt"
PRERANK_CHECKPOINT = "prerank.pt"
RERANK_CHECKPOINT = "prm.pt"  # the served re-ranker; others are saved as <name>.pt beside it
CHECKPOINT_SUFFIX = ".pt"


def onnx_data(onnx_name: str) -> str:
    """The external-weights file ONNX writes beside `onnx_name` (retrieval.onnx -> retrieval.onnx.data)."""
    return onnx_name + ONNX_DATA_SUFFIX


# what a version (and so CURRENT) may be called: a plain folder name, never a path or a dot file
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TMP_PREFIX = ".tmp-"  # a version being built: artifacts_root/.tmp-<version>, renamed into place


class ContractError(ValueError):
    """A file of the artifact contract that breaks it; the message names the file and the problem."""


class RootLocked(ContractError):
    """Another process holds the artifacts root's lock."""


def valid_version(name: str) -> bool:
    return bool(VERSION_RE.match(name)) and name != CURRENT


def read_current(artifacts_root: str | Path) -> str | None:
    """The name in artifacts_root/CURRENT, or None when there is no CURRENT file; ContractError
    when it cannot be read or holds something that is not a version name (e.g. a path out of
    the root)."""
    path = Path(artifacts_root) / CURRENT
    if not path.is_file():
        return None
    # the message never quotes the content: CURRENT may have been pointed at a file that is not ours
    try:
        raw = path.read_bytes()[:256]
    except OSError as exc:
        raise ContractError(f"{path}: unreadable ({type(exc).__name__})") from None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ContractError(f"{path}: unreadable (not UTF-8 text)") from None
    if not valid_version(name):
        raise ContractError(f"{path}: invalid version name ({len(raw)} bytes; must match {VERSION_RE.pattern})")
    return name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old or the new content, never a mix:
    a temp file beside it, fsync, os.replace, fsync of the folder."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_current(artifacts_root: str | Path, version: str) -> None:
    """artifacts_root/CURRENT := version, atomically (write_atomic)."""
    write_atomic(Path(artifacts_root) / CURRENT, version + "\n")


@contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Exclusive non-blocking flock on root/LOCK; RootLocked when another process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RootLocked(f"{root / LOCK}: another reindex or rollback is running") from None
        yield
    finally:
        os.close(fd)
