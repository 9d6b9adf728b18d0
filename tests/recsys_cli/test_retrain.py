"""`recsys retrain` (recsys_cli/commands/retrain.py): by default each stage starts from the live
version's checkpoints (item rows by external id: tests/training/test_warm_start.py), each run writes
its own checkpoint folders, a checkpoint that does not fit falls back to training anew in one line,
and --from-scratch runs the steps it always ran. The loop on a simulated world: tests/e2e/test_online_loop.py."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import recsys_cli.main
from recsys_cli.main import main as cli
from service.contract.layout import MANIFEST, read_current
from service.contract.manifest import Manifest
from service.core.config import Settings
from service.main import create_app
from tests.training.test_warm_start import GONE, NEW_ITEMS, write_base, write_grown
from recsys_cli.commands.common import ranker_steps
from recsys_cli.commands.retrain import LiveCheckpoints, live_checkpoints, prune_runs
from training.checkpoints import read_checkpoint
from training.stages.prerank.folds import TAIL_HOLDOUT
from training.publish.gates import LIVE_RULE
from training.publish.versions import set_current

RETRAIN = ["--epochs", "1", "--no-item2item", "--allow-below-baseline"]  # fast; tiny models serve below baselines


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = int(cli(argv))
    return code, out.getvalue()


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A first retrain on the base data (no live version: trains anew), then one on the grown data
    (new users, new items, one item gone, every internal id shifted)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("retrain")
    base, grown = write_base(root / "a"), write_grown(root / "a", root / "b")
    art, work = root / "artifacts", root / "work"
    code1, out1 = run(["retrain", "--artifacts", str(art), "--data", base, "--work", str(work), *RETRAIN])
    first = read_current(art)
    assert code1 == 0 and first is not None, out1
    m1 = Manifest.load(art / first / MANIFEST)
    ckpt_root = Path(str(m1.retrieval.source)).parent
    before = digests(ckpt_root)
    code2, out2 = run(["retrain", "--artifacts", str(art), "--data", grown, "--work", str(work), *RETRAIN])
    yield {"art": art, "work": work, "base": base, "grown": grown, "first": first, "m1": m1, "out1": out1,
           "code2": code2, "out2": out2, "ckpt_root": ckpt_root, "before": before}


def test_the_first_retrain_trains_anew_with_no_live_version(loop: dict[str, Any]) -> None:
    assert f"retrain: every stage trains anew: {loop['art']} has no live version" in loop["out1"]
    assert "--warm-from" not in loop["out1"]


def test_retrain_warm_starts_every_stage_from_the_live_versions_checkpoints(loop: dict[str, Any]) -> None:
    out, m1 = loop["out2"], loop["m1"]
    assert loop["code2"] == 0, out
    second = read_current(loop["art"])
    assert second != loop["first"]
    m2 = Manifest.load(loop["art"] / str(second) / MANIFEST)
    up1 = str(m1.retrieval.source)  # `tail`: the served retriever is its own ranking fold
    assert (f"retrain: warm start from the live version {loop['first']}: retriever <- {up1}, "
            f"pre-ranker <- {m1.prerank.source}, re-ranker <- {m1.rerank.source if m1.rerank else None}") in out
    # the retriever: every item both data sets have copied by id, the new ones fresh, the gone one dropped
    assert (f"train retrieval: warm start from {up1}: 39 items rows copied by id, {len(NEW_ITEMS)} rows new to "
            "the table initialised fresh, 1 rows of the checkpoint's table dropped") in out
    assert re.search(rf"train prerank: warm start from {re.escape(str(m1.prerank.source))}: \d+ items rows copied", out)
    assert f"train rerank: warm start from {m1.rerank.source if m1.rerank else None}: every weight copied" in out
    # what each new checkpoint records
    run2 = Path(str(m2.retrieval.source)).parent
    ret = read_checkpoint(run2 / "retrieval" / "checkpoint.pt").extra
    assert ret["warm_start"] == {"from": up1, "keys": "items", "copied": 39, "new": 5, "dropped": 1}
    assert GONE not in ret["item_ids"] and set(NEW_ITEMS) <= set(ret["item_ids"])
    assert ret["holdout"] == TAIL_HOLDOUT and ret["init_from"] is None and not (run2 / "upstream").exists()
    pre = read_checkpoint(run2 / "prerank" / "prerank.pt").extra
    assert pre["warm_start"]["from"] == m1.prerank.source and pre["warm_start"]["copied"] > 0
    # the rankers learned on the served retriever's own lists of the held-out tail
    assert pre["retrieval"]["upstream"] == str(run2 / "retrieval") and pre["retrieval"]["holdout"] == TAIL_HOLDOUT
    assert read_checkpoint(run2 / "rerank" / "prm.pt").extra["warm_start"]["from"] == str(m1.rerank.source if m1.rerank else None)
    # each run has its own checkpoint folders: the live version's were read, never overwritten
    assert run2 != loop["ckpt_root"] and digests(loop["ckpt_root"]) == loop["before"]


def test_a_checkpoint_that_does_not_fit_falls_back_to_training_anew(loop: dict[str, Any], tmp_path: Path) -> None:
    up1 = Path(str(loop["m1"].retrieval.source))
    code, out = run(["train", "retrieval", "--data", loop["grown"], "--launchers", "2", "--warm-from", str(up1),
                     "--epochs", "1", "--quiet", "--out", str(tmp_path / "ret")])
    assert code == 0
    assert (f"train retrieval: no warm start from {up1} (num_launchers is 1 in the checkpoint, 2 here); "
            "training anew") in out.splitlines()
    assert read_checkpoint(tmp_path / "ret" / "checkpoint.pt").extra["warm_start"]["skipped"] == \
        "num_launchers is 1 in the checkpoint, 2 here"
    # a folder without the stage's checkpoint: the same one line, not a crash
    code, out = run(["train", "retrieval", "--data", loop["grown"], "--warm-from", str(tmp_path / "none"),
                     "--epochs", "1", "--quiet", "--out", str(tmp_path / "ret2")])
    assert code == 0 and re.search(rf"^train retrieval: no warm start from {re.escape(str(tmp_path / 'none'))} "
                                   r"\(.*: no such folder\); training anew$", out, re.M)


def steps(loop: dict[str, Any], monkeypatch: pytest.MonkeyPatch, *flags: str) -> tuple[str, list[list[str]]]:
    """The steps `recsys retrain` runs (recorded, not run), its run folder written as RUN."""
    seen: list[list[str]] = []

    def record(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    monkeypatch.setattr(recsys_cli.main, "main", record)
    code, out = run(["retrain", "--artifacts", str(loop["art"]), "--data", loop["grown"], "--work", str(loop["work"]),
                     *RETRAIN, *flags])
    assert code == 0
    name = re.search(r"-> parquet:.*/data/([^/\s]+)", out)
    assert name is not None, out
    return out, [[a.replace(name.group(1), "RUN") for a in s] for s in seen]


def test_from_scratch_runs_the_steps_without_warm_starts(loop: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    out, scratch = steps(loop, monkeypatch, "--from-scratch")
    assert "retrain: every stage trains anew (--from-scratch)" in out
    assert not any("--warm-from" in s for s in scratch)
    _, warm = steps(loop, monkeypatch)
    stripped = []
    for s in warm:
        i = s.index("--warm-from") if "--warm-from" in s else None
        stripped.append(s if i is None else s[:i] + s[i + 2:])
    assert sum("--warm-from" in s for s in warm) == 3  # retriever, pre-ranker, re-ranker
    assert stripped == scratch
    assert [s[:2] for s in scratch] == [["train", "retrieval"], ["train", "prerank"], ["train", "rerank"],
                                        ["export", "--data"]]


def test_retrain_uses_the_demos_tail_ranking_data(loop: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """One retriever, trained with the tail holdout, serves and is the rankers' --upstream (as `recsys demo`
    --ranking-data tail); the rankers' two commands are the demo's (ranker_steps)."""
    _, steps_run = steps(loop, monkeypatch, "--from-scratch")
    ret = str(loop["work"] / "checkpoints" / "RUN" / "retrieval")
    retrieval, prerank, rerank, export = steps_run
    assert retrieval[retrieval.index("--holdout") + 1] == str(TAIL_HOLDOUT) and "--init-from" not in retrieval
    assert retrieval[retrieval.index("--out") + 1] == ret
    for s in (prerank, rerank):
        assert s[s.index("--retrieval") + 1] == ret and s[s.index("--upstream") + 1] == ret
    assert "--no-pair-features" in prerank  # published without the item-to-item route (--no-item2item)
    work = loop["work"] / "checkpoints" / "RUN"
    assert [prerank, rerank] == ranker_steps(str(prerank[3]), work / "retrieval", work / "retrieval",
                                             work / "prerank", work / "rerank", ["--epochs", "1"],
                                             pair_features=False)
    assert export[export.index("--retrieval") + 1] == ret
    _, steps_run = steps(loop, monkeypatch, "--from-scratch", "--holdout", "3")
    assert steps_run[0][steps_run[0].index("--holdout") + 1] == "3"


def run_both(argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout + stderr): the gate's refusal is on stderr."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = int(cli(argv))
    return code, out.getvalue()


def write_more(grown: Path, folder: Path) -> str:
    """The grown data with two more events of each new user (a later log): other data, the same catalog."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(csv.reader((grown / "interactions.csv").open()))
    t0 = max(int(r[2]) for r in rows[1:]) + 100
    extra = [[f"nu{u}", str(6 + (u * 7 + k) % 30), str(t0 + 10 * k + u), "4"] for u in range(10) for k in range(2)]
    with (folder / "interactions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([*rows, *extra])
    for name in ("items.csv", "users.csv"):
        shutil.copy(grown / name, folder / name)
    return f"csv:{folder}"


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three retrains, each on newer data than the live version's: a weak first version (1 epoch), a
    better one (30 epochs, warm), then a worse one (1 epoch from scratch), which the gate refuses."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gated")
    base, grown = write_base(root / "a"), write_grown(root / "a", root / "b")
    more = write_more(root / "b", root / "c")
    art, work = root / "artifacts", root / "work"
    common = ["--artifacts", str(art), "--work", str(work), "--no-item2item", "--allow-below-baseline"]
    code1, out1 = run_both(["retrain", *common, "--data", base, "--epochs", "1"])
    weak = read_current(art)
    code2, out2 = run_both(["retrain", *common, "--data", grown, "--epochs", "30"])
    better = read_current(art)
    code3, out3 = run_both(["retrain", *common, "--data", more, "--epochs", "1", "--from-scratch", "--keep-runs", "0"])
    assert code1 == 0 and weak is not None, out1
    yield {"art": art, "work": work, "weak": weak, "better": better, "code2": code2, "out2": out2,
           "code3": code3, "out3": out3, "more": more}


def figures(verb: str, live: str) -> str:
    """The gate's sentence on the live version, each figure a group: new, live, difference, SE, users."""
    return (rf"new (0\.\d{{4}}) is {verb} the live version {re.escape(live)} \((0\.\d{{4}})\) by more than its "
            r"paired SE: new - live = ([+-]0\.\d{4}), paired SE (0\.\d{4}) \((\d+) valid users\)")


def test_a_retrain_better_than_the_live_version_on_the_new_data_passes_and_is_recorded(
        gated: dict[str, Any]) -> None:
    assert gated["code2"] == 0, gated["out2"]
    art, weak, better = gated["art"], gated["weak"], gated["better"]
    assert better != weak
    manifest = Manifest.load(art / str(better) / MANIFEST)
    reg = manifest.to_dict()["checks"]["regression"]
    # the live (weak) version replayed on the stage gate's validation users of the grown data, beside the new one
    assert manifest.serving is not None and manifest.serving.users == 69  # every user of the grown data but one
    assert reg["live_version"] == weak and reg["result"] == "passed" and reg["rule"] == LIVE_RULE
    assert reg["split"] == "valid" and reg["users"] == 69 and reg["paired_se"] > 0
    assert reg["new"] - reg["live"] > reg["paired_se"]
    assert reg["compared"] == ("served NDCG@10 on this version's data (new retrieval+prerank+rerank, "
                               "live retrieval+prerank+rerank)")
    m = re.search(figures("not worse than", weak), gated["out2"])
    assert m is not None, gated["out2"]
    assert [float(x) for x in m.groups()[:4]] == pytest.approx(
        [reg["new"], reg["live"], reg["new"] - reg["live"], reg["paired_se"]], abs=6e-5)
    # shown with the other gate rows: `recsys evaluate --artifacts` and GET /v1/version
    code, out = run_both(["evaluate", "--artifacts", str(art), "--users", "5"])
    assert code == 0 and f"regression check vs live {weak}: passed: served NDCG@10 on this version's data" in out
    with TestClient(create_app(Settings(artifacts=art))) as c:  # type: ignore[call-arg]
        body = c.get("/v1/version").json()
    assert body["model_version"] == better and body["regression"] == pytest.approx(reg)


def test_a_retrain_worse_than_the_live_version_on_the_new_data_is_refused(gated: dict[str, Any]) -> None:
    out, better = gated["out3"], gated["better"]
    assert gated["code3"] == 1, out
    assert read_current(gated["art"]) == better  # CURRENT unchanged
    m = re.search(r"check failed, CURRENT unchanged .*: worse than the live version: served NDCG@10 on this "
                  r"version's data \(new retrieval\S*, live retrieval\S*\): "
                  + figures("worse than", str(better)), out)
    assert m is not None, out
    new, live, diff, se = (float(x) for x in m.groups()[:4])
    assert new < live and diff < -se and m.group(5) == "69"
    # --keep-runs 0 after the refusal: the refused run's folders are gone, the two versions' runs stay
    work, art = gated["work"], gated["art"]
    named = {Path(str(Manifest.load(art / v / MANIFEST).retrieval.source)).parent.name
             for v in (gated["weak"], better)}
    assert len(named) == 2 and "retrain: pruned 1 run(s)" in out
    assert {p.name for p in (work / "checkpoints").iterdir()} == named == {p.name for p in (work / "data").iterdir()}


@pytest.mark.parametrize("scheme", ["tail", "holdout", "in-sample"])
def test_the_retriever_warm_starts_only_from_the_live_versions_ranking_fold_retriever(
        scheme: str, loop: dict[str, Any], tmp_path: Path) -> None:
    """tail: the live served retriever (trained with the holdout); the older holdout scheme: the fold
    retriever its pre-ranker recorded as upstream; in-sample lists: none (its retriever trained on the tail)."""
    m1 = loop["m1"]
    ret, pre, up = tmp_path / "ret", tmp_path / "pre", tmp_path / "up"
    shutil.copytree(str(m1.retrieval.source), ret)
    shutil.copytree(str(m1.prerank.source), pre)
    upstream = up if scheme == "holdout" else ret

    def rewrite(path: Path, change: Any) -> None:
        payload = torch.load(path, weights_only=True)
        change(payload["extra"])
        torch.save(payload, path)

    rewrite(ret / "checkpoint.pt", lambda e: e.update(holdout=TAIL_HOLDOUT if scheme == "tail" else 0))
    rewrite(pre / "prerank.pt", lambda e: e["retrieval"].update(upstream=str(upstream)))
    root = tmp_path / "artifacts"
    (root / loop["first"]).mkdir(parents=True)
    d = json.loads((loop["art"] / loop["first"] / MANIFEST).read_text())
    d["retrieval"]["source"], d["prerank"]["source"] = str(ret), str(pre)
    (root / loop["first"] / MANIFEST).write_text(json.dumps(d))
    set_current(root, loop["first"])
    live = live_checkpoints(root)
    assert isinstance(live, LiveCheckpoints) and live.prerank == str(pre)
    assert live.upstream == (None if scheme == "in-sample" else str(upstream))


RUNS = [f"2026010{i}T000000-0000000{i}" for i in range(6)]  # run_name()s, oldest first


def fake_work(loop: dict[str, Any], tmp_path: Path, refs: dict[str, tuple[str, str]]) -> tuple[Path, Path]:
    """An artifacts root with one version per `refs` entry (name -> (run of its data, run of its
    checkpoints)), the last one CURRENT, and a WORK with RUNS (data and checkpoints) plus a folder
    that is no run."""
    root, work = tmp_path / "artifacts", tmp_path / "work"
    for r in RUNS:
        for folder in ("data", "checkpoints"):
            (work / folder / r).mkdir(parents=True)
    (work / "checkpoints" / "mine").mkdir()
    template = json.loads((loop["art"] / loop["first"] / MANIFEST).read_text())
    for i, (name, (data_run, ckpt_run)) in enumerate(refs.items()):
        d = json.loads(json.dumps(template))
        d["version"], d["created_at"] = name, f"2026-01-0{i + 1}T00:00:00+00:00"
        d["data"]["spec"] = f"parquet:{work / 'data' / data_run}"
        for stage in ("retrieval", "prerank", "rerank"):
            d[stage]["source"] = str(work / "checkpoints" / ckpt_run / stage)
        (root / name).mkdir(parents=True)
        (root / name / MANIFEST).write_text(json.dumps(d))
        set_current(root, name)
    return root, work


def runs_left(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "checkpoints").iterdir())


def test_prune_keeps_the_runs_kept_versions_name_and_the_newest(loop: dict[str, Any], tmp_path: Path) -> None:
    # a rollback target trained on run 0's checkpoints with run 1's data, the live version on run 3
    root, work = fake_work(loop, tmp_path, {"old": (RUNS[1], RUNS[0]), "live": (RUNS[3], RUNS[3])})
    assert prune_runs(root, work, 2) == [RUNS[2]]  # runs 4 and 5: the newest two
    assert runs_left(work) == [*RUNS[:2], *RUNS[3:], "mine"]
    assert sorted(p.name for p in (work / "data").iterdir()) == [*RUNS[:2], *RUNS[3:]]
    assert prune_runs(root, work, 0) == RUNS[4:]  # --keep-runs 0: only what a version names
    # a version whose manifest does not load: its runs cannot be known, nothing is pruned
    (root / "old" / MANIFEST).write_text(json.dumps({"version": "old", "created_at": "2026-01-01T00:00:00+00:00"}))
    assert prune_runs(root, work, 0) == [] and runs_left(work) == [RUNS[0], RUNS[1], RUNS[3], "mine"]


@pytest.mark.parametrize(("export_exit", "pruned"), [(0, True), (1, True), (2, False)])
def test_retrain_prunes_work_after_a_publish_and_after_a_refusal(
        export_exit: int, pruned: bool, loop: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, work = fake_work(loop, tmp_path, {"live": (RUNS[0], RUNS[0])})
    monkeypatch.setattr(recsys_cli.main, "main", lambda argv: export_exit if argv[0] == "export" else 0)
    code, out = run(["retrain", "--artifacts", str(root), "--data", loop["grown"], "--work", str(work), *RETRAIN,
                     "--keep-runs", "2"])
    assert code == export_exit
    this = re.search(r"-> parquet:.*/data/([^/\s]+)", out)
    assert this is not None and (work / "data" / this.group(1)).is_dir()  # the newest run: kept
    left = sorted(p.name for p in (work / "data").iterdir())
    if pruned:  # run 0: the live version's; run 5 and this run: the newest two
        assert left == sorted([RUNS[0], RUNS[5], this.group(1)]) and runs_left(work) == [RUNS[0], RUNS[5], "mine"]
        assert f"retrain: pruned 4 run(s) of {work}: {', '.join(RUNS[1:5])}" in out
    else:  # a failed step: nothing pruned
        assert left == sorted([*RUNS, this.group(1)]) and "pruned" not in out
