"""Tests for service/index.py: exact max-fusion property, batching, padding, errors, ANN recall."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.index import FusedResult, index_params, load_index, save_index, search_fused
from service.index_build import IndexSpec, ann_recall, build_index, choose_kind
from service.contract.layout import INDEX_FAISS


def clustered(n: int, d: int, seed: int, clusters: int = 50) -> np.ndarray:
    """(n, d) float32 mixture of Gaussians, unit rows scaled by random norms."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x * rng.lognormal(0.0, 0.25, (n, 1))).astype(np.float32)


@st.composite
def fusion_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    n = draw(st.integers(1, 60))
    d = draw(st.integers(1, 8))
    m = draw(st.integers(1, 5))
    k = draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        # Small integers: products are exact in float32 and ties are frequent.
        items = rng.integers(-2, 3, (n, d)).astype(np.float32)
        queries = rng.integers(-2, 3, (m, d)).astype(np.float32)
    else:
        items = rng.uniform(-1, 1, (n, d)).astype(np.float32)
        queries = rng.uniform(-1, 1, (m, d)).astype(np.float32)
    ids = draw(st.lists(st.integers(1, n), max_size=n, unique=True))
    return items, queries, k, (np.array(ids, np.int64) if ids else None)


@settings(max_examples=150, deadline=None)
@given(fusion_case())
def test_fused_topk_equals_exact_topk_of_max_over_launchers(
        case: tuple[np.ndarray, np.ndarray, int, np.ndarray | None]) -> None:
    items, queries, k, exclude = case
    index = build_index(items, IndexSpec(kind="flat"))
    got = search_fused(index, queries, k, exclude=exclude)
    g_items, g_scores, g_launchers = got.user(0)

    per_launcher = queries.astype(np.float64) @ items.astype(np.float64).T  # (M, N)
    fused = per_launcher.max(axis=0)  # (N,)
    allowed = np.ones(items.shape[0], bool)
    if exclude is not None:
        allowed[exclude - 1] = False
    ref = np.sort(fused[allowed])[::-1][:k]
    # faiss sums D float32 products in its own order; the float64 reference differs by a few
    # float32 ulps of the largest partial sum (|x|, |q| <= 2, D <= 8 -> |sum| <= 32).
    tol = 1e-5 * max(1.0, float(np.abs(per_launcher).max()))

    assert got.items.shape == (1, min(k, items.shape[0])) and got.counts[0] == ref.size
    np.testing.assert_allclose(np.sort(g_scores)[::-1], ref, rtol=0, atol=tol)
    # Padding after the valid hits.
    assert np.all(got.items[0, got.counts[0]:] == 0)
    assert np.all(got.launchers[0, got.counts[0]:] == -1)
    assert np.all(np.isneginf(got.scores[0, got.counts[0]:]))
    if ref.size == 0:  # every item excluded
        return
    rows = g_items - 1
    assert np.all(allowed[rows]) and np.unique(rows).size == rows.size
    # Same set as the exact top-k up to ties at the k-th score.
    kth = ref[-1]
    must = np.flatnonzero(allowed & (fused > kth + tol))
    assert set(must.tolist()) <= set(rows.tolist())
    assert np.all(fused[rows] >= kth - tol)
    np.testing.assert_allclose(g_scores, fused[rows], rtol=0, atol=tol)
    # Each item's launcher gives its max; order is score desc, then item id asc.
    assert np.all(per_launcher[g_launchers, rows] >= fused[rows] - tol)
    assert np.all((np.diff(g_scores) < 0) | ((np.diff(g_scores) == 0) & (np.diff(g_items) > 0)))


class CountingIndex:
    """Wraps a faiss index and records the query count of every search call."""

    def __init__(self, index: faiss.Index) -> None:
        self.inner = index
        self.d = index.d
        self.ntotal = index.ntotal
        self.calls: list[int] = []

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(x.shape[0])
        return self.inner.search(x, k)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_batch_equals_per_user_calls_with_one_search(kind: str) -> None:
    items = clustered(2000, 16, seed=1)
    spec = IndexSpec(kind=kind, nlist=32, nprobe=4)
    index = build_index(items, spec)
    # B * M = 15 queries: below faiss's BLAS threshold (20), so every call takes the same
    # code path and scores match bit for bit.
    queries = np.random.default_rng(2).standard_normal((5, 3, 16)).astype(np.float32)
    exclude = [np.array([1, 2, 3]), np.array([], np.int64), np.arange(1, 300), np.array([7]),
               np.array([0, 0, 5])]
    counting = CountingIndex(index)
    batch = search_fused(counting, queries, 50, exclude=exclude)
    assert counting.calls == [15]
    for b in range(5):
        one = search_fused(index, queries[b], 50, exclude=exclude[b])
        assert one.items.shape == (1, 50)
        np.testing.assert_array_equal(batch.items[b], one.items[0])
        np.testing.assert_array_equal(batch.launchers[b], one.launchers[0])
        np.testing.assert_array_equal(batch.scores[b], one.scores[0])
        assert batch.counts[b] == one.counts[0] == 50


def test_shared_exclude_applies_to_every_user() -> None:
    items = clustered(300, 8, seed=3)
    index = build_index(items)
    queries = np.random.default_rng(4).standard_normal((2, 2, 8)).astype(np.float32)
    top = search_fused(index, queries, 5)
    drop = np.unique(top.items)
    res = search_fused(index, queries, 5, exclude=drop)
    assert not np.isin(res.items, drop).any()
    assert np.all(res.counts == 5)


def test_k_larger_than_catalog_returns_every_item() -> None:
    items = clustered(10, 4, seed=5)
    index = build_index(items)
    res = search_fused(index, items[:3] * 2.0, 25)
    assert res.items.shape == (1, 10) and res.counts.tolist() == [10]
    its, scores, launchers = res.user(0)
    assert sorted(its.tolist()) == list(range(1, 11))
    assert np.all(np.diff(scores) <= 0) and set(launchers.tolist()) <= {0, 1, 2}
    # With 8 items excluded only 2 remain: the rest of the row is padding.
    res = search_fused(index, items[:3], 25, exclude=np.arange(1, 9))
    assert res.counts.tolist() == [2] and sorted(res.items[0, :2].tolist()) == [9, 10]
    assert np.all(res.items[0, 2:] == 0) and np.all(res.launchers[0, 2:] == -1)
    assert np.all(np.isneginf(res.scores[0, 2:]))


def test_minus_one_labels_from_ann_are_dropped() -> None:
    items = clustered(400, 8, seed=6, clusters=8)
    index = build_index(items, IndexSpec(kind="ivf", nlist=40, nprobe=1))
    queries = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32)
    _, raw = index.search(queries, 60)
    assert (raw == -1).any()  # a list holds ~10 items: faiss pads each launcher with -1
    res = search_fused(index, queries, 60)
    its, scores, launchers = res.user(0)
    expected = np.unique(raw[raw >= 0]) + 1
    assert res.counts[0] == expected.size < 60
    np.testing.assert_array_equal(np.sort(its), expected)
    exact = queries @ items.T  # (M, N)
    np.testing.assert_allclose(scores, exact[launchers, its - 1], rtol=1e-5, atol=1e-5)
    assert np.all(res.items[0, res.counts[0]:] == 0)


def test_empty_batch() -> None:
    index = build_index(clustered(20, 4, seed=8))
    res = search_fused(index, np.zeros((0, 2, 4), np.float32), 3)
    assert isinstance(res, FusedResult) and res.items.shape == (0, 3) and res.counts.shape == (0,)


@pytest.mark.parametrize(("items", "spec", "message"), [
    (np.ones((5, 4), np.int64), None, "items must be a floating-point array, got dtype int64"),
    (np.ones(5, np.float32), None, r"items must have shape \(N, D\), got shape \(5,\)"),
    (np.ones((0, 4), np.float32), None, "items must have at least one row"),
    (np.ones((5, 0), np.float32), None, "dimension D >= 1"),
    (np.array([[1.0, np.nan]], np.float32), None, "items contains non-finite values"),
    (np.ones((5, 4), np.float32), IndexSpec(kind="ivf", nlist=6), "nlist=6 exceeds .* N=5"),
])
def test_build_index_rejects_bad_items(items: np.ndarray, spec: IndexSpec | None,
                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_index(items, spec)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "lsh"}, r"kind must be one of \('flat', 'hnsw', 'ivf'\), got 'lsh'"),
    ({"kind": "ivf", "nprobe": 0}, "nprobe must be an integer >= 1, got 0"),
    ({"kind": "hnsw", "hnsw_m": 2.5}, "hnsw_m must be an integer >= 1, got 2.5"),
    ({"kind": "ivf", "nlist": 0}, "nlist must be None or an integer >= 1, got 0"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_index_spec_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IndexSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("queries", "k", "exclude", "message"), [
    (np.ones((2, 5), np.float32), 3, None, "queries have dimension D=5 but the index has D=4"),
    (np.ones((1, 2, 3, 4), np.float32), 3, None,
     r"queries must have shape \(M, D\) or \(B, M, D\), got shape \(1, 2, 3, 4\)"),
    (np.ones((0, 4), np.float32), 3, None, r"at least one launcher \(M >= 1\)"),
    (np.ones((2, 4), np.int32), 3, None, "queries must be a floating-point array"),
    (np.full((2, 4), np.inf, np.float32), 3, None, "queries contains non-finite values"),
    (np.ones((2, 4), np.float32), 0, None, "k must be an integer >= 1, got 0"),
    (np.ones((2, 4), np.float32), True, None, "k must be an integer >= 1, got True"),
    (np.ones((2, 4), np.float32), 3, [1, 21], "exclude holds item id 21 outside 0..20"),
    (np.ones((2, 4), np.float32), 3, [-1], "exclude holds item id -1 outside 0..20"),
    (np.ones((2, 4), np.float32), 3, [1.5],
     "exclude must hold integer item ids, got dtype float64"),
    (np.ones((2, 4), np.float32), 3, [[1], [2]],
     r"exclude must be a 1-D list .* got shape \(2, 1\)"),
    (np.ones((3, 2, 4), np.float32), 3, [[1], [2]],
     "exclude has 2 per-user lists but the batch has B=3 users"),
])
def test_search_fused_rejects_bad_input(queries: np.ndarray, k: int, exclude: object,
                                        message: str) -> None:
    index = build_index(clustered(20, 4, seed=9))
    with pytest.raises(ValueError, match=message):
        search_fused(index, queries, k, exclude=exclude)  # type: ignore[arg-type]


def test_choose_kind_threshold() -> None:
    assert choose_kind(1) == "flat" and choose_kind(50_000) == "flat"
    assert choose_kind(50_001) == "ivf"
    with pytest.raises(ValueError, match="num_items must be an integer >= 0, got -3"):
        choose_kind(-3)


@pytest.fixture(scope="module")
def clustered_20k() -> tuple[np.ndarray, np.ndarray]:
    items = clustered(20_000, 32, seed=10, clusters=200)
    rng = np.random.default_rng(11)
    # Launcher-like queries: near item clusters, as a trained encoder produces.
    noise = 0.5 * rng.standard_normal((300, 32)) / np.sqrt(32)
    queries = items[rng.integers(0, len(items), 300)] + noise
    return items, queries.astype(np.float32)


def test_ivf_default_params_reach_recall_and_round_trip(
        clustered_20k: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    items, queries = clustered_20k
    index = build_index(items, IndexSpec(kind="ivf"))
    recall = ann_recall(index, items, queries, k=100, sample=200)
    assert recall >= 0.9, recall
    exact = build_index(items, IndexSpec(kind="flat"))
    assert ann_recall(exact, items, queries, k=100, sample=200) == 1.0

    path = tmp_path / INDEX_FAISS
    save_index(index, path)
    loaded = load_index(path, num_threads=None)
    assert index_params(loaded) == index_params(index)
    users = queries[:40].reshape(10, 4, 32)  # (B, M, D)
    before, after = search_fused(index, users, 200), search_fused(loaded, users, 200)
    np.testing.assert_array_equal(before.items, after.items)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.launchers, after.launchers)


def test_ann_recall_matches_set_intersection(clustered_20k: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = clustered_20k
    index = build_index(items, IndexSpec(kind="ivf", nlist=256, nprobe=1))
    recall = ann_recall(index, items, queries, k=50, sample=len(queries))
    _, approx = index.search(queries, 50)
    truth = np.argsort(-(queries.astype(np.float64) @ items.T.astype(np.float64)), axis=1)[:, :50]
    expected = np.mean([len(set(a[a >= 0]) & set(t)) / 50 for a, t in zip(approx, truth)])
    assert recall < 0.95  # one probe of 256 lists really misses neighbours
    assert recall == pytest.approx(expected, abs=1e-3)


def test_hnsw_small_catalog_is_near_exact() -> None:
    items = clustered(500, 8, seed=12, clusters=5)
    queries = np.random.default_rng(13).standard_normal((50, 8)).astype(np.float32)
    index = build_index(items, IndexSpec(kind="hnsw"))
    assert index_params(index)["kind"] == "hnsw" and index_params(index)["ef_search"] == 256
    assert ann_recall(index, items, queries, k=20) >= 0.95


def test_load_index_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index file not found"):
        load_index(tmp_path / "missing.faiss")
    l2 = faiss.IndexFlatL2(4)
    faiss.write_index(l2, str(tmp_path / "l2.faiss"))
    with pytest.raises(ValueError, match="expected inner product"):
        load_index(tmp_path / "l2.faiss", num_threads=None)


def test_ann_recall_rejects_mismatched_items() -> None:
    index = build_index(clustered(20, 4, seed=14))
    message = r"index holds 20 vectors of D=4 but items have shape \(19, 4\)"
    with pytest.raises(ValueError, match=message):
        ann_recall(index, clustered(19, 4, seed=14), np.ones((3, 4), np.float32))


def test_ivf_lists_from_lifted_items_find_the_large_norm_items_at_few_probes() -> None:
    """A trained catalog's norms are skewed (a few popular items large, the tail tiny): IVF lists
    clustered on the raw directions scatter the winners, lists from the lifted items do not."""
    rng = np.random.default_rng(21)
    items = clustered(20_000, 16, seed=22, clusters=40) * 0.05  # the long tail
    hot = rng.choice(len(items), 500, replace=False)
    items[hot] *= 30.0  # the popular items
    queries = rng.standard_normal((100, 16)).astype(np.float32)
    ours = build_index(items, IndexSpec(kind="ivf", nlist=128, nprobe=8))
    assert isinstance(ours, faiss.IndexIVFFlat) and ours.d == 16  # served as a plain D-dim IVF
    raw = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 128, faiss.METRIC_INNER_PRODUCT)
    raw.cp.seed = 0
    raw.train(items[np.sort(rng.choice(len(items), 128 * 64, replace=False))])
    raw.add(items)
    raw.nprobe = 8
    lifted, plain = ann_recall(ours, items, queries, k=50), ann_recall(raw, items, queries, k=50)
    assert lifted > plain + 0.15, (lifted, plain)  # measured 0.59 vs 0.34
    exact = build_index(items, IndexSpec(kind="flat"))
    ours.nprobe = 128  # every list: the scores are the exact inner products
    got, want = search_fused(ours, queries[:6].reshape(3, 2, 16), 30), search_fused(exact, queries[:6].reshape(3, 2, 16), 30)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
