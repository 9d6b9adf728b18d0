"""The typed manifest (service/contract/manifest.py) against a manifest.json published before it
existed (fixtures/manifest_v1.json: ml-100k, `recsys demo` at 5fbe408, machine paths scrubbed)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from service.contract.blocks import Block
from service.contract.layout import MANIFEST, ContractError
from service.contract.manifest import Manifest

FIXTURE = Path(__file__).parent / "fixtures" / "manifest_v1.json"


@pytest.fixture()
def raw() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def test_the_fixture_parses_into_the_values_it_holds(raw: dict[str, Any]) -> None:
    m = Manifest.from_dict(raw)
    assert (m.format, m.version, m.created_at, m.item_count) == (1, "v1", raw["created_at"], 1682)
    assert m.data.fingerprint == "e3980cdf579ff39c" and m.data.spec == "movielens:data/ml-100k"
    assert m.data.num_users == 943 and m.data.num_interactions == 100000
    assert (m.dims.retrieval_dim, m.dims.num_launchers, m.dims.maxlen) == (64, 2, 50)
    assert m.dims.prerank_item_heads == [8, 16] and m.dims.prerank_user_heads == [3, 8, 16]
    assert m.dims.rerank_item_dim == 81
    assert m.files.name("items") == "items.npy" and m.files.retrieval_onnx_data == "retrieval.onnx.data"
    assert m.files.rerank_onnx == "rerank.onnx" and m.files.item2item is None and not m.files.has("item2item")
    assert m.catalog is not None and m.catalog.max_popularity == 575 and m.catalog.base is None
    assert m.retrieval.model == "MultiLauncherSASRec" and m.retrieval.metrics["NDCG@10"] == raw["retrieval"]["metrics"]["NDCG@10"]
    assert m.index.kind == "flat" and m.index.ntotal == 1682 and m.index.recall_k == "recall@100"
    assert m.index.recall == m.index.recall_at_k == 1.0 and m.index.min_recall == 0.9 and m.index.queries == 1886
    assert m.index.search_settings() == {"ntotal": 1682, "dim": 64, "factory": "Flat", "search_params": "",
                                         "kind": "flat"}
    prior = m.prerank.serving.retrieval_prior if m.prerank.serving else None
    assert prior is not None and prior.weight == raw["prerank"]["serving"]["retrieval_prior"]["weight"]
    assert prior.tower_weight == raw["prerank"]["serving"]["retrieval_prior"]["tower_weight"]
    assert len(prior.launcher_bias) == 2 and m.prerank.objective == "next-item"
    assert m.has_rerank and m.rerank is not None
    assert (m.rerank.max_len, m.rerank.num_scores) == (30, 2)
    assert m.rerank.serving is not None
    assert list(m.rerank.serving.pv.mean) == raw["rerank"]["serving"]["pv_mean"] and len(m.rerank.serving.pv.std) == 24
    assert m.rerank.serving.list_len == 30 and m.rerank.serving.num_scores == 2
    assert m.item2item is None
    assert m.served_stages() == ("retrieval", "prerank", "rerank")
    assert m.serving is not None and m.serving.split == "valid" and m.serving.users == 943
    assert m.serving.served_metric("NDCG@10") == raw["serving"]["cuts"]["rerank"]["NDCG@10"]
    assert m.checks is not None and m.checks.min_recall == 0.9
    assert m.checks.regression.result == "skipped: no live version" and m.checks.regression.live_version is None


def test_to_dict_round_trips_the_fixture_byte_for_byte(raw: dict[str, Any], tmp_path: Path) -> None:
    m = Manifest.from_dict(raw)
    assert m.to_dict() == raw and list(m.to_dict()) == list(raw)
    m.write(tmp_path / MANIFEST)
    assert (tmp_path / MANIFEST).read_bytes() == FIXTURE.read_bytes()


def _fresh(block: Any) -> Any:
    """The block as training builds it: no remembered key order, anywhere."""
    if not isinstance(block, Block):
        return block
    changes = {f.name: _fresh(getattr(block, f.name)) for f in dataclasses.fields(block) if f.name != "keys"}
    return dataclasses.replace(block, **changes, keys=None)


def test_a_built_manifest_writes_the_keys_in_the_exporters_order(raw: dict[str, Any]) -> None:
    # key order is part of "the same JSON": a built manifest must not depend on one read back
    built = _fresh(Manifest.from_dict(raw))
    assert built.keys is None and built.rerank.keys is None
    assert json.dumps(built.to_dict(), indent=2) == json.dumps(raw, indent=2)


def test_unknown_keys_load_and_write_back(raw: dict[str, Any]) -> None:
    raw = copy.deepcopy(raw)
    raw["from_the_future"] = {"a": [1, 2]}
    raw["dims"]["new_dim"] = 7
    raw["files"]["new_file"] = "new.bin"
    raw["rerank"]["serving"]["new_stat"] = [0.5]
    raw["index"] = {"extra_first": True, **raw["index"]}
    m = Manifest.from_dict(raw)
    assert m.extra == {"from_the_future": {"a": [1, 2]}} and m.dims.extra == {"new_dim": 7}
    assert json.dumps(m.to_dict()) == json.dumps(raw)


def test_an_older_manifest_without_optional_blocks_loads_and_writes_back(raw: dict[str, Any]) -> None:
    for key in ("serving", "checks", "catalog"):
        del raw[key]
    raw["rerank"] = None
    for key in ("rerank_onnx", "rerank_items", "retrieval_onnx_data"):
        del raw["files"][key]
    del raw["prerank"]["serving"]
    m = Manifest.from_dict(raw)
    assert m.serving is None and m.served_stages() is None and not m.has_rerank and m.prerank.serving is None
    assert json.dumps(m.to_dict()) == json.dumps(raw)


def _set(path: str, value: Any) -> Any:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


_DELETE = object()


@pytest.mark.parametrize(("edit", "message"), [
    (_set("index", _DELETE), "missing keys ['index']"),
    (_set("format", 2), "format 2 is not one of (1,)"),
    (_set("version", 3), "version must be a JSON string, got 3"),
    (_set("dims", None), "dims must be a JSON object, got None"),
    (_set("item_count", True), "item_count must be an integer >= 1, got True"),
    (_set("item_count", 0), "item_count must be an integer >= 1, got 0"),
    (_set("files.items", _DELETE), "files.items is missing"),
    (_set("files.rerank_items", _DELETE), "files.rerank_items is missing"),
    (_set("files.catalog", "../catalog.npz"), "files.catalog = '../catalog.npz' is not a file name inside the version folder"),
    (_set("files.items", None), "files.items = None is not a file name"),
    (_set("serving.stages", ["retrieval", "rerank"]), "serving.stages must be a non-empty prefix of ['retrieval', "
                                                      "'prerank', 'rerank'], got ['retrieval', 'rerank']"),
    (_set("serving", []), "serving must be an object, got list"),
    (_set("dims.prerank_item_heads", [8]), "dims.prerank_item_heads must be [G, d], got [8]"),
    (_set("dims.maxlen", "50"), "dims.maxlen must be an integer >= 1, got '50'"),
    (_set("rerank.config.max_len", _DELETE), "rerank.config.max_len is missing"),
    (_set("rerank.serving.pv_mean", None), "rerank.serving.pv_mean must be a list of numbers, got None"),
    (_set("prerank.serving.retrieval_prior.weight", _DELETE), "prerank.serving.retrieval_prior.weight is missing"),
    (_set("item2item", [1]), "item2item must be a JSON object"),
])
def test_a_bad_manifest_is_refused_naming_the_field(raw: dict[str, Any], edit: Any, message: str) -> None:
    edit(raw)
    with pytest.raises(ContractError) as exc:
        Manifest.from_dict(raw, "v1/manifest.json")
    assert str(exc.value).startswith("v1/manifest.json: ") and message in str(exc.value)


def test_serving_rerank_needs_a_reranker(raw: dict[str, Any]) -> None:
    raw["rerank"] = None
    with pytest.raises(ContractError, match="serving.stages names rerank but the version has no re-ranker"):
        Manifest.from_dict(raw)


def test_load_checks_the_file_and_the_folder(raw: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "v1"
    folder.mkdir()
    with pytest.raises(ContractError, match=f"{folder}: manifest.json is missing"):
        Manifest.load(folder / MANIFEST)
    (folder / MANIFEST).write_text("{")
    with pytest.raises(ContractError, match="manifest.json: not valid JSON"):
        Manifest.load(folder / MANIFEST)
    (folder / MANIFEST).write_bytes(b"\xff\xfe")
    with pytest.raises(ContractError, match="manifest.json: not UTF-8 text"):
        Manifest.load(folder / MANIFEST)
    (folder / MANIFEST).write_text(json.dumps(raw))
    assert Manifest.load(folder / MANIFEST).version == "v1"
    other = tmp_path / "v9"
    folder.rename(other)
    with pytest.raises(ContractError, match="version 'v1' does not match the folder 'v9'"):
        Manifest.load(other / MANIFEST)
    building = tmp_path / ".tmp-v1"  # a publish checks its temp folder before the rename
    other.rename(building)
    assert Manifest.load(building / MANIFEST).version == "v1"


def _with_pair_features(raw: dict[str, Any]) -> dict[str, Any]:
    """The fixture as a version with the pair features: the prior, its file and the re-ranker reading them."""
    from service.contract.rerank_inputs import PAIR_FEATS_DOC
    from tests.service.test_pair_features import prior_block

    raw["prerank"]["serving"]["pair_prior"] = prior_block()
    raw["files"]["pair_items"] = "pair_items.npy"
    raw["rerank"]["serving"]["pair_features"] = True
    raw["rerank"]["serving"]["item_feats"] += PAIR_FEATS_DOC  # as the writer documents them
    return raw


def test_a_manifest_with_pair_features_round_trips(raw: dict[str, Any]) -> None:
    raw = _with_pair_features(raw)
    m = Manifest.from_dict(json.loads(json.dumps(raw)))
    assert m.to_dict() == raw and list(m.to_dict()) == list(raw)
    assert m.prerank.serving is not None and m.prerank.serving.pair_prior is not None
    assert m.prerank.serving.pair_prior.launcher_bias == [0.0, 0.25]
    assert m.files.pair_items == "pair_items.npy" and m.rerank is not None and m.rerank.serving is not None
    assert m.rerank.serving.pair_features
    assert not Manifest.from_dict(json.loads(FIXTURE.read_text())).rerank.serving.pair_features  # type: ignore[union-attr]


@pytest.mark.parametrize(("edit", "message"), [
    (_set("files.pair_items", _DELETE), "prerank.serving.pair_prior needs files.pair_items"),
    (_set("prerank.serving.pair_prior.features", ["retrieval"]), "prerank.serving.pair_prior.features must be"),
    (_set("prerank.serving.pair_prior.std", [1.0]), "prerank.serving.pair_prior.std must be a list of 12 numbers"),
])
def test_a_bad_pair_prior_is_refused_naming_the_field(raw: dict[str, Any], edit: Any, message: str) -> None:
    raw = _with_pair_features(raw)
    edit(raw)
    with pytest.raises(ContractError, match=message):
        Manifest.from_dict(raw, "v1/manifest.json")
