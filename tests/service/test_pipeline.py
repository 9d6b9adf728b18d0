"""service/pipeline.py: the Recommender over one tiny published version (tests/service/test_api.py
publishes it): the stage cuts it serves, the filter masks, and the name of every path it can take
(`served_by`), fallbacks included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.artifacts import LoadedVersion, load_current, load_version
from service.contract.manifest import STAGES
from service.item2item import Merged
from service.pipeline import FilterError, Recommender, _Timer, served_stages
from tests.service.test_api import artifacts_root, catalog  # noqa: F401  (module fixtures)


@pytest.fixture(scope="module")
def version(artifacts_root: Path) -> LoadedVersion:  # noqa: F811
    return load_current(artifacts_root)


def _with_serving(artifacts_root: Path, tmp_path: Path, serving: object) -> LoadedVersion:  # noqa: F811
    """The published version with its manifest's `serving` replaced (None: removed), as on disk."""
    folder = tmp_path / "v1"
    shutil.copytree(artifacts_root / "v1", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("serving", None)
    if serving is not None:
        manifest["serving"] = serving
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return load_version(folder)


def _category(v: LoadedVersion, i: int) -> str:
    return v.item_features.vocab["category"][int(v.item_features.categorical["category"][i]) - 1]


# --- stage cuts ---


def test_served_stages_follow_the_manifest_else_the_files(artifacts_root: Path, tmp_path: Path) -> None:  # noqa: F811
    two = _with_serving(artifacts_root, tmp_path / "a", {"stages": ["retrieval", "prerank"]})
    assert served_stages(two) == ("retrieval", "prerank") and Recommender(two).stages == ("retrieval", "prerank")
    unset = _with_serving(artifacts_root, tmp_path / "b", None)
    assert unset.rerank is not None and served_stages(unset) == STAGES == ("retrieval", "prerank", "rerank")
    no_stages = _with_serving(artifacts_root, tmp_path / "c", {"reason": "no gate run"})
    assert served_stages(no_stages) == STAGES


@pytest.mark.parametrize("stages, path, scored", [
    (("retrieval",), "retrieval", {"retrieval"}),
    (("retrieval", "prerank"), "prerank", {"retrieval", "prerank"}),
    (STAGES, "rerank", {"retrieval", "prerank", "rerank"}),
])
def test_each_cut_serves_its_last_stage_order(version: LoadedVersion, catalog: list[str],  # noqa: F811
                                              stages: tuple[str, ...], path: str, scored: set[str]) -> None:
    rec = Recommender(version, retrieval_k=50, prerank_n=10, stages=stages)
    out = rec.recommend(catalog[:4], k=10, explain=True)
    assert out.served_by == path and len(out.items) == 10 and out.model_version == "v1"
    assert not {it.item_id for it in out.items} & set(catalog[:4])
    assert set(out.items[0].stages) == scored  # the top item was scored by every served stage
    assert out.items[0].score == out.items[0].stages[path]
    assert set(out.timings_ms) >= {"encode", "search", *scored - {"retrieval"}, "total"}
    if path != "rerank":  # past the re-ranked head, a re-ranked list keeps pre-rank scores
        assert all(it.score == it.stages[path] for it in out.items)
        assert [it.score for it in out.items] == sorted((it.score for it in out.items), reverse=True)


def test_the_cuts_agree_on_their_shared_prefix(version: LoadedVersion, catalog: list[str]) -> None:  # noqa: F811
    """A later stage reorders the same candidates: each cut's per-item earlier-stage scores are
    the earlier cut's scores."""
    k = version.num_items  # every candidate, so both cuts return the same set
    retrieval = Recommender(version, stages=("retrieval",)).recommend(catalog[:4], k=k, explain=True)
    prerank = Recommender(version, stages=STAGES[:2]).recommend(catalog[:4], k=k, explain=True)
    assert len(retrieval.items) == version.num_items - 4
    ret_scores = {it.item_id: it.score for it in retrieval.items}
    assert {it.item_id: it.stages["retrieval"] for it in prerank.items} == ret_scores


def test_bad_cuts_and_sizes_are_value_errors(version: LoadedVersion) -> None:
    with pytest.raises(ValueError, match=r"non-empty prefix of \('retrieval', 'prerank', 'rerank'\), got \('prerank',\)"):
        Recommender(version, stages=("prerank",))
    with pytest.raises(ValueError, match=r"non-empty prefix .*, got \(\)"):
        Recommender(version, stages=())
    with pytest.raises(ValueError, match="retrieval_k and prerank_n must be >= 1, got 0 and 30"):
        Recommender(version, retrieval_k=0)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        Recommender(version).recommend(["x"], k=0)


# --- filters ---


def test_filter_mask_is_the_items_whose_features_pass(version: LoadedVersion) -> None:
    rec = Recommender(version)
    wanted = _category(version, 1)
    mask = rec.filter_mask({"category": [wanted]})
    assert mask.shape == (version.num_items + 1,) and mask.dtype == bool and not mask[0]
    expect = [i for i in range(1, version.num_items + 1) if _category(version, i) == wanted]
    assert np.flatnonzero(mask).tolist() == expect
    # values are a set (order and repeats do not matter) and the mask is cached under it
    assert np.array_equal(rec.filter_mask({"category": [wanted, wanted]}), mask)
    assert ("category", (wanted,)) in rec._filter_cache
    # multi-valued: an item passes when any of its values is asked for; names combine with AND
    tags, tag_vocab = version.item_features.multi["tags"], version.item_features.vocab["tags"]
    tag = tag_vocab[int(tags[1][tags[1] > 0][0]) - 1]
    code = tag_vocab.index(tag) + 1
    both = rec.filter_mask({"tags": [tag], "category": [wanted]})
    assert np.flatnonzero(both).tolist() == [i for i in expect if code in tags[i].tolist()]
    assert both[1]


@pytest.mark.parametrize("filters, field, message", [
    ({"nope": ["x"]}, "nope", "unknown item feature; filterable: ["),
    ({"category": []}, "category", "needs at least one value"),
    ({"category": ["no-such-value"]}, "category", "unknown value(s) ['no-such-value']; "),
])
def test_a_filter_the_version_cannot_apply_is_a_filter_error(version: LoadedVersion, catalog: list[str],  # noqa: F811
                                                             filters: dict[str, list[str]], field: str,
                                                             message: str) -> None:
    rec = Recommender(version)
    with pytest.raises(FilterError) as err:
        rec.recommend(catalog[:3], k=5, filters=filters)
    assert err.value.field == field and err.value.message.startswith(message)
    assert str(err.value) == f"filters.{field}: {err.value.message}"


def test_a_short_filtered_list_is_topped_up_with_popular_passing_items(version: LoadedVersion,
                                                                       catalog: list[str]) -> None:  # noqa: F811
    rec = Recommender(version)
    wanted = _category(version, 1)
    mask = rec.filter_mask({"category": [wanted]})
    passing = {str(version.item_ids[i]) for i in np.flatnonzero(mask)} - set(catalog[:3])
    out = rec.recommend(catalog[:3], k=len(passing) + 5, filters={"category": [wanted]})
    assert out.served_by.endswith(";filter_backfill")
    assert {it.item_id for it in out.items} == passing  # every passing unseen item, nothing else
    # one meaning of score: the ordering stage's; the popular top-ups (few candidates: retrieval_k
    # 5) have none and come last
    few = Recommender(version, retrieval_k=5, prerank_n=5).recommend(catalog[:3], k=len(passing) + 5,
                                                                     filters={"category": [wanted]})
    assert few.served_by.endswith(";filter_backfill") and {it.item_id for it in few.items} == passing
    assert few.scored_by == few.served_by.split(";")[0] != "popularity"
    scored = [it for it in few.items if it.score is not None]
    assert few.items[:len(scored)] == scored and len(scored) < len(few.items)
    assert all(set(it.stages) == {"popularity"} for it in few.items[len(scored):])


# --- fallback paths ---


def test_no_usable_history_serves_popularity(version: LoadedVersion) -> None:
    rec = Recommender(version)
    top = [str(version.item_ids[i]) for i in np.argsort(-version.popularity[1:], kind="stable")[:5] + 1]
    for history in ([], ["unknown-1", "unknown-2"]):
        out = rec.recommend(history, k=5, explain=True)
        assert out.served_by == "popularity" and [it.item_id for it in out.items] == top
        assert out.unknown_items == len(history) and all(it.launcher is None for it in out.items)
        assert list(out.timings_ms) == ["popularity", "total"]


def test_the_popularity_fallback_alone_drops_seen_excluded_and_filtered_items(version: LoadedVersion,
                                                                              catalog: list[str]) -> None:  # noqa: F811
    """recommend_popular (the spent-budget answer) is recommend()'s own no-history fallback."""
    rec = Recommender(version)
    popular = [str(version.item_ids[i]) for i in np.argsort(-version.popularity[1:], kind="stable") + 1]
    history, exclude = popular[:3] + ["unknown-1"], popular[3:5]
    out = rec.recommend_popular(history, 4, exclude, reason="timeout")
    assert out.served_by == "popularity;timeout" and out.unknown_items == 1
    assert [it.item_id for it in out.items] == popular[5:9]
    assert out.items == rec.recommend([], 4, exclude=history + exclude).items
    wanted = _category(version, 1)
    filtered = rec.recommend_popular(history, 3, exclude, {"category": [wanted]})
    assert filtered.served_by == "popularity"
    assert [it.item_id for it in filtered.items] == [i for i in popular[5:] if
                                                     _category(version, version.id_to_index[i]) == wanted][:3]


def test_stage_failure_falls_back_to_previous_order(artifacts_root: Path, catalog: list[str],  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recommender(load_current(artifacts_root), retrieval_k=50, prerank_n=10)
    history = catalog[:4]

    def boom(*args: object) -> None:
        raise ValueError("stage down")

    pre = rec.recommend(history, k=10)
    monkeypatch.setattr(rec, "_rerank", boom)
    out = rec.recommend(history, k=10)
    assert out.served_by == "prerank;rerank_failed"
    assert {i.item_id for i in out.items} == {i.item_id for i in pre.items}  # same top 10, pre-rank order
    assert [i.score for i in out.items] == sorted((i.score for i in out.items), reverse=True)
    monkeypatch.setattr(rec, "_prerank", boom)
    out = rec.recommend(history, k=10)
    assert out.served_by == "retrieval;prerank_failed" and len(out.items) == 10
    assert [i.stages["retrieval"] for i in out.items] == [i.score for i in out.items]
    monkeypatch.setattr(rec, "_retrieve", boom)
    out = rec.recommend(history, k=10)
    assert out.served_by == "popularity;retrieval_failed" and not {i.item_id for i in out.items} & set(history)


def test_a_spent_timeout_serves_the_previous_stage(version: LoadedVersion, catalog: list[str],  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recommender(version, retrieval_k=50, prerank_n=10)
    full = rec.recommend(catalog[:4], k=10, explain=True)
    out = rec.recommend(catalog[:4], k=10, explain=True, timeout_ms=0.0)  # spent before pre-rank starts
    assert out.served_by == "retrieval;timeout" and "prerank" not in out.timings_ms
    assert [it.score for it in out.items] == sorted((it.score for it in out.items), reverse=True)
    # spent once pre-rank has run: the clock reads "over" from then on
    monkeypatch.setattr(_Timer, "elapsed_ms", lambda self: 1e6 if "prerank" in self.ms else 0.0)
    out = rec.recommend(catalog[:4], k=10, explain=True, timeout_ms=10.0)
    assert out.served_by == "prerank;timeout" and "rerank" not in out.timings_ms
    assert {it.item_id for it in out.items} == {it.item_id for it in full.items}  # full's top 10 are re-ranked
    assert all(set(it.stages) == {"retrieval", "prerank"} for it in out.items)


def test_everything_seen_or_excluded_is_an_empty_retrieval_list(version: LoadedVersion,
                                                                catalog: list[str]) -> None:  # noqa: F811
    out = Recommender(version).recommend(catalog[:40], k=10, exclude=catalog[40:])
    assert out.items == [] and out.served_by == "retrieval"


def test_pv_columns_sum_to_the_pre_rank_score(artifacts_root: Path) -> None:  # noqa: F811
    """The re-ranker's PV columns sum to the pre-rank score (its definition). The online user
    features are the training encoder itself (service/contract/features.py, tests/service/test_features.py)."""
    v = load_current(artifacts_root)
    rec = Recommender(v)
    cand = np.arange(1, 21)
    hist = np.array([1, 2, 3])
    users = v.retrieval.run(None, {"item_seq": hist[None]})[0][0]  # (M, D)
    ret_scores = (v.items[cand - 1] @ users.T).max(axis=1)  # fused retrieval score of each candidate
    merged = Merged.faiss_only(cand, ret_scores, np.zeros(cand.size, np.int64))
    order, scores, pv, feats = rec._prerank(hist, merged, users)
    assert feats is None  # a version without the pair features
    np.testing.assert_allclose(pv.sum(axis=1), scores, rtol=1e-5, atol=1e-5)
    assert scores[order].tolist() == sorted(scores.tolist(), reverse=True)
