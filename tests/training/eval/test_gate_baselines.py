"""The trivial baselines in the publish gate (training/eval/gate_baselines.py, training/publish/gates.py
serving_gate, manifest `serving.baselines`) and the stage gate's paired-SE rule
(training/eval/served_eval.py choose_stages).

The published version is the random-init one of tests/training/publish/test_build.py with the
item-to-item route: far below last-item on the tiny synthetic set, so refused by default.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recsys_cli import main as cli
from service.artifacts import load_current
from service.contract.layout import MANIFEST, ContractError
from service.contract.manifest import Manifest
from service.core.config import Settings
from service.item2item import top_route
from service.main import create_app
from tests.training.publish.test_build import BELOW_OK_FLAG, TINY, make_checkpoints, one_thread  # noqa: F401
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.eval import gate_baselines as gb
from training.eval import served_eval as se
from training.eval.baselines import BASELINES
from training.eval.metrics import evaluate_retrieval, ranking_metrics
from training.publish.versions import CURRENT, read_current


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_checkpoints(TINY, tmp_path_factory.mktemp("ckpt"))


def _export(ckpts: tuple[Path, Path, Path], root: Path, version: str, *flags: str) -> list[str]:
    ret, pre, rer = ckpts
    return ["export", "--data", TINY, "--retrieval", str(ret), "--prerank", str(pre), "--rerank", str(rer),
            "--out", str(root), "--version", version, "--item2item", *flags]


@pytest.fixture(scope="module")
def below(ckpts: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(artifacts root, stderr of the refused export, stdout of the one with --allow-below-baseline)."""
    root = tmp_path_factory.mktemp("artifacts")
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(_export(ckpts, root, "v1")) == 1
    refused = err.getvalue()
    assert not (root / "v1").exists() and read_current(root) is None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(_export(ckpts, root, "v1", BELOW_OK_FLAG)) == 0
    return root, refused, out.getvalue()


def test_a_version_below_last_item_is_refused_then_allowed(below: tuple[Path, str, str]) -> None:
    root, refused, summary = below
    s = load_current(root).manifest.serving
    assert s is not None and s.baselines is not None
    bl = s.baselines
    assert list(bl.rows) == ["popularity", "last-item", "item2item"] and bl.best == "last-item"
    assert s.stages and bl.served_cut == s.stages[-1]
    assert not bl.beats and bl.allowed_below
    assert bl.served_minus_best is not None and bl.paired_se is not None
    served = s.cuts[bl.served_cut][se.METRIC]
    assert bl.served_minus_best == pytest.approx(served - bl.rows["last-item"][se.METRIC], abs=1e-12)
    # random rankers behind the tuned item-to-item route: the route lifts the cut to about last-item's
    # level (-0.0067 here), still below it, and within one SE is not a win
    assert bl.served_minus_best < 0 < bl.paired_se < 0.05
    # the refusal: exit 1, CURRENT unchanged, one message with both numbers and the SE
    assert (f"check failed, CURRENT unchanged (None): below baseline: served NDCG@10 {served:.4f} "
            f"({bl.served_cut} cut) does not beat the best baseline last-item "
            f"({bl.rows['last-item'][se.METRIC]:.4f}) by more than its paired SE: served - last-item = "
            f"{bl.served_minus_best:+.4f}, paired SE {bl.paired_se:.4f} (199 valid users); "
            "--allow-below-baseline publishes it anyway") in refused
    assert "baselines NDCG@10 (199 valid users): popularity " in summary
    assert "BELOW IT, published with --allow-below-baseline" in summary
    # the manifest as written: plain JSON under serving.baselines
    raw = json.loads((root / "v1" / MANIFEST).read_text())["serving"]["baselines"]
    assert raw["beats"] is False and raw["allowed_below"] is True and set(raw["rows"]["popularity"]) == {
        "HR@10", "NDCG@10", "Coverage@10"}


def test_gate_baselines_match_the_count_baselines_and_the_route(below: tuple[Path, str, str]) -> None:
    root = below[0]
    v = load_current(root)
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    users = np.arange(loo.eval_users.size)
    bl = gb.evaluate_baselines(v, ds, loo, "valid", users)
    # the gate recorded exactly these (validation users, all 199 of them)
    s = v.manifest.serving
    assert s is not None and s.baselines is not None
    for name, m in s.baselines.rows.items():
        assert m == {k: pytest.approx(bl.rows[name][k], abs=1e-12) for k in gb.BASELINE_COLUMNS}
    # counts: full-ranking HR/NDCG@10 of training.eval.baselines through evaluate_retrieval (torch topk;
    # ties may order differently: one user at most)
    for name in ("popularity", "last-item"):
        ref = evaluate_retrieval(BASELINES[name](loo, "valid"), loo, "valid", (10,), progress=False)
        for key in ("HR@10", "NDCG@10"):
            assert abs(bl.rows[name][key] - ref[key]) <= 1 / 199 + 1e-9, (name, key)
        assert bl.ndcg[name].mean() == pytest.approx(bl.rows[name]["NDCG@10"], abs=1e-12)
    # the route alone: its own top-50 over the reached items, the history removed, no backfill
    route = v.item2item
    assert route is not None
    ranks = []
    for u, (s0, e) in enumerate(zip(ds.offsets[loo.eval_users], loo.history_end("valid"))):
        h = np.array([v.id_to_index[str(x)] for x in ds.item_ids[ds.items[s0:e]]])
        got, _ = top_route(*route.score(h, np.unique(h)), 50)
        t = v.id_to_index[str(ds.item_ids[loo.targets("valid")[u]])]
        ranks.append(int(np.flatnonzero(got == t)[0]) if t in got else 10**9)
    want = ranking_metrics(np.array(ranks), (10,))
    assert bl.rows["item2item"]["NDCG@10"] == pytest.approx(want["NDCG@10"], abs=1e-12)
    assert bl.rows["item2item"]["HR@10"] == pytest.approx(want["HR@10"], abs=1e-12)


def test_evaluate_shows_the_baseline_rows(below: tuple[Path, str, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = below[0]
    assert cli.main(["evaluate", "--artifacts", str(root), "--users", "60", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "e.json").read_text())
    ds = load(TINY)
    loo = LeaveOneOut(ds)
    want = gb.evaluate_baselines(load_current(root), ds, loo, "test", se.select_users(loo, 60))
    assert list(r["baselines"]) == ["popularity", "last-item", "item2item"]
    lines = out.splitlines()
    for name, m in want.rows.items():
        assert r["baselines"][name]["NDCG@10"] == pytest.approx(m["NDCG@10"], abs=1e-12)
        row = next(line for line in lines if line.startswith(f"baseline {name} "))
        assert f"{m['NDCG@10']:.4f}" in row and f"{m['HR@10']:.4f}" in row
    best = max(want.rows, key=lambda name: want.rows[name]["NDCG@10"])
    assert r["verdict"]["best"] == best and r["verdict"]["beats"] is False
    assert f"does not beat the best baseline {best}" in out and "(60 test users)" in out


def test_version_endpoint_shows_the_gate_baselines(below: tuple[Path, str, str]) -> None:
    root = below[0]
    s = load_current(root).manifest.serving
    assert s is not None and s.baselines is not None
    with TestClient(create_app(Settings(artifacts=root))) as c:  # type: ignore[call-arg]
        body = c.get("/v1/version").json()
    assert body["baselines"] == {k: pytest.approx(m) for k, m in s.baselines.rows.items()}
    assert body["serving"]["baselines"]["beats"] is False and body["serving"]["baselines"]["allowed_below"] is True
    assert body["serving"]["baselines"]["best"] == "last-item" and "rows" not in body["serving"]["baselines"]


def test_older_manifests_without_baselines_still_load(below: tuple[Path, str, str], tmp_path: Path) -> None:
    d = json.loads((below[0] / "v1" / MANIFEST).read_text())
    del d["serving"]["baselines"], d["serving"]["rule"]
    m = Manifest.from_dict(d)
    assert m.serving is not None and m.serving.baselines is None and m.serving.rule is None
    assert m.to_dict() == d  # written back unchanged
    d["serving"]["baselines"] = {"rows": {}, "beats": "yes"}
    with pytest.raises(ContractError, match=r"serving\.baselines\.beats must be true or false, got 'yes'"):
        Manifest.from_dict(d)


def _served(cuts: dict[str, list[float]]) -> se.ServedEval:
    users = len(next(iter(cuts.values())))
    return se.ServedEval("valid", users, {k: {"NDCG@10": float(np.mean(v)), "failed": 0} for k, v in cuts.items()},
                         {k: np.array(v) for k, v in cuts.items()})


def test_a_stage_worse_by_more_than_its_paired_se_is_switched_off() -> None:
    r = [0.3, 0.3, 0.3, 0.3]
    pre = [0.1, 0.4, 0.2, 0.4]  # - retrieval: [-0.2, 0.1, -0.1, 0.1], mean -0.025, paired SE 0.075
    rer = [0.0, 0.35, 0.1, 0.35]  # - prerank: [-0.1, -0.05, -0.1, -0.05], mean -0.075, paired SE 0.0144
    ev = _served({"retrieval": r, "prerank": pre, "rerank": rer})
    assert ev.paired_se("prerank", "retrieval") == pytest.approx(0.075)
    c = se.choose_stages(ev, None)  # the default: the paired-SE rule
    assert c.stages == ["retrieval", "prerank"] and c.switched_off == ["rerank"]
    assert c.reason == ("rerank NDCG@10 0.2000 is worse than prerank 0.2750 by more than its paired SE: "
                        "rerank - prerank = -0.0750, paired SE 0.0144 (4 valid users)")
    # the absolute override switches the pre-ranker off (0.025 > 0.01) although it is within its SE
    assert se.choose_stages(ev, 0.01).switched_off == ["prerank", "rerank"]
    # and keeps a consistent small loss the SE rule switches off: -0.005 with paired SE 0.001
    small = _served({"retrieval": r, "prerank": [0.296, 0.294, 0.296, 0.294]})
    assert se.choose_stages(small, None).switched_off == ["prerank"]
    assert se.choose_stages(small, 0.01).stages == ["retrieval", "prerank"]
    assert se.ServingGate().rule == "paired-se" and se.ServingGate(tolerance=float("inf")).rule == "off"
    block = se.serving_block(ev, c, None, 0)
    assert block.rule == "paired-se" and block.tolerance is None and block.baselines is None


def test_the_verdict_needs_more_than_one_paired_se() -> None:
    ev = _served({"retrieval": [0.7, 0.1, 0.3, 0.3]})
    bl = gb.BaselineEval("valid", 4, {"popularity": {"NDCG@10": 0.1}, "last-item": {"NDCG@10": 0.3}},
                         {"popularity": np.full(4, 0.1), "last-item": np.array([0.4, 0.2, 0.3, 0.3])})
    v = gb.baseline_verdict(ev, bl, "retrieval")  # d = [0.3, -0.1, 0, 0]: mean 0.05, SE sqrt(0.03) / 2
    assert (v.best, v.diff, v.paired_se) == ("last-item", pytest.approx(0.05), pytest.approx(np.sqrt(0.03) / 2))
    assert not v.beats  # better on average, but within one paired SE
    ev = _served({"retrieval": [0.5, 0.3, 0.4, 0.3]})  # d = [0.1, 0.1, 0.1, 0.0]: mean 0.075, SE 0.025
    v = gb.baseline_verdict(ev, bl, "retrieval")
    assert v.beats and v.diff == pytest.approx(0.075) and v.paired_se == pytest.approx(0.025)
    block = gb.baselines_block(bl, v, allowed_below=True)
    assert block.beats and not block.allowed_below  # the flag was not needed
    with pytest.raises(ValueError, match=r"the cuts \(4 valid users\) and the baselines \(3 valid users\)"):
        gb.baseline_verdict(ev, gb.BaselineEval("valid", 3, bl.rows, bl.ndcg), "retrieval")


def test_reindex_keeps_the_live_version_below_baseline(below: tuple[Path, str, str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(below[0], root)
    assert cli.main(["reindex", "--artifacts", str(root), "--version", "v2", "--max-regression", "1"]) == 1
    err = capsys.readouterr().err
    assert "recsys reindex: check failed, CURRENT unchanged (v1): below baseline: served NDCG@10 " in err
    assert read_current(root) == "v1" and not (root / "v2").exists() and (root / CURRENT).is_file()
    assert cli.main(["reindex", "--artifacts", str(root), "--version", "v2", "--max-regression", "1",
                     BELOW_OK_FLAG]) == 0
    s = load_current(root).manifest.serving
    assert read_current(root) == "v2" and s is not None and s.baselines is not None and s.baselines.allowed_below
