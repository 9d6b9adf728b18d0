"""Impressions from the pipeline (training/stages/rerank/impressions.py) and `recsys train rerank`.

Tiny randomly initialised retrieval / pre-rank checkpoints: the tests check the list
construction (shape, pre-rank order, no history item, labels from training rows within the
horizon), not model quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.sasrec import MultiLauncherSASRec, SASRecConfig
from recsys_cli import main as cli
from training.stages.rerank import impressions as im
from training.stages.rerank import models as rr
from training.stages.prerank import train as pr
from training.stages.prerank.data import build_next_item_data
from training.stages.retrieval import train as rt
from training.eval.baselines import LastItem
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.data.features import item_columns, recent_histories, user_columns
from training.eval.metrics import mask_seen

TINY = "synthetic:users=120,items=80,seed=0"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def make_checkpoints(spec: str, root: Path) -> tuple[Path, Path]:
    """Random-init SASRec and IntTower checkpoints over `spec` (the pre-ranker's feature spec is
    fitted on the training rows as `recsys train prerank` does)."""
    ds = load(spec)
    loo = LeaveOneOut(ds)
    torch.manual_seed(0)
    sasrec = MultiLauncherSASRec(SASRecConfig(num_items=ds.num_items, maxlen=20, dim=16, num_blocks=1))
    rt.save_checkpoint(root / "ret", sasrec, ds, spec, {})
    scorers = {"valid": LastItem(loo, "valid"), "test": LastItem(loo, "test")}
    data = build_next_item_data(ds, loo, scorers, history_len=10, candidates=5, max_train_examples=20)
    tower = pr.build_model("inttower", data.spec, hidden=(16, 8), heads=2, head_dim=4, embed_dim=8)
    pr.save_checkpoint(tower, "inttower", data.spec, root / "pre", objective="next-item", fingerprint=ds.fingerprint)
    return root / "ret", root / "pre"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[im.Pipeline, LeaveOneOut, Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    ret, pre = make_checkpoints(TINY, root)
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    return im.Pipeline.load(ds, loo, ret, pre), loo, ret, pre


def write_seqtxt(path: Path, n_users: int, length: int, n_items: int) -> None:
    """Users walk the catalog without repeating an item: user u sees (u + j) % n_items + 1."""
    lines = [" ".join([f"u{u}", *(f"i{(u + j) % n_items}" for j in range(length))]) for u in range(n_users)]
    path.write_text("\n".join(lines) + "\n")


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="list_len must be in \\[1, 100\\], got 101"):
        im.ImpressionConfig(list_len=101)
    with pytest.raises(ValueError, match="candidates \\(20\\) must be >= list_len \\(30\\)"):
        im.ImpressionConfig(candidates=20)
    with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
        im.ImpressionConfig(horizon=0)


def test_lists_have_the_shape_and_pre_rank_order(tiny) -> None:
    pipe, loo, _, _ = tiny
    cfg = im.ImpressionConfig(list_len=10, candidates=30, horizon=3, lists_per_user=4, eval_steps=2)
    imp = im.build_impressions(pipe, loo, cfg)
    ds = pipe.dataset
    P = pipe.prerank.cfg.heads * len(pipe.prerank.cfg.hidden)
    for name in ("train", "valid", "test"):
        d = getattr(imp, name)
        B = len(imp.steps[name])
        assert B > 0
        assert d.item_feats.shape == (B, 10, pipe.item_feats.shape[1])
        assert d.pv.shape == (B, 10, P) and d.init_score.shape == d.labels.shape == d.mask.shape == (B, 10)
        assert d.mask.all()  # 80 items, short histories: always 10 real candidates
        # pre-rank order: the per-list z-score keeps the order, so it is non-increasing
        assert (np.diff(d.init_score, axis=1) <= 1e-6).all()
        # and it is the IntTower score: the sum of the PV (before its z-scoring) orders the same way
        raw_pv = d.pv * np.asarray(imp.pv_stats.std) + np.asarray(imp.pv_stats.mean)
        assert (np.diff(raw_pv.sum(axis=2), axis=1) <= 1e-4).all()
        # no list holds an item of the user's history
        st = imp.steps[name]
        for u, end, row in zip(st.users, st.ends(ds), imp.items[name]):
            assert not set(row.tolist()) & set(ds.items[ds.offsets[u] : end].tolist())
    # training steps, valid and test users are as the module doc says
    n = loo.train_lengths()
    tr, va, te = imp.steps["train"], imp.steps["valid"], imp.steps["test"]
    assert not set(va.users.tolist()) & set(te.users.tolist())
    first_eval = {}
    for st in (va, te):
        assert (st.steps + cfg.horizon <= n[st.users]).all()
        for u, s in zip(st.users, st.steps):
            first_eval[u] = min(first_eval.get(u, s), s)
    for u, t in zip(tr.users, tr.steps):
        assert t >= 1 and t + cfg.horizon <= first_eval.get(u, n[u])
    assert np.bincount(tr.users).max() <= cfg.lists_per_user


def test_rank_candidates_matches_the_stage_scorers(tiny) -> None:
    pipe, loo, _, _ = tiny
    cfg = im.ImpressionConfig(list_len=5, candidates=20)
    ds = pipe.dataset
    users = loo.eval_users[:6]
    ends = loo.history_end("test")[:6]
    ranked = im.rank_candidates(pipe, users, ends, cfg)
    hist = loo.histories("test", np.arange(6))
    s = rt.model_scorer(pipe.retrieval)(hist).copy()
    mask_seen(s, hist)
    want = torch.topk(torch.from_numpy(s), 20, dim=1).indices.numpy()
    assert [set(r) for r in ranked.items] == [set(r) for r in want]  # same retrieval top-C
    # pre-rank scores equal pr.score_lists on the same user rows
    user = pipe.spec.user.encode({**user_columns(ds, users, recent_histories(ds, ends, pipe.spec.history_len)),
                                  "user_log_count": np.log1p(ends - ds.offsets[users])})
    raw = item_columns(ds, np.arange(ds.num_items + 1))
    raw["item_log_count"] = np.log1p(np.bincount(ds.items[loo.train_mask], minlength=ds.num_items + 1)).astype(np.float32)
    ref = pr.score_lists(pipe.prerank, user, ranked.items, pipe.spec.item.encode(raw))
    np.testing.assert_allclose(ranked.scores, ref, rtol=1e-5, atol=1e-5)


def test_clicks_come_from_training_rows_within_the_horizon(tmp_path: Path) -> None:
    # 12 users x 16 distinct items over a 20-item catalog: with C = N = 20 every unseen item is in
    # every list, so each user's validation and test items are always candidates. They must
    # never be clicks; the item at horizon T is a click, the one at T + 1 is not.
    data = tmp_path / "walk.txt"
    write_seqtxt(data, n_users=12, length=16, n_items=20)
    spec = f"seqtxt:{data}"
    ret, pre = make_checkpoints(spec, tmp_path)
    ds = load(spec)
    loo = LeaveOneOut(ds)
    pipe = im.Pipeline.load(ds, loo, ret, pre)
    T = 3
    cfg = im.ImpressionConfig(list_len=20, candidates=20, horizon=T, lists_per_user=20, eval_steps=2)
    imp = im.build_impressions(pipe, loo, cfg)
    held_out = {(u, ds.items[r]) for u in range(ds.num_users) for r in (ds.offsets[u + 1] - 2, ds.offsets[u + 1] - 1)}
    n_lists = 0
    for name in ("train", "valid", "test"):
        d, st = getattr(imp, name), imp.steps[name]
        for b, (u, end) in enumerate(zip(st.users, st.ends(ds))):
            row, lab = imp.items[name][b], getattr(imp, name).labels[b]
            assert d.mask[b].sum() == 20 - (end - ds.offsets[u])  # every unseen item is a candidate
            clicked = {int(i) for i in row[lab > 0]}
            assert clicked == {int(ds.items[end + j]) for j in range(T)}  # exactly the next T items
            assert int(ds.items[end + T]) in row.tolist() or end + T >= ds.offsets[u + 1]
            assert not any((u, i) in held_out for i in clicked)
            n_lists += 1
            held_in_list = [i for i in row.tolist() if (u, i) in held_out]
            assert len(held_in_list) == 2  # both held-out items are shown, and never clicked
    assert n_lists == sum(len(s) for s in imp.steps.values())
    # shorter windows cut at the end of the training part, never past it
    st = im.Steps(np.array([0]), np.array([loo.train_lengths()[0] - 1]))
    lab = im.click_labels(ds, loo, st, np.array([[ds.items[ds.offsets[0] + 15], ds.items[ds.offsets[0] + 13]]]), T)
    np.testing.assert_array_equal(lab, [[0.0, 1.0]])  # the test item (row 15) is no click; row 13 is


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_json_checkpoints_and_onnx(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, ret, pre = tiny
    code, stdout, _ = _cli(["train", "rerank", "--data", TINY, "--retrieval", str(ret), "--prerank", str(pre),
                            "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"), "--list-len", "8",
                            "--candidates", "20", "--epochs", "1", "--d-model", "8", "--layers", "1",
                            "--lists-per-user", "2"], capsys)
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    for key in ("before", "prm", "prm_base", "mlp"):
        assert {"NDCG@5", "NDCG@10", "MAP@10", "P@5"} <= set(r[key]), key
        assert 0.0 < r[key]["NDCG@10"] <= 1.0
    assert {"retrieval", "prerank", "rerank_prm", "rerank_prm_base", "rerank_mlp"} <= set(r["end_to_end"])
    # at K = 1 only the order matters, and retrieval -> pre-rank keeps the item set of the top C
    e2e = r["end_to_end"]
    assert e2e["prerank"]["HR@20"] == e2e["rerank_prm"]["HR@20"]  # 20 = C: the re-ranker only reorders
    assert r["artifacts"]["parity_max_abs_diff"] < 1e-4
    for f in ("prm.pt", "prm_base.pt", "mlp.pt", "rerank.onnx", "rerank_items.npy", "rerank_manifest.json"):
        assert (tmp_path / "out" / f).is_file(), f
    model, ckpt = rr.load_reranker(tmp_path / "out" / "prm_base.pt")
    assert model.config.pv_dim == 0 and ckpt["impressions"]["list_len"] == 8
    assert "PRM-BASE" in stdout and "end to end" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--retrieval", "no/such/dir"], "--retrieval no/such/dir: no checkpoint.pt there"),
        (["--list-len", "101"], "list_len must be in [1, 100], got 101"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             extra: list[str], message: str) -> None:
    _, _, ret, pre = tiny
    argv = ["train", "rerank", "--data", TINY, "--retrieval", str(ret), "--prerank", str(pre),
            "--out", str(tmp_path), *extra]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and message in err, err


def test_cli_rejects_checkpoints_of_another_data_set(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, ret, pre = tiny
    code, _, err = _cli(["train", "rerank", "--data", "synthetic:users=120,items=90,seed=0", "--retrieval", str(ret),
                         "--prerank", str(pre), "--out", str(tmp_path)], capsys)
    assert code == 2 and "retrieval checkpoint has 80 items, the data set 90" in err
