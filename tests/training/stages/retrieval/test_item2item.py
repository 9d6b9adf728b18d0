"""The item-to-item route end to end: the table (training/stages/retrieval/item2item.py) on hand-made sequences,
its place in a published version, the request-time merge through the Recommender and the HTTP
API, `recsys reindex --events` rebuilding it, and a version without it still serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.artifacts import load_version, smoke_run
from service.core.config import Settings
from service.contract.layout import ITEM2ITEM as FILE
from service.main import create_app
from service.pipeline import Recommender
from tests.training.publish.test_build import BELOW_OK, BELOW_OK_FLAG, TINY, make_checkpoints, one_thread  # noqa: F401
from recsys_cli import main as cli
from training.publish.publisher import publish
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.stages.retrieval.item2item import Item2ItemConfig, Rows, build_table, dataset_rows, training_rows, with_events
from training.publish.versions import read_current


def test_table_on_hand_made_sequences() -> None:
    # users: [1 2 3 4], [1 2 4], [3 1]; window 2: pairs (i, j, 1/d)
    items = np.array([1, 2, 3, 4, 1, 2, 4, 3, 1])
    users = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    nb, sc = build_table(items, users, 5, Item2ItemConfig(neighbours=2, window=2, alpha=0.5))
    # counts: c(1,2) = 2, c(1,3) = .5, c(1,4) = .5, c(2,3) = 1, c(2,4) = .5 + 1, c(3,4) = 1, c(3,1) = 1
    # pop: 1 -> 3, 2 -> 2, 3 -> 2, 4 -> 2 (item 5 never seen); s = c / sqrt(pop_i * pop_j)
    assert nb.shape == sc.shape == (6, 2) and nb.dtype == np.int32 and sc.dtype == np.float32
    assert nb[1].tolist() == [2, 3]  # c(1,3) = c(1,4) and pop(3) = pop(4): the smaller id wins the tie
    assert sc[1].tolist() == pytest.approx([2 / np.sqrt(6), 0.5 / np.sqrt(6)])
    assert nb[2].tolist() == [4, 3] and sc[2].tolist() == pytest.approx([1.5 / 2, 1 / 2])
    assert nb[3].tolist() == [4, 1] and sc[3].tolist() == pytest.approx([1 / 2, 1 / np.sqrt(6)])
    assert nb[4].tolist() == [0, 0] and nb[0].tolist() == [0, 0] and nb[5].tolist() == [0, 0]  # no follower / padding
    # no pair crosses a user boundary: 4 (end of user 0) -> 1 (start of user 1) is not counted
    assert 1 not in nb[4]
    # alpha = 0: the row is ranked by raw counts and scaled by 1 / pop(i)
    nb0, sc0 = build_table(items, users, 5, Item2ItemConfig(neighbours=3, window=1, alpha=0.0))
    assert nb0[2].tolist() == [3, 4, 0] and sc0[2].tolist() == pytest.approx([0.5, 0.5, 0])


def test_event_weights_count_the_followers_event() -> None:
    # one user: 1 2 1 3 with the last event a purchase (weight 5); window 1, alpha 0: s = c / pop(i)
    items, users = np.array([1, 2, 1, 3]), np.zeros(4, np.int64)
    cfg = Item2ItemConfig(neighbours=2, window=1, alpha=0.0)
    nb, sc = build_table(items, users, 3, cfg)
    assert nb[1].tolist() == [2, 3] and sc[1].tolist() == pytest.approx([0.5, 0.5])  # a tie: the smaller id
    nb, sc = build_table(items, users, 3, cfg, weights=np.array([1.0, 1.0, 1.0, 5.0]))
    # c(1,3) = w(3) = 5, c(1,2) = 1; pop(1) = 2 (two weight-1 events)
    assert nb[1].tolist() == [3, 2] and sc[1].tolist() == pytest.approx([2.5, 0.5])
    with pytest.raises(ValueError, match="weights must be > 0"):
        build_table(items, users, 3, cfg, weights=np.array([1.0, 0.0, 1.0, 1.0]))


def test_events_follow_each_users_training_rows() -> None:
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    items, users = training_rows(ds, loo.train_mask)
    u0 = str(ds.user_ids[0])
    a, b = str(ds.item_ids[7]), str(ds.item_ids[9])
    events = _events_ds([(u0, a), (u0, b), ("someone-new", b), ("someone-new", "not-in-catalog")])
    index = {str(x): i for i, x in enumerate(ds.item_ids.tolist()) if i > 0}
    all_items, all_users, weights, used = with_events(dataset_rows(ds, loo.train_mask), ds.user_ids, events, index)
    assert weights is None  # neither side has event weights
    assert used == 3 and all_items.size == items.size + 3
    n0 = int(loo.train_lengths()[0])
    assert all_items[: n0 + 2].tolist() == [*ds.items[:n0].tolist(), 7, 9]  # user 0's events after their rows
    assert all_users[: n0 + 2].tolist() == [0] * (n0 + 2)
    assert all_items[-1] == 9 and all_users[-1] == ds.num_users  # the new user: a sequence of its own


def test_event_weights_of_new_events_are_kept() -> None:
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    u0, a = str(ds.user_ids[0]), str(ds.item_ids[7])
    events = _events_ds([(u0, a), ("someone-new", a)], weights=[4.0, 2.0])
    index = {str(x): i for i, x in enumerate(ds.item_ids.tolist()) if i > 0}
    rows = with_events(dataset_rows(ds, loo.train_mask), ds.user_ids, events, index)
    assert isinstance(rows, Rows) and rows.weights is not None and rows.events == 2
    n0 = int(loo.train_lengths()[0])
    assert rows.weights[: n0 + 1].tolist() == [1.0] * n0 + [4.0]  # the training rows count 1
    assert rows.weights[-1] == 2.0


def _events_ds(rows: list[tuple[str, str]], weights: list[float] | None = None):  # type: ignore[no-untyped-def]
    from training.data.dataset import build_dataset

    return build_dataset("events", [u for u, _ in rows], [i for _, i in rows], np.arange(len(rows)),
                         weight_col=None if weights is None else np.array(weights))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_checkpoints(TINY, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def root(ckpts: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    publish(TINY, *ckpts, root, version="v1", item2item=Item2ItemConfig(), gate=BELOW_OK)
    return root


def test_export_writes_the_table_of_the_training_part(root: Path) -> None:
    v = load_version(root / "v1")
    m = v.manifest.to_dict()
    assert m["files"]["item2item"] == FILE and (root / "v1" / FILE).is_file()
    e = m["item2item"]
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    cfg = Item2ItemConfig(e["neighbours"], e["window"], e["alpha"])
    assert e["interactions"] == int(loo.train_mask.sum()) and e["events"] == 0
    nb, sc = build_table(*training_rows(ds, loo.train_mask), ds.num_items, cfg)
    assert v.item2item is not None
    np.testing.assert_array_equal(v.item2item.neighbours, nb)
    np.testing.assert_array_equal(v.item2item.scores, sc)


def _with_table(src: Path, dst: Path, last: int, neighbour: int, serving: dict[str, float]) -> Path:
    """A copy of version `src` whose table gives item `last` the one neighbour `neighbour` and
    the history's other items none."""
    shutil.copytree(src, dst)
    with np.load(dst / FILE) as z:
        nb, sc = np.zeros_like(z["neighbours"]), np.zeros_like(z["scores"])
    nb[last, :2], sc[last, :2] = [neighbour, last - 1], [5.0, 4.0]
    np.savez(dst / FILE, neighbours=nb, scores=sc)
    m = json.loads((dst / "manifest.json").read_text())
    m["item2item"]["serving"] = serving
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_a_known_last_item_pulls_its_neighbour_in(root: Path, tmp_path: Path) -> None:
    v1 = load_version(root / "v1")
    history = [3, 4, 5]
    plain = Recommender(v1, retrieval_k=5, stages=("retrieval",), item2item=False)
    ids = [str(v1.item_ids[i]) for i in history]
    faiss_top = {it.item_id for it in plain.recommend(ids, k=5).items}
    far = next(i for i in range(6, v1.num_items + 1) if str(v1.item_ids[i]) not in faiss_top)
    # item 5's neighbours: `far` (not in FAISS's top 5) and item 4 (seen: must be dropped)
    v = load_version(_with_table(root / "v1", tmp_path / "v1", 5, far, {"recent": 1, "decay": 1.0, "candidates": 5,
                                                                       "beta": 100.0}))
    rec = Recommender(v, retrieval_k=5, stages=("retrieval",))
    out = rec.recommend(ids, k=6, explain=True).items
    assert out[0].item_id == str(v.item_ids[far])  # beta 100: the route's item leads the retrieval cut
    assert out[0].routes.keys() == {"i2i"} and out[0].routes["i2i"] == pytest.approx(5.0)
    assert all(it.routes.keys() == {"faiss"} for it in out[1:])
    assert {it.item_id for it in out[1:]} == faiss_top  # the union: FAISS's 5 and the route's one
    assert str(v.item_ids[4]) not in {it.item_id for it in out}
    # the full cascade serves it with routes in explain, and through HTTP
    full = Recommender(v).recommend(ids, k=80, explain=True).items
    assert str(v.item_ids[far]) in {it.item_id for it in full}
    (tmp_path / "CURRENT").write_text("v1\n")
    with TestClient(create_app(Settings(artifacts=tmp_path, allow_anonymous_writes=True))) as c:
        body = c.post("/v1/recommend", json={"history": ids, "k": 80, "explain": True}).json()
        plain_body = c.post("/v1/recommend", json={"history": ids, "k": 5}).json()
    got = {it["item_id"]: it for it in body["items"]}
    # the service's retrieval_k (200) covers the 80 items: FAISS found it too, and it keeps both scores
    assert got[str(v.item_ids[far])]["routes"].keys() == {"faiss", "i2i"}
    assert got[str(v.item_ids[far])]["routes"]["i2i"] == pytest.approx(5.0)
    assert all("routes" not in it for it in plain_body["items"])
    assert "item2item" in body["timings_ms"]


def test_reindex_rebuilds_the_table_with_new_events(root: Path, tmp_path: Path) -> None:
    live = tmp_path / "artifacts"
    shutil.copytree(root, live)
    ds = load(TINY)
    a, b = 11, 12
    before = load_version(live / "v1").item2item
    assert before is not None
    events = tmp_path / "events.txt"  # seqtxt: one new user who watches a then b, five times over
    events.write_text("".join(f"new{j} {ds.item_ids[a]} {ds.item_ids[b]}\n" for j in range(5)))
    assert cli.main(["reindex", "--artifacts", str(live), "--events", f"seqtxt:{events}", "--version", "v2",
                     "--max-regression", "1", "--stage-tolerance", "1", BELOW_OK_FLAG]) == 0
    assert read_current(live) == "v2"
    v2 = load_version(live / "v2")
    smoke_run(v2)
    assert v2.manifest.to_dict()["item2item"]["events"] == 10
    assert v2.manifest.to_dict()["item2item"]["interactions"] == before_rows() + 10
    route = v2.item2item
    assert route is not None
    # the transition a -> b now has 5 more counts: b ranks at least as high in a's row as before
    rank = lambda nb: list(nb).index(b) if b in nb else nb.size  # noqa: E731
    assert rank(route.neighbours[a]) <= rank(before.neighbours[a]) and rank(route.neighbours[a]) < nb_size(route)
    sa = dict(zip(route.neighbours[a].tolist(), route.scores[a].tolist()))
    sb = dict(zip(before.neighbours[a].tolist(), before.scores[a].tolist()))
    assert sa[b] > sb.get(b, 0.0)


def before_rows() -> int:
    return int(LeaveOneOut(load(TINY)).train_mask.sum())


def nb_size(route: object) -> int:
    return int(route.neighbours.shape[1])  # type: ignore[attr-defined]


def test_a_version_without_the_table_still_serves(root: Path, tmp_path: Path) -> None:
    old = tmp_path / "v1"
    shutil.copytree(root / "v1", old)
    (old / FILE).unlink()
    m = json.loads((old / "manifest.json").read_text())
    del m["files"]["item2item"], m["item2item"]
    (old / "manifest.json").write_text(json.dumps(m))
    v = load_version(old)
    assert v.item2item is None
    smoke_run(v)
    out = Recommender(v).recommend([str(v.item_ids[i]) for i in (3, 4, 5)], k=10, explain=True)
    assert len(out.items) == 10 and all(it.routes.keys() == {"faiss"} for it in out.items)
    # a manifest that names the file while it is missing is refused with its name
    m["files"]["item2item"] = FILE
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception, match=FILE):
        load_version(old)


def test_export_cli_route_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["export", "--data", TINY, "--retrieval", "r", "--prerank", "p", "--out", str(tmp_path / "a")]
    assert cli.main([*base, "--no-item2item", "--i2i-window", "3"]) == 2
    assert "--i2i-window contradicts --no-item2item" in capsys.readouterr().err
    assert cli.main([*base, "--no-item2item", "--item2item"]) == 2
    assert "--item2item contradicts --no-item2item" in capsys.readouterr().err
    assert cli.main([*base, "--item2item", "--i2i-alpha", "2"]) == 2  # --item2item: accepted, the default
    assert "alpha must be in [0, 1], got 2.0" in capsys.readouterr().err
