"""Build a FAISS retrieval index and measure its recall (publish time; service/index.py serves it).

Item embeddings are a float32 matrix ``items`` of shape (N, D); row ``r`` is internal item id
``r + 1`` (id 0 is padding and is never in the index). Scores are inner products.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import faiss
import numpy as np
from numpy.typing import ArrayLike

from service.index import as_float32, check_items, index_params, is_int

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivf"]
KINDS: tuple[IndexKind, ...] = ("flat", "hnsw", "ivf")
FLAT_MAX_ITEMS = 50_000

# k-means training points per IVF list: faiss warns below 39, and gains little above ~64.
TRAIN_POINTS_PER_LIST = 64
# Queries x items scored per chunk in ann_recall's exact search (float32: 64 MiB).
_EXACT_CHUNK = 1 << 24


@dataclass(frozen=True)
class IndexSpec:
    """Index type and parameters; stored in the artifact manifest via :meth:`to_dict`.

    ``kind`` is "flat" (exact), "hnsw" (HNSW-Flat) or "ivf" (IVF-Flat). ``nlist=None``
    means ``auto_nlist(N)`` at build time.
    """

    kind: IndexKind = "flat"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 256
    nlist: int | None = None
    nprobe: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"IndexSpec.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"IndexSpec.{name} must be an integer >= 1, got {value!r}")
        if self.nlist is not None and (not is_int(self.nlist) or self.nlist < 1):
            raise ValueError(f"IndexSpec.nlist must be None or an integer >= 1, got {self.nlist!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"IndexSpec.seed must be an integer >= 0, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest."""
        return asdict(self)


def auto_nlist(num_items: int) -> int:
    """IVF list count 2 * sqrt(N), capped so each list gets 39 training points.

    Half faiss's usual 4 * sqrt(N): at 1M items recall follows the fraction of items scanned
    (nlist 1024 / 2048 / 4000 with nprobe 32 / 64 / 128: recall@100 0.937 / 0.945 / 0.949),
    and k-means with 2048 lists trains ~3x faster than with 4000 on 2 cores. With the default
    nprobe = 64 this scans ~3% of a 1M catalogue.
    """
    return max(1, min(int(2 * math.sqrt(num_items)), num_items // 39))


def choose_kind(num_items: int) -> IndexKind:
    """Index kind for a catalogue of ``num_items`` items: exact up to 50k, IVF-Flat beyond.

    The threshold is a serving-cost one: at 100k items the exact search was half of a
    request's compute (1.8 of 3.5 ms, benchmarks/serving/load_test.py) and the flat-index service
    held p99 <= 100 ms only up to 50 rps on 2 cores; IVF gets recall@100 0.996 there at a
    third of the cost. Publishing measures the recall and refuses a version below --min-recall.

    IVF-Flat rather than HNSW, measured on 2 cores with clustered D = 64 embeddings whose norms
    vary (benchmarks/serving/faiss_search.py, 100k items): HNSW (M 32, efConstruction 80, efSearch
    256) gets recall@100 0.909 at 2.0 ms CPU per request, 18 s build, 50 MB; IVF-Flat
    (spherical k-means, nprobe 64) gets 0.996 at 1.1 ms, 1.7 s build, 25 MB. Inner product
    is not a metric, so HNSW's graph favours large-norm items and its recall plateaus; at 1M
    items its build did not finish in 500 s on the shared 2 cores (IVF: 33 s). IVF's
    recall / latency trade-off is one knob, nprobe, which can be changed after loading.
    """
    if not is_int(num_items) or num_items < 0:
        raise ValueError(f"num_items must be an integer >= 0, got {num_items!r}")
    return "flat" if num_items <= FLAT_MAX_ITEMS else "ivf"


def build_index(items: ArrayLike, spec: IndexSpec | None = None) -> faiss.Index:
    """Inner-product index over the rows of ``items`` (N, D); faiss label r = item id r + 1.

    ``spec=None`` picks ``IndexSpec(kind=choose_kind(N))``. IVF lists are trained on a seeded
    sample of ``TRAIN_POINTS_PER_LIST * nlist`` rows lifted onto a sphere (_ivf_on_augmented).
    """
    x = check_items(items)
    n, d = x.shape
    if spec is None:
        spec = IndexSpec(kind=choose_kind(n))
    index: faiss.Index
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(x)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
        index.add(x)
    else:
        nlist = spec.nlist if spec.nlist is not None else auto_nlist(n)
        if nlist > n:
            raise ValueError(f"IndexSpec.nlist={nlist} exceeds the number of items N={n}")
        index = _ivf_on_augmented(np.ascontiguousarray(x), nlist, spec)
    logger.info("built %s index: %d items, D=%d, params=%s", spec.kind, n, d, index_params(index))
    return index


def _ivf_on_augmented(x: np.ndarray, nlist: int, spec: IndexSpec) -> faiss.IndexIVFFlat:
    """IVF-Flat (inner product) whose lists come from the items lifted onto a sphere.

    Inner product is not a distance: when item norms vary (a briefly trained model gives a few
    popular items large norms and the long tail tiny ones), spherical k-means on the raw items
    groups them by direction only, and a query's best items, the large-norm ones, sit in lists
    whose centroids it barely points at. The standard reduction of maximum inner product search
    to nearest neighbours appends sqrt(R^2 - |x|^2) to each item (R = the largest norm) and 0 to
    each query: every item then has norm R, the query's inner products are unchanged, and
    k-means on the lifted items clusters by what a query will score. The lists are trained and
    filled in D + 1 dimensions; the served index keeps D: a query's extra 0 makes its inner
    product with a lifted centroid equal its inner product with the centroid's first D
    coordinates, so the quantizer holds those and probes the same lists, and nothing changes
    at serving time. Measured on a briefly trained 100k-item version (benchmarks/serving/index_choice.py):
    recall@100 1.0 at nprobe 4 (0.05 ms per user), where IVF on the raw items needed nprobe 64
    (0.41 ms).
    """
    n, d = x.shape
    norms = np.linalg.norm(x, axis=1)
    lifted = np.hstack([x, np.sqrt(np.maximum(norms.max() ** 2 - norms ** 2, 0.0))[:, None]]).astype(np.float32)
    rng = np.random.default_rng(spec.seed)
    sample = lifted[np.sort(rng.choice(n, size=min(n, TRAIN_POINTS_PER_LIST * nlist), replace=False))]
    trainer = faiss.IndexIVFFlat(faiss.IndexFlatIP(d + 1), d + 1, nlist, faiss.METRIC_INNER_PRODUCT)
    trainer.cp.seed = spec.seed
    trainer.train(sample)  # spherical k-means (faiss's default for inner product)
    centroids = trainer.quantizer.reconstruct_n(0, nlist)  # (nlist, D + 1)
    _, lists = trainer.quantizer.search(lifted, 1)  # each item's list, chosen in D + 1 dimensions
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(centroids[:, :d]))
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    index.add_core(n, faiss.swig_ptr(x), None, faiss.swig_ptr(np.ascontiguousarray(lists[:, 0], np.int64)))
    index.nprobe = min(spec.nprobe, nlist)
    return index


def ann_recall(index: faiss.Index, items: ArrayLike, queries: ArrayLike, k: int = 100,
               sample: int = 1000, seed: int = 0) -> float:
    """Recall@k of ``index`` against exact inner-product search over ``items`` (N, D).

    queries: (Q, D) or (B, M, D) (flattened to single vectors); a seeded sample of ``sample``
    of them is scored. A returned item counts as a hit when its exact score reaches the exact
    k-th best score, so items tied with the k-th (duplicate embeddings) are not misses.
    k is capped at N.
    """
    x = check_items(items)
    n, d = x.shape
    if int(index.ntotal) != n or int(index.d) != d:
        raise ValueError(f"index holds {index.ntotal} vectors of D={index.d} but items have "
                         f"shape {x.shape}")
    q = as_float32("queries", queries, "(Q, D) or (B, M, D)", (2, 3)).reshape(-1, d)
    if q.shape[0] == 0:
        raise ValueError("queries must hold at least one vector")
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not is_int(sample) or sample < 1:
        raise ValueError(f"sample must be an integer >= 1, got {sample!r}")
    rng = np.random.default_rng(seed)
    q = q[np.sort(rng.choice(q.shape[0], size=min(sample, q.shape[0]), replace=False))]
    k = min(int(k), n)
    _, lab = index.search(q, k)  # (S, k)
    found = lab >= 0
    hits = 0
    chunk = max(1, _EXACT_CHUNK // n)
    for start in range(0, q.shape[0], chunk):
        exact = q[start:start + chunk] @ x.T  # (c, N)
        kth = np.partition(exact, n - k, axis=1)[:, n - k]  # (c,) exact k-th best score
        rows = lab[start:start + chunk]
        got = np.take_along_axis(exact, np.where(rows >= 0, rows, 0), axis=1)  # (c, k)
        hits += int(((got >= kth[:, None]) & found[start:start + chunk]).sum())
    return hits / (q.shape[0] * k)
