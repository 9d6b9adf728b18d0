"""Issue 14's lighter request path: the pre-serialised recommend answer is the JSON the response
models describe, memory-mapped versions serve what eagerly loaded ones do, and the index factory
string recorded in the manifest is checked (and its search parameters applied) on load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import faiss
import jsonschema
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.artifacts import ArtifactError, load_current, load_version
from service.index import factory_string, load_index, save_index
from service.index_build import IndexSpec, build_index
from service.pipeline import Recommender
from service.schemas import RecommendBatchResponse, RecommendResponse, encode_json
from tests.service.test_api import _app, artifacts_root, catalog  # noqa: F401  (module fixtures)
from service.contract.layout import INDEX_FAISS, MANIFEST


@pytest.fixture(scope="module")
def client(artifacts_root: Path) -> Any:  # noqa: F811
    with TestClient(_app(artifacts_root)) as c:
        yield c


def _validator(c: TestClient, name: str) -> jsonschema.Draft202012Validator:
    """The OpenAPI document's schema `name`, with its components for the $refs."""
    doc = c.get("/openapi.json").json()
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


BODIES: list[dict[str, Any]] = [
    {"history": None, "k": 5},  # history filled in below
    {"history": None, "k": 7, "explain": True},
    {"k": 3},  # popularity
    {"history": None, "k": 4, "exclude": None},
]


def _bodies(catalog: list[str]) -> list[dict[str, Any]]:  # noqa: F811
    out = []
    for b in BODIES:
        b = dict(b)
        if "history" in b:
            b["history"] = catalog[:6]
        if "exclude" in b:
            b["exclude"] = catalog[6:9]
        out.append(b)
    return out


def test_recommend_bytes_are_what_the_response_model_renders(client: TestClient, catalog: list[str]) -> None:  # noqa: F811
    validate = _validator(client, "RecommendResponse")
    served = set()
    for body in _bodies(catalog):
        r = client.post("/v1/recommend", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        out = r.json()
        validate.validate(out)
        # the pydantic model's own rendering of the same content, as FastAPI would have sent it
        assert encode_json(RecommendResponse.model_validate(out).model_dump(mode="json", exclude_none=True)) == r.content
        # experiment / arm only during an experiment (tests/service/test_experiments.py)
        assert list(out) == [f for f in RecommendResponse.model_fields if f not in ("experiment", "arm")]
        # absent fields are left out, never null (issue 24): stages / routes only with explain,
        # launcher only for a model-found item; score on every item these lists have
        fields = [*(["item_id", "score", "rank"]), *(["launcher"] if out["scored_by"] != "popularity" else []),
                  *(["stages", "routes"] if body.get("explain") else [])]
        assert all(list(it) == fields for it in out["items"]), (body, out)
        assert "null" not in r.text
        assert [it["rank"] for it in out["items"]] == list(range(1, len(out["items"]) + 1))
        served.add(out["served_by"])
    assert "popularity" in served and len(served) > 1


def test_batch_bytes_are_what_the_response_model_renders(client: TestClient, catalog: list[str]) -> None:  # noqa: F811
    r = client.post("/v1/recommend/batch", json={"requests": _bodies(catalog)})
    assert r.status_code == 200, r.text
    out = r.json()
    _validator(client, "RecommendBatchResponse").validate(out)
    assert encode_json(RecommendBatchResponse.model_validate(out).model_dump(mode="json", exclude_none=True)) == r.content
    singles = [client.post("/v1/recommend", json=b).json() for b in _bodies(catalog)]
    rid = r.headers["x-request-id"]
    assert [o["request_id"] for o in out["results"]] == [f"{rid}-{i}" for i in range(len(singles))]
    per_request = ("timings_ms", "request_id")
    strip = [{k: v for k, v in o.items() if k not in per_request} for o in out["results"]]
    assert strip == [{k: v for k, v in o.items() if k not in per_request} for o in singles]


def test_the_openapi_schema_still_names_the_response_models(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, name in (("/v1/recommend", "RecommendResponse"), ("/v1/recommend/batch", "RecommendBatchResponse")):
        schema = paths[path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{name}"}


def _mapped(arr: np.ndarray) -> bool:
    """Whether `arr` is a view of a memory map (np.load(mmap_mode) / np.memmap)."""
    base = arr
    while base is not None:
        if isinstance(base, np.memmap) or type(base).__name__ == "mmap":
            return True
        base = getattr(base, "base", None)
    return False


def test_mmap_loaded_version_serves_what_the_eager_one_does(artifacts_root: Path, catalog: list[str]) -> None:  # noqa: F811
    mapped, eager = load_current(artifacts_root), load_current(artifacts_root, mmap=False)
    for name in ("items", "prerank_items", "rerank_items"):
        assert _mapped(getattr(mapped, name)) and not _mapped(getattr(eager, name)), name
        assert not getattr(mapped, name).flags.writeable
        np.testing.assert_array_equal(getattr(mapped, name), getattr(eager, name))
    columns = mapped.item_features.columns()
    assert columns.keys() == eager.item_features.columns().keys() and columns
    for key, arr in columns.items():
        assert _mapped(arr), key
        np.testing.assert_array_equal(arr, eager.item_features.columns()[key])
    np.testing.assert_array_equal(mapped.item_ids, eager.item_ids)
    np.testing.assert_array_equal(mapped.popularity, eager.popularity)
    assert mapped.item_features.vocab == eager.item_features.vocab and mapped.id_to_index == eager.id_to_index

    # the retrieval graph's weights (its item table) sit in a file ONNX Runtime maps
    data = artifacts_root / "v1" / mapped.manifest.to_dict()["files"]["retrieval_onnx_data"]
    assert data.stat().st_size >= mapped.items.nbytes

    a, b = Recommender(mapped), Recommender(eager)
    rng = np.random.default_rng(0)
    for _ in range(20):
        hist = [catalog[i] for i in rng.choice(len(catalog), size=int(rng.integers(0, 12)), replace=False)]
        ra, rb = a.recommend(hist, 10, explain=True), b.recommend(hist, 10, explain=True)
        assert ra.items == rb.items and ra.served_by == rb.served_by


def test_factory_string_is_recorded_and_checked_on_load(artifacts_root: Path, tmp_path: Path) -> None:  # noqa: F811
    index = load_current(artifacts_root).manifest.to_dict()["index"]
    assert index["factory"] in ("Flat", f"IVF{index.get('nlist')},Flat")

    folder = tmp_path / "v1"
    shutil.copytree(artifacts_root / "v1", folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["index"]["factory"] = "HNSW32,Flat"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="HNSW32,Flat"):
        load_version(folder)


def test_manifest_search_parameters_are_applied_on_load(tmp_path: Path) -> None:
    items = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    built = build_index(items, IndexSpec(kind="ivf", nlist=8, nprobe=2))
    save_index(built, tmp_path / INDEX_FAISS)
    assert factory_string(built) == "IVF8,Flat"
    for mmap in (False, True):
        index = load_index(tmp_path / INDEX_FAISS, None, mmap=mmap, expect={"factory": "IVF8,Flat", "nprobe": 5})
        assert isinstance(index, faiss.IndexIVF) and index.nprobe == 5
        q = items[:3]
        built.nprobe = 5
        np.testing.assert_array_equal(index.search(q, 10)[1], built.search(q, 10)[1])
    with pytest.raises(ValueError, match="the manifest says 'IVF16,Flat'"):
        load_index(tmp_path / INDEX_FAISS, None, expect={"factory": "IVF16,Flat"})
    with pytest.raises(ValueError, match="nprobe"):
        load_index(tmp_path / INDEX_FAISS, None, expect={"factory": "IVF8,Flat", "nprobe": 9})
    hnsw = build_index(items, IndexSpec(kind="hnsw", hnsw_m=8, ef_search=16))
    save_index(hnsw, tmp_path / "hnsw.faiss")
    loaded = load_index(tmp_path / "hnsw.faiss", None, mmap=True, expect={"factory": "HNSW8,Flat", "ef_search": 40})
    assert factory_string(loaded) == "HNSW8,Flat" and loaded.hnsw.efSearch == 40


def test_ivfpq_refine_factory_and_search_params_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    items = rng.standard_normal((2000, 16)).astype(np.float32)
    built = faiss.index_factory(16, "IVF8,PQ8x4fs,RFlat", faiss.METRIC_INNER_PRODUCT)
    built.train(items)
    built.add(items)
    faiss.ParameterSpace().set_index_parameters(built, "nprobe=3,k_factor_rf=2")
    save_index(built, tmp_path / "pq.faiss")
    assert factory_string(built) == "IVF8,PQ8x4fs,RFlat"
    loaded = load_index(tmp_path / "pq.faiss", None, mmap=True,
                        expect={"factory": "IVF8,PQ8x4fs,RFlat", "search_params": "nprobe=5,k_factor_rf=4"})
    from service.index import search_params

    assert search_params(loaded) == "nprobe=5,k_factor_rf=4"
    faiss.ParameterSpace().set_index_parameters(built, "nprobe=5,k_factor_rf=4")
    np.testing.assert_array_equal(loaded.search(items[:4], 10)[1], built.search(items[:4], 10)[1])
    with pytest.raises(ValueError, match="search_params"):
        load_index(tmp_path / "pq.faiss", None, expect={"search_params": "no_such_param=1"})


def test_the_fast_path_answers_what_the_route_answers_and_leaves_errors_to_it(
        client: TestClient, catalog: list[str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """service/fast_path.py: a valid body is answered without FastAPI, with the bytes the route
    gives (timings aside); a body the route refuses is refused by the route, unchanged."""
    from service import fast_path
    from service.api.deps import get_settings

    answered: list[bool] = []
    real = fast_path.RecommendFastPath._answer

    async def spy(self: Any, body: bytes, headers: dict[bytes, bytes]) -> Any:
        out = await real(self, body, headers)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(fast_path.RecommendFastPath, "_answer", spy)
    app: Any = client.app

    def strip(r: Any) -> dict[str, Any]:
        out = r.json()
        out.pop("timings_ms")
        assert out.pop("request_id") == r.headers["x-request-id"]
        return out

    for body in _bodies(catalog):
        fast = client.post("/v1/recommend", json=body)
        app.dependency_overrides[get_settings] = lambda: app.state.settings  # any override: FastAPI answers
        try:
            slow = client.post("/v1/recommend", json=body)
        finally:
            app.dependency_overrides.clear()
        assert fast.status_code == slow.status_code == 200 and strip(fast) == strip(slow)
    assert answered == [True] * len(BODIES)  # the overridden requests never reached the fast path

    answered.clear()
    bad = client.post("/v1/recommend", json={"history": catalog[:3], "k": 0})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "k"]
    text = client.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert text.status_code == 422
    unknown = client.post("/v1/recommend", json={"history": catalog[:3], "filters": {"nope": ["x"]}})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "filters", "nope"]
    assert answered == [False, False, False]
    odd = client.post("/v1/recommend", content=json.dumps({"history": catalog[:3]}),
                      headers={"content-type": "application/jsonx"})  # not JSON to FastAPI either
    assert odd.status_code == 422 and answered == [False, False, False]  # never reached the fast path


def test_a_repeated_read_key_header_is_judged_as_the_route_judges_it(artifacts_root: Path,  # noqa: F811
                                                                     catalog: list[str]) -> None:  # noqa: F811
    from service.api.deps import get_settings
    from tests.service.test_api import API_KEY, _app

    with TestClient(_app(artifacts_root, api_key=API_KEY, read_key="reader")) as c:
        app: Any = c.app
        for keys in (["wrong", "reader"], ["reader", "wrong"]):
            headers = [("X-API-Key", k) for k in keys]
            body = {"user_id": "someone", "k": 2}
            fast = c.post("/v1/recommend", json=body, headers=headers).status_code
            app.dependency_overrides[get_settings] = lambda: app.state.settings  # FastAPI answers
            try:
                slow = c.post("/v1/recommend", json=body, headers=headers).status_code
            finally:
                app.dependency_overrides.clear()
            assert fast == slow, (keys, fast, slow)
