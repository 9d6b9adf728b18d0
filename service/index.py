"""FAISS retrieval index, serving side: per-launcher search with max-fusion, parameters, persistence.
(Building an index and measuring its recall: service/index_build.py.)

Item embeddings are a float32 matrix ``items`` of shape (N, D); row ``r`` is internal item id
``r + 1`` (id 0 is padding and is never in the index). Scores are inner products. A user is
represented by M launcher vectors (M, D); :func:`search_fused` runs one FAISS search over all
B * M launcher vectors of a batch and fuses the per-launcher hits with a max (DESIGN.md §6.2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

# Serving threads. The request path searches one user (M = 4 queries) at a time on a 2-core
# box that also runs the HTTP worker and ONNX Runtime. Measured (benchmarks/serving/faiss_search.py,
# cores shared with other work): two threads added 7-10 ms to most medians (the second OpenMP
# thread waits for a core that other work holds; IVF 1M nprobe 64: 4.0 -> 11.0 ms) and helped
# in 3 of 14 rows, by 2 ms at most. Offline builds should raise this with set_faiss_threads().
SEARCH_THREADS = 1


@dataclass(frozen=True, eq=False)
class FusedResult:
    """Per-user fused top-k. Row b holds ``counts[b]`` hits, then padding.

    K = min(k, number of indexed items); rows are padded when an ANN index or ``exclude``
    leaves fewer than K hits.
    items: (B, K) int64 internal item ids, 0 = padding.
    scores: (B, K) float32 fused scores, -inf = padding.
    launchers: (B, K) int64 launcher (0..M-1) that gave each score, -1 = padding.
    counts: (B,) int64 number of valid hits per user.
    """

    items: np.ndarray
    scores: np.ndarray
    launchers: np.ndarray
    counts: np.ndarray

    def user(self, b: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Valid (items, scores, launchers) of user ``b``, each of shape (counts[b],)."""
        n = int(self.counts[b])
        return self.items[b, :n], self.scores[b, :n], self.launchers[b, :n]


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def set_faiss_threads(num_threads: int) -> None:
    """Set FAISS's OpenMP thread count for the whole process."""
    if not is_int(num_threads) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    faiss.omp_set_num_threads(int(num_threads))


def as_float32(name: str, x: ArrayLike, shape_text: str, ndims: tuple[int, ...]) -> np.ndarray:
    """Validate a finite real floating array with one of ``ndims`` dimensions; return float32."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        raise ValueError(f"{name} must have shape {shape_text}, got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} must have dimension D >= 1, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def check_items(items: ArrayLike) -> np.ndarray:
    """(N, D) float32, N >= 1."""
    x = as_float32("items", items, "(N, D)", (2,))
    if x.shape[0] == 0:
        raise ValueError("items must have at least one row, got shape (0, D)")
    return x


def factory_string(index: faiss.Index) -> str:
    """The faiss.index_factory description of ``index`` ("Flat", "IVF632,Flat", "HNSW32,Flat");
    recorded in the manifest and checked when a version is loaded."""
    if isinstance(index, faiss.IndexRefineFlat):  # an approximate index whose top k_factor * k are re-scored exactly
        return f"{factory_string(faiss.downcast_index(index.base_index))},RFlat"
    if isinstance(index, faiss.IndexIVFPQFastScan):
        return f"IVF{int(index.nlist)},PQ{int(index.pq.M)}x{int(index.pq.nbits)}fs"
    if isinstance(index, faiss.IndexHNSWFlat):
        return f"HNSW{int(index.hnsw.nb_neighbors(1))},Flat"  # type: ignore[attr-defined]
    if isinstance(index, faiss.IndexIVFFlat):
        return f"IVF{int(index.nlist)},Flat"
    if isinstance(index, faiss.IndexFlat):
        return "Flat"
    return type(index).__name__


def search_params(index: faiss.Index) -> str:
    """The search parameters of ``index`` as a faiss.ParameterSpace string ("nprobe=64",
    "efSearch=256", "nprobe=32,k_factor_rf=4"; "" for an exact index)."""
    parts = []
    if isinstance(index, faiss.IndexRefine):
        base = faiss.downcast_index(index.base_index)
        parts.append(search_params(base))
        parts.append(f"k_factor_rf={int(index.k_factor)}")
    elif isinstance(index, faiss.IndexIVF):
        parts.append(f"nprobe={int(index.nprobe)}")
    elif isinstance(index, faiss.IndexHNSW):
        parts.append(f"efSearch={int(index.hnsw.efSearch)}")
    return ",".join(p for p in parts if p)


def index_params(index: faiss.Index) -> dict[str, Any]:
    """Kind, factory string and search parameters read back from ``index`` (for the manifest and logs)."""
    params: dict[str, Any] = {"ntotal": int(index.ntotal), "dim": int(index.d), "factory": factory_string(index),
                              "search_params": search_params(index)}
    if isinstance(index, faiss.IndexHNSW):
        # nb_neighbors exists at run time; faiss's SWIG type stubs do not declare it
        params.update(kind="hnsw", hnsw_m=int(index.hnsw.nb_neighbors(1)),  # type: ignore[attr-defined]
                      ef_construction=int(index.hnsw.efConstruction),
                      ef_search=int(index.hnsw.efSearch))
    elif isinstance(index, faiss.IndexRefine):
        ivf = faiss.extract_index_ivf(index)
        params.update(kind="ivfpq", nlist=int(ivf.nlist), nprobe=int(ivf.nprobe), k_factor=float(index.k_factor))
    elif isinstance(index, faiss.IndexIVF):
        params.update(kind="ivf", nlist=int(index.nlist), nprobe=int(index.nprobe))
    elif isinstance(index, faiss.IndexFlat):
        params.update(kind="flat")
    else:
        params.update(kind=type(index).__name__)
    return params


def _check_queries(queries: ArrayLike, dim: int) -> tuple[np.ndarray, bool]:
    """(M, D) or (B, M, D) -> ((B, M, D) float32, whether the input was a single user)."""
    q = as_float32("queries", queries, "(M, D) or (B, M, D)", (2, 3))
    single = q.ndim == 2
    if single:
        q = q[None]  # (1, M, D)
    if q.shape[1] == 0:
        raise ValueError(f"queries must hold at least one launcher (M >= 1), got shape {q.shape}")
    if q.shape[2] != dim:
        raise ValueError(f"queries have dimension D={q.shape[2]} but the index has D={dim}")
    return q, single


def _exclude_keys(exclude: ArrayLike | Sequence[ArrayLike] | None, batch: int, ntotal: int,
                  single: bool) -> tuple[np.ndarray, int]:
    """Sorted unique keys ``user * ntotal + row`` to drop, and the most dropped for one user."""
    if exclude is None:
        return np.empty(0, np.int64), 0
    per_user = (not single and isinstance(exclude, (list, tuple, np.ndarray))
                and len(exclude) > 0 and np.ndim(exclude[0]) == 1)
    if per_user:
        lists = cast(Sequence[ArrayLike], exclude)
        if len(lists) != batch:
            raise ValueError(f"exclude has {len(lists)} per-user lists but the batch has "
                             f"B={batch} users")
        parts = [np.asarray(e) for e in lists]
        if any(p.ndim != 1 for p in parts):
            raise ValueError("exclude must hold one 1-D list of item ids per user")
        parts = [p if p.size else p.astype(np.int64) for p in parts]
        users = np.repeat(np.arange(batch, dtype=np.int64), [p.size for p in parts])
        ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
    else:
        ids = np.asarray(exclude)
        if ids.ndim != 1:
            raise ValueError(f"exclude must be a 1-D list of item ids (or, for a batch, one list "
                             f"per user), got shape {ids.shape}")
        users = np.repeat(np.arange(batch, dtype=np.int64), ids.size)
        ids = np.tile(ids, batch)
    if ids.size == 0:
        return np.empty(0, np.int64), 0
    if ids.dtype.kind not in "iu":
        raise ValueError(f"exclude must hold integer item ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.min() < 0 or ids.max() > ntotal:
        bad = int(ids[(ids < 0) | (ids > ntotal)][0])
        raise ValueError(f"exclude holds item id {bad} outside 0..{ntotal}")
    keep = ids > 0  # 0 is padding (zero-padded histories are accepted)
    keys = np.unique(users[keep] * ntotal + (ids[keep] - 1))
    most = int(np.bincount(keys // ntotal, minlength=batch).max()) if keys.size else 0
    return keys, most


def search_fused(index: faiss.Index, queries: ArrayLike, k: int,
                 exclude: ArrayLike | Sequence[ArrayLike] | None = None,
                 timings_ms: dict[str, float] | None = None) -> FusedResult:
    """Top-k items per user under max-fusion of the user's M launchers.

    queries: (M, D) for one user or (B, M, D) for a batch; one faiss search over the B * M
    vectors. fused score(i) = max over launchers l that returned i of <q_l, item_i>; each
    item keeps the launcher giving the max (smallest id on ties). Sorted by score descending,
    ties by smaller item id. exclude: internal item ids to drop, either one 1-D list for every
    user or, for a batch, a list of B per-user lists; each launcher then fetches k + (the
    largest per-user exclude count) so that, with exact search, the result is still the exact
    top-k among the allowed items. k > N returns all N items. Returns a :class:`FusedResult`
    (B = 1 for (M, D) input). timings_ms, when given, receives "search" (the faiss call) and
    "fuse" (exclusion, max-fusion and ranking) in milliseconds.
    """
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    q, single = _check_queries(queries, int(index.d))
    b, m, d = q.shape
    ntotal = int(index.ntotal)
    excluded, most = _exclude_keys(exclude, b, ntotal, single)
    k = min(k, ntotal)  # k > N: every item, and no (B, huge k) allocation
    out_items = np.zeros((b, k), np.int64)
    out_scores = np.full((b, k), -np.inf, np.float32)
    out_launchers = np.full((b, k), -1, np.int64)
    kk = min(k + most, ntotal)  # fetched per launcher
    if b == 0 or kk == 0:
        return FusedResult(out_items, out_scores, out_launchers, np.zeros(b, np.int64))

    t0 = time.perf_counter()
    dist, lab = index.search(q.reshape(b * m, d), kk)  # (B*M, kk) each
    t1 = time.perf_counter()
    rows = lab.ravel()
    scores = dist.ravel()
    flat = np.arange(rows.size, dtype=np.int64)
    users = flat // (m * kk)
    launchers = (flat // kk) % m
    valid = rows >= 0  # faiss returns -1 when a launcher has fewer than kk hits
    keys = users * ntotal + rows
    if excluded.size:
        valid &= ~np.isin(keys, excluded, assume_unique=False)
    keys, scores, users, launchers = keys[valid], scores[valid], users[valid], launchers[valid]

    # Max-fusion: group by (user, item), best score first, then smallest launcher.
    order = np.lexsort((launchers, -scores, keys))
    keys, scores, users, launchers = keys[order], scores[order], users[order], launchers[order]
    first = np.ones(keys.size, bool)
    first[1:] = keys[1:] != keys[:-1]
    keys, scores, users, launchers = keys[first], scores[first], users[first], launchers[first]

    # Per-user ranking: score descending, then item id ascending (keys grow with row).
    order = np.lexsort((keys, -scores, users))
    keys, scores, users, launchers = keys[order], scores[order], users[order], launchers[order]
    per_user = np.bincount(users, minlength=b)
    starts = np.cumsum(per_user) - per_user
    rank = np.arange(keys.size) - starts[users]
    top = rank < k
    users, rank = users[top], rank[top]
    out_items[users, rank] = keys[top] - users * ntotal + 1
    out_scores[users, rank] = scores[top]
    out_launchers[users, rank] = launchers[top]
    if timings_ms is not None:
        timings_ms["search"] = round((t1 - t0) * 1e3, 3)
        timings_ms["fuse"] = round((time.perf_counter() - t1) * 1e3, 3)
    return FusedResult(out_items, out_scores, out_launchers, np.minimum(per_user, k))


def _honour(index: faiss.Index, expect: dict[str, Any], path: Path) -> None:
    """Check the index at ``path`` against the manifest's index block and apply its search parameters."""
    want = expect.get("factory")
    if want is not None and want != factory_string(index):
        raise ValueError(f"index at {path} is {factory_string(index)!r}, the manifest says {want!r}")
    if expect.get("search_params"):  # the general form: a faiss.ParameterSpace string
        try:
            # the SWIG method is overloaded (index, name, value) / (index, string); its stub knows the first
            faiss.ParameterSpace().set_index_parameters(index, str(expect["search_params"]))  # type: ignore[arg-type]
        except RuntimeError as exc:
            raise ValueError(f"manifest index.search_params {expect['search_params']!r}: {exc}") from None
        return
    nprobe, ef = expect.get("nprobe"), expect.get("ef_search")
    if isinstance(index, faiss.IndexIVF) and nprobe is not None:
        if not is_int(nprobe) or not 1 <= nprobe <= index.nlist:
            raise ValueError(f"manifest index.nprobe must be an integer in 1..{index.nlist}, got {nprobe!r}")
        index.nprobe = int(nprobe)
    if isinstance(index, faiss.IndexHNSW) and ef is not None:
        if not is_int(ef) or ef < 1:
            raise ValueError(f"manifest index.ef_search must be an integer >= 1, got {ef!r}")
        index.hnsw.efSearch = int(ef)


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write ``index`` (with its search parameters, e.g. nprobe / efSearch) to ``path``."""
    faiss.write_index(index, str(path))


def load_index(path: str | Path, num_threads: int | None = SEARCH_THREADS, mmap: bool = False,
               expect: dict[str, Any] | None = None) -> faiss.Index:
    """Read an inner-product index from ``path``; set FAISS threads unless num_threads is None.

    mmap: map the file read-only (IO_FLAG_MMAP_IFC: flat codes, IVF lists and HNSW vectors are
    used in place, so the read takes milliseconds at 1M items instead of ~0.3 s per 256 MB, and
    the pages are shared with every process mapping the same file). expect: the manifest's index
    block; its "factory" must match the file's, and its search parameters ("search_params", a
    faiss.ParameterSpace string, else "nprobe" / "ef_search") are applied, so the manifest says
    how the index is searched.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"index file not found: {p}")
    index = faiss.read_index(str(p), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"index at {p} uses metric {index.metric_type}, expected inner product")
    if expect is not None:
        _honour(index, expect, p)
    if num_threads is not None:
        set_faiss_threads(num_threads)
    logger.info("loaded index from %s: %s", p, index_params(index))
    return index


_VECTORS_PER_CHUNK = 1 << 16  # vectors checked at a time by nonfinite_vector (a bounded temporary)


def nonfinite_vector(index: faiss.Index) -> str | None:
    """Where the first stored vector of ``index`` holding NaN or inf is ("row 41" = label 41,
    "IVF centroid 3", ...), or None when every float the index stores is finite.

    A NaN vector scores NaN against every query and FAISS never returns it: the item is silently
    never recommended. Flat storage (Flat, HNSW's storage, RFlat's refinement), IVF lists and
    centroids and PQ codebooks are read in place (a memory-mapped index is not copied); any
    other kind is reconstructed a chunk at a time.
    """
    first_row: int | None = None  # IVF lists hold rows out of order: the smallest bad one is reported
    for what, labels, vectors in _stored_vectors(index):
        ok = np.isfinite(vectors).all(axis=1)
        if ok.all():
            continue
        if labels is None:
            return f"{what} {int(np.argmin(ok))}"
        bad = int(labels[~ok].min())
        first_row = bad if first_row is None else min(first_row, bad)
    return None if first_row is None else f"row {first_row}"


def _stored_vectors(index: faiss.Index) -> Iterator[tuple[str, np.ndarray | None, np.ndarray]]:
    """(what, labels or None = position, (n, d) float32 vectors) chunks of everything ``index`` stores."""
    index = faiss.downcast_index(index)
    d = int(index.d)
    if isinstance(index, faiss.IndexRefine):
        yield from _stored_vectors(index.base_index)
        yield from _stored_vectors(index.refine_index)
        return
    if isinstance(index, faiss.IndexHNSW):
        yield from _stored_vectors(index.storage)
        return
    if isinstance(index, faiss.IndexFlat):
        n = int(index.ntotal)
        if n:
            xb = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
            for start in range(0, n, _VECTORS_PER_CHUNK):
                yield "row", np.arange(start, min(start + _VECTORS_PER_CHUNK, n)), xb[start:start + _VECTORS_PER_CHUNK]
        return
    if isinstance(index, faiss.IndexIVF):
        for what, _, vectors in _stored_vectors(index.quantizer):
            yield f"IVF centroid ({what})", None, vectors
        pq = getattr(index, "pq", None)
        if pq is not None:  # PQ codes are small integers; the floats are the codebooks
            yield "PQ centroid", None, faiss.vector_to_array(pq.centroids).reshape(-1, int(pq.dsub))
            return
        if isinstance(index, faiss.IndexIVFFlat):
            inv = index.invlists
            assert inv is not None  # an IVF index read from a file has its lists
            for lst in range(int(index.nlist)):
                size = int(inv.list_size(lst))
                if size:
                    codes = faiss.rev_swig_ptr(inv.get_codes(lst), size * d * 4)
                    labels = faiss.rev_swig_ptr(inv.get_ids(lst), size)
                    yield "row", np.asarray(labels), np.frombuffer(codes, np.float32).reshape(size, d)
        return
    n = int(index.ntotal)  # any other kind: what reconstruct gives back
    try:
        for start in range(0, n, _VECTORS_PER_CHUNK):
            stop = min(start + _VECTORS_PER_CHUNK, n)
            yield "row", np.arange(start, stop), index.reconstruct_n(start, stop - start)
    except RuntimeError as exc:  # a kind that cannot reconstruct: nothing more to read
        logger.warning("index %s: stored vectors not checked for NaN / inf (%s)", type(index).__name__, exc)
