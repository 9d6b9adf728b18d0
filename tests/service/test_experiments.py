"""Experiments (service/experiments.py): sticky seeded user hashing, configuration errors, and the
app serving an experiment of two versions (A/B and interleaved) with every arm's version loaded.
The same against a live `recsys serve` process: tests/e2e/test_experiment_serve.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.contract.layout import CURRENT, EXPERIMENT
from service.schemas import RecommendResponse
from service.experiments import Experiment, ExperimentConfig, ExperimentError, bucket, parse_config, read_config
from tests.service.test_api import API_KEY, _app, artifacts_root, catalog, copy_version  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
SHARES = {"a": 0.2, "b": 0.3, "c": 0.5}


def _ab(name: str = "exp1", seed: int = 0, shares: dict[str, float] = SHARES,
        versions: dict[str, str] | None = None) -> ExperimentConfig:
    versions = versions or {}
    return ExperimentConfig.model_validate({"name": name, "mode": "ab", "seed": seed, "arms": [
        {"name": n, "share": s, **({"version": versions[n]} if n in versions else {})} for n, s in shares.items()]})


def _within(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4.0 * math.sqrt(n * p * (1 - p))


def test_users_split_by_the_shares_sticky_and_seeded() -> None:
    users = [f"user-{i}" for i in range(10_000)]
    exp = Experiment(_ab())
    arms = [exp.arm_for(u).name for u in users]
    counts = Counter(arms)
    for name, share in SHARES.items():
        assert _within(counts[name], len(users), share), (name, counts)
    assert [exp.arm_for(u).name for u in users[:500]] == arms[:500]  # sticky: the same arm every time
    # another seed (or another experiment name) reshuffles: about 1 - sum(p^2) = 62% of users move
    moved = sum(a != b for a, b in zip(arms, (Experiment(_ab(seed=1)).arm_for(u).name for u in users)))
    assert _within(moved, len(users), 1 - sum(p * p for p in SHARES.values()))
    renamed = sum(a != b for a, b in zip(arms, (Experiment(_ab(name="exp2")).arm_for(u).name for u in users)))
    assert renamed > 0.5 * len(users)
    # a 0 share gets nobody; shares that are not round numbers still cover [0, 1)
    none = Experiment(_ab(shares={"a": 0.0, "b": 1.0}))
    assert {none.arm_for(u).name for u in users[:2000]} == {"b"}


def test_assignment_is_the_same_in_another_process() -> None:
    """hash() is salted per process; the arm must not be."""
    code = ("from service.experiments import bucket; "
            "print([bucket('exp1', 0, f'user-{i}') for i in range(20)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert json.loads(out.stdout) == [bucket("exp1", 0, f"user-{i}") for i in range(20)]


@pytest.mark.parametrize(("config", "loc", "words"), [
    ({"name": "e", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}, ("arms",), "sum to 0.9"),
    ({"name": "e", "arms": [{"name": "a", "share": 0.5}, {"name": "b"}]}, ("arms",), "arms.1.share is missing"),
    ({"name": "e", "arms": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]}, ("arms",),
     "arms.1.name 'a' repeats"),
    ({"name": "e", "mode": "interleave", "arms": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}, ("arms",),
     "exactly 2 arms"),
    ({"name": "e", "arms": [{"name": "a", "share": 1.0}]}, ("arms",), "at least 2"),
    ({"name": "e", "mode": "split", "arms": []}, ("mode",), "'ab' or 'interleave'"),
    ({"name": "e", "arms": [{"name": "a", "share": 1.5}, {"name": "b", "share": -0.5}]}, ("arms", 0, "share"),
     "less than or equal to 1"),
    ({"name": "e", "arms": [{"name": "a", "share": 0.5, "version": "../v1"}, {"name": "b", "share": 0.5}]},
     ("arms", 0, "version"), "pattern"),
    ({"name": "e", "arms": [{"name": "a", "share": 0.5, "weight": 2}, {"name": "b", "share": 0.5}]},
     ("arms", 0, "weight"), "Extra inputs"),
    ({"name": "e f", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]}, ("name",), "pattern"),
])
def test_config_errors_name_the_field(config: dict, loc: tuple, words: str) -> None:
    with pytest.raises(ExperimentError) as err:
        parse_config(config)
    assert err.value.loc == loc and words in err.value.message


def test_read_config_names_the_file(tmp_path: Path) -> None:
    assert read_config(tmp_path) is None
    (tmp_path / EXPERIMENT).write_text("{not json")
    with pytest.raises(ExperimentError, match="EXPERIMENT.json: not JSON"):
        read_config(tmp_path)
    (tmp_path / EXPERIMENT).write_text(json.dumps({"name": "e", "arms": []}))
    with pytest.raises(ExperimentError, match="EXPERIMENT.json: .*at least 2") as err:
        read_config(tmp_path)
    assert err.value.loc == ("arms",)


# --- the app serving an experiment -----------------------------------------------------------

@pytest.fixture()
def root(artifacts_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    """v1 (CURRENT) and v2, v3: copies of it under other names (what matters here is which version
    answers, not the models)."""
    root = tmp_path / "artifacts"
    root.mkdir()
    shutil.copytree(artifacts_root / "v1", root / "v1")
    (root / CURRENT).write_text("v1\n")
    copy_version(root, root / "v1", "v2")
    copy_version(root, root / "v1", "v3")
    return root


@pytest.fixture()
def client(root: Path) -> Iterator[TestClient]:
    with TestClient(_app(root, api_key=API_KEY, reload_poll_s=0.1)) as c:
        yield c


AUTH = {"X-API-Key": API_KEY}
AB = {"name": "exp1", "mode": "ab", "seed": 3,
      "arms": [{"name": "control", "share": 0.5}, {"name": "candidate", "version": "v2", "share": 0.5}]}


def _metric(c: TestClient, name: str) -> dict[str, float]:
    out = {}
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _renders_as_the_model(out: dict) -> None:
    """The fast encoding is the response model's own rendering, keys in the model's order."""
    model = RecommendResponse.model_validate(out).model_dump(mode="json", exclude_none=True)
    assert json.dumps(model) == json.dumps(out)


def _wait(cond: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_ab_experiment_serves_each_user_from_their_arm(client: TestClient, root: Path, catalog: list[str]) -> None:  # noqa: F811
    assert client.put("/v1/admin/experiment", json=AB).status_code == 401  # the write key guards it
    r = client.put("/v1/admin/experiment", json=AB, headers=AUTH)
    assert r.status_code == 200, r.text
    assert {a["name"]: a["version"] for a in r.json()["arms"]} == {"control": "v1", "candidate": "v2"}
    assert json.loads((root / EXPERIMENT).read_text())["name"] == "exp1"  # the other workers' source
    # both versions held by this worker, and their files counted
    assert _metric(client, "recsys_versions_loaded") == {"recsys_versions_loaded": 2.0}
    sizes = _metric(client, "recsys_version_file_bytes")
    assert set(sizes) == {'recsys_version_file_bytes{version="v1"}', 'recsys_version_file_bytes{version="v2"}'}
    assert min(sizes.values()) > 0
    assert _metric(client, "recsys_process_memory_bytes")['recsys_process_memory_bytes{kind="rss"}'] > 1e6

    exp = Experiment(ExperimentConfig.model_validate(AB))
    seen = Counter()
    for i in range(40):
        user = f"user-{i}"
        out = client.post("/v1/recommend", json={"user_id": user, "history": catalog[i:i + 4], "k": 5}).json()
        arm = exp.arm_for(user)
        assert (out["experiment"], out["arm"]) == ("exp1", arm.name)
        assert out["model_version"] == {"control": "v1", "candidate": "v2"}[arm.name]
        assert "score" in out["items"][0] and "source" not in out["items"][0]
        _renders_as_the_model(out)
        seen[arm.name] += 1
    assert min(seen.values()) >= 8  # both arms served
    # a request without user_id is outside the experiment: the live version, no arm
    anon = client.post("/v1/recommend", json={"history": catalog[:4], "k": 5}).json()
    assert anon["model_version"] == "v1" and "experiment" not in anon and "arm" not in anon
    # batches go through the same arms
    batch = client.post("/v1/recommend/batch", json={"requests": [
        {"user_id": f"user-{i}", "history": catalog[:3], "k": 3} for i in range(6)]}).json()["results"]
    assert [b["arm"] for b in batch] == [exp.arm_for(f"user-{i}").name for i in range(6)]
    arms = _metric(client, "recsys_experiment_requests_total")
    assert sum(arms.values()) == 46 and len(arms) == 2


def test_default_arm_follows_current_and_a_pinned_arm_lives_while_its_version_exists(
        client: TestClient, root: Path, catalog: list[str]) -> None:  # noqa: F811
    assert client.put("/v1/admin/experiment", json=AB, headers=AUTH).status_code == 200
    exp = Experiment(ExperimentConfig.model_validate(AB))
    users = {exp.arm_for(f"user-{i}").name: f"user-{i}" for i in range(20)}

    def version_of(user: str) -> str:
        return client.post("/v1/recommend", json={"user_id": user, "history": catalog[:4], "k": 3}).json()[
            "model_version"]

    (root / CURRENT).write_text("v3\n")  # a publish (or rollback) of the default arm
    _wait(lambda: version_of(users["control"]) == "v3")
    assert version_of(users["candidate"]) == "v2"
    shutil.rmtree(root / "v2")  # the pinned version is gone: the experiment ends, the live version serves
    _wait(lambda: client.get("/v1/admin/experiment").json() == {"experiment": None})
    out = client.post("/v1/recommend", json={"user_id": users["candidate"], "history": catalog[:4], "k": 3}).json()
    assert out["model_version"] == "v3" and "arm" not in out


def test_interleaved_experiment_merges_both_arms_and_marks_each_item(client: TestClient, catalog: list[str]) -> None:  # noqa: F811
    body = {"name": "il", "mode": "interleave", "seed": 0,
            "arms": [{"name": "old"}, {"name": "new", "version": "v2"}]}
    assert client.put("/v1/admin/experiment", json=body, headers=AUTH).status_code == 200
    plain = client.post("/v1/recommend", json={"history": catalog[:5], "k": 10}).json()
    sources = Counter()
    for i in range(10):
        out = client.post("/v1/recommend", json={"user_id": f"u{i}", "history": catalog[:5], "k": 10},
                          headers={"X-Request-ID": f"req-{i}"}).json()
        assert (out["experiment"], out["arm"], out["model_version"]) == ("il", "old+new", "v1+v2")
        # v2 is a copy of v1: team draft of two equal lists is that list, half of it from each team
        assert [it["item_id"] for it in out["items"]] == [it["item_id"] for it in plain["items"]]
        per = Counter(it["source"] for it in out["items"])
        assert per["old"] == per["new"] == 5
        assert all("score" not in it for it in out["items"])
        _renders_as_the_model(out)
        again = client.post("/v1/recommend", json={"user_id": f"u{i}", "history": catalog[:5], "k": 10},
                            headers={"X-Request-ID": f"req-{i}"}).json()
        assert [it["source"] for it in again["items"]] == [it["source"] for it in out["items"]]  # seeded per request
        sources[out["items"][0]["source"]] += 1
    assert len(sources) == 2  # the first pick is a coin flip across requests
    assert client.delete("/v1/admin/experiment", headers=AUTH).json() == {"experiment": None}
    out = client.post("/v1/recommend", json={"user_id": "u1", "history": catalog[:5], "k": 10}).json()
    assert "experiment" not in out and out["model_version"] == "v1"


def test_bad_experiments_are_422_naming_the_field_and_change_nothing(client: TestClient, root: Path) -> None:
    missing = {**AB, "arms": [AB["arms"][0], {**AB["arms"][1], "version": "v9"}]}
    r = client.put("/v1/admin/experiment", json=missing, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "arms", 1, "version"]
    assert "no published version 'v9'" in r.json()["detail"][0]["msg"]
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{}")
    broken = {**AB, "arms": [AB["arms"][0], {**AB["arms"][1], "version": "broken"}]}
    r = client.put("/v1/admin/experiment", json=broken, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "arms", 1, "version"]
    assert "does not load" in r.json()["detail"][0]["msg"]
    r = client.put("/v1/admin/experiment", json={**AB, "arms": [{**a, "share": 0.4} for a in AB["arms"]]},
                   headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "arms"]
    assert "sum to 0.8" in r.json()["detail"][0]["msg"]
    assert client.get("/v1/admin/experiment").json() == {"experiment": None}
    assert not (root / EXPERIMENT).exists()


def test_experiment_file_is_read_at_start_and_followed(root: Path, catalog: list[str]) -> None:  # noqa: F811
    (root / EXPERIMENT).write_text(json.dumps(AB))
    with TestClient(_app(root, api_key=API_KEY, reload_poll_s=0.1)) as c:
        assert c.get("/v1/admin/experiment").json()["experiment"] == "exp1"
        (root / EXPERIMENT).write_text(json.dumps({**AB, "name": "exp2"}))  # another worker's PUT
        _wait(lambda: c.get("/v1/admin/experiment").json()["experiment"] == "exp2")
        (root / EXPERIMENT).write_text("{oops")  # a bad file keeps the running experiment
        time.sleep(0.4)
        assert c.get("/v1/admin/experiment").json()["experiment"] == "exp2"
        (root / EXPERIMENT).unlink()
        _wait(lambda: c.get("/v1/admin/experiment").json() == {"experiment": None})


def test_clicks_are_credited_to_the_arm_in_the_experiments_online_metrics(root: Path, tmp_path: Path,
                                                                          catalog: list[str]) -> None:  # noqa: F811
    """Through the impression and event logs (RECSYS_LOG_DIR): an A/B experiment's impressions are
    grouped by arm, and a click on an interleaved list is credited to the arm that contributed the
    clicked item (GET /v1/experiments/{name})."""
    with TestClient(_app(root, api_key=API_KEY, log_dir=tmp_path / "log")) as c:
        assert c.get("/v1/experiments/il").status_code == 404
        body = {"name": "il", "mode": "interleave", "arms": [{"name": "old"}, {"name": "new", "version": "v2"}]}
        assert c.put("/v1/admin/experiment", json=body, headers=AUTH).status_code == 200
        clicks = {"old": 0, "new": 0}
        events = []
        for i in range(6):
            out = c.post("/v1/recommend", json={"user_id": f"u{i}", "history": catalog[:5], "k": 6}).json()
            # user i clicks the first item the arm "new" contributed (i even) or "old" (i odd)
            want = "new" if i % 2 == 0 else "old"
            item = next(it["item_id"] for it in out["items"] if it["source"] == want)
            events.append({"user_id": f"u{i}", "item_id": item, "request_id": out["request_id"], "event_id": f"e{i}"})
            clicks[want] += 1
        assert c.post("/v1/events", json=events, headers=AUTH).status_code in (200, 202)
        res = c.get("/v1/experiments/il").json()
        assert res["running"] and [a["name"] for a in res["arms"]] == ["old", "new"]
        inter = res["online"]["interleaving"]["il"]["sources"]
        assert {s: inter[s]["clicks"] for s in ("old", "new")} == clicks
        assert {s: inter[s]["wins"] for s in ("old", "new")} == clicks  # one click per list: it decides the list
        assert res["online"]["groups"][0]["arm"] == "old+new" and res["online"]["groups"][0]["impressions"] == 6
