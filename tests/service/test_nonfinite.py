"""No non-finite number is ever served (issue 23, finding 1): a version with NaN / inf in any
float it ships is refused at load naming the file and the first bad row or field
(service/artifacts.py, service/index.py), and a stage whose scores come out non-finite at
request time falls back to the previous stage, flagged, with a 200 (service/pipeline.py).

On main each of these versions loaded: the NaN prior weight answered 500 to every request with a
history, NaN pre-rank rows answered 500 from k = 200 on, NaN index vectors were never recommended.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.artifacts import ArtifactError, load_current, load_version
from service.contract.layout import CATALOG, INDEX_FAISS, ITEMS_NPY, MANIFEST, PRERANK_ITEMS, RERANK_ITEMS
from service.core.config import Settings
from service.main import create_app
from service.pipeline import Recommender
from service.smoke import load_checked
from tests.service.test_api import artifacts_root, catalog, copy_version  # noqa: F401  (module fixtures)
from training.publish.versions import set_current


@pytest.fixture()
def root(artifacts_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    r = tmp_path / "artifacts"
    r.mkdir()
    copy_version(r, artifacts_root / "v1", "v1")
    set_current(r, "v1")
    return r


def _nan_rows(name: str) -> Callable[[Path], str]:
    """Rows past the middle of `name` set to NaN; returns the first bad row."""
    def edit(folder: Path) -> str:
        arr = np.load(folder / name)
        first = arr.shape[0] // 2 + 1
        arr[first:] = np.nan
        np.save(folder / name, arr)
        return f"{name} holds a non-finite value (NaN or inf) in row {first}"
    return edit


def _nan_index(folder: Path) -> str:
    """Half the index's vectors NaN (the items.npy it was built from left intact)."""
    items = np.load(folder / ITEMS_NPY)
    half = items.shape[0] // 2
    items[half:] = np.nan
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    faiss.write_index(index, str(folder / INDEX_FAISS))
    return f"{INDEX_FAISS} holds a non-finite vector (NaN or inf) at row {half}"


def _manifest_prior(value: float) -> Callable[[Path], str]:
    def edit(folder: Path) -> str:
        m = json.loads((folder / MANIFEST).read_text())
        m["prerank"]["serving"]["retrieval_prior"] = {"tower_weight": 1.0, "weight": value, "launcher_bias": [0.0]}
        (folder / MANIFEST).write_text(json.dumps(m))  # json writes NaN / Infinity, and json.loads reads them
        return f"{MANIFEST}: prerank.serving.retrieval_prior.weight = {value} is not a finite number"
    return edit


def _catalog_numeric(folder: Path) -> str:
    with np.load(folder / CATALOG) as z:
        arrays = {k: z[k] for k in z.files}
    name = next(k for k in arrays if k.startswith("num:"))
    arrays[name] = arrays[name].copy()
    arrays[name][7] = np.inf
    np.savez(folder / CATALOG, **arrays)
    return f"{CATALOG} {name} holds a non-finite value (NaN or inf) in row 7"


EDITS: dict[str, Callable[[Path], str]] = {
    "prior_weight_nan": _manifest_prior(math.nan),
    "prior_weight_inf": _manifest_prior(math.inf),
    "prerank_items_nan": _nan_rows(PRERANK_ITEMS),
    "items_nan": _nan_rows(ITEMS_NPY),
    "rerank_items_nan": _nan_rows(RERANK_ITEMS),
    "index_half_nan": _nan_index,
    "catalog_numeric_inf": _catalog_numeric,
}


@pytest.mark.parametrize("name", list(EDITS))
def test_a_version_with_any_non_finite_value_is_refused_naming_file_and_row(root: Path, name: str) -> None:
    copy_version(root, root / "v1", name)
    expected = EDITS[name](root / name)
    with pytest.raises(ArtifactError) as info:
        load_checked(root / name)
    assert expected in str(info.value), str(info.value)
    with pytest.raises(ArtifactError):  # refused by the loader itself, before any request runs
        load_version(root / name)


def test_the_good_version_still_loads(root: Path) -> None:
    assert load_checked(root / "v1").model_version == "v1"


def _break_prerank(rec: Recommender) -> None:
    """A NaN in the pre-rank scores that the load-time checks cannot see (a model's output on
    some input): the prior weight of a Recommender built over a good version."""
    rec._has_prior, rec._prior_weight = True, math.nan


def test_non_finite_stage_scores_fall_back_to_the_previous_stage(root: Path, catalog: list[str]) -> None:  # noqa: F811
    rec = Recommender(load_current(root), retrieval_k=50, prerank_n=10)
    _break_prerank(rec)
    out = rec.recommend(catalog[:4], k=50, explain=True)
    assert out.served_by == "retrieval;prerank_nonfinite"
    assert len(out.items) == 50 and all(math.isfinite(it.score) for it in out.items)
    assert [it.score for it in out.items] == [it.stages["retrieval"] for it in out.items]


def test_non_finite_scores_answer_200_flagged_over_http(root: Path, catalog: list[str]) -> None:  # noqa: F811
    with TestClient(create_app(Settings(artifacts=root, reload_poll_s=0))) as c:
        _break_prerank(c.app.state.recommender)  # type: ignore[attr-defined]
        for k in (10, 200):
            r = c.post("/v1/recommend", json={"history": catalog[:4], "k": k, "explain": True})
            assert r.status_code == 200, r.text[:300]
            assert r.json()["served_by"] == "retrieval;prerank_nonfinite"
        metrics = c.get("/metrics").text
        assert 'recsys_fallbacks_total{reason="prerank_nonfinite"} 2.0' in metrics
