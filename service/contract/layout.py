"""Every file name of the training -> serving contract, in one place (DESIGN.md §5).

A published version is one folder, artifacts/<version>/, whose manifest names its files; the
service reads the names from the manifest and never builds one itself, but training writes them
and tests look for them, so each name is spelled here and imported everywhere else. The stage
folders that `recsys train ...` writes (and `recsys export` reads) are named here as well: the
pre-rank and re-rank serving files are written next to the checkpoint and copied into a version.
"""

from __future__ import annotations

# --- the artifacts root ---
CURRENT = "CURRENT"  # the name of the live version, replaced atomically
LOCK = ".reindex.lock"  # flock: one reindex / rollback / export publish at a time
PENDING_ITEMS = "catalog_pending.jsonl"  # catalog updates waiting for the next reindex (no Redis)

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

# --- stage folders written by `recsys train` ---
RETRIEVAL_CHECKPOINT = "checkpoint.pt"
PRERANK_CHECKPOINT = "prerank.pt"
RERANK_CHECKPOINT = "prm.pt"  # the served re-ranker; others are saved as <name>.pt beside it
CHECKPOINT_SUFFIX = ".pt"


def onnx_data(onnx_name: str) -> str:
    """The external-weights file ONNX writes beside `onnx_name` (retrieval.onnx -> retrieval.onnx.data)."""
    return onnx_name + ONNX_DATA_SUFFIX
