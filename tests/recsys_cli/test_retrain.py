"""`recsys retrain` (recsys_cli/commands/retrain.py): by default each stage starts from the live
version's checkpoints (item rows by external id: tests/training/test_warm_start.py), each run writes
its own checkpoint folders, a checkpoint that does not fit falls back to training anew in one line,
and --from-scratch runs the steps it always ran. The loop on a simulated world: tests/e2e/test_online_loop.py."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import recsys_cli.main
from recsys_cli.main import main as cli
from service.contract.layout import MANIFEST, read_current
from service.contract.manifest import Manifest
from tests.training.test_warm_start import GONE, NEW_ITEMS, write_base, write_grown
from training.checkpoints import read_checkpoint

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
    up1 = Path(str(m1.retrieval.source)).parent / "upstream"
    assert (f"retrain: warm start from the live version {loop['first']}: fold retriever <- {up1}, "
            f"pre-ranker <- {m1.prerank.source}, re-ranker <- {m1.rerank.source if m1.rerank else None}") in out
    # the fold retriever: every item both data sets have copied by id, the new ones fresh, the gone one dropped
    assert (f"train retrieval: warm start from {up1}: 39 items rows copied by id, {len(NEW_ITEMS)} rows new to "
            "the table initialised fresh, 1 rows of the checkpoint's table dropped") in out
    assert re.search(rf"train prerank: warm start from {re.escape(str(m1.prerank.source))}: \d+ items rows copied", out)
    assert f"train rerank: warm start from {m1.rerank.source if m1.rerank else None}: every weight copied" in out
    # what each new checkpoint records
    run2 = Path(str(m2.retrieval.source)).parent
    up = read_checkpoint(run2 / "upstream" / "checkpoint.pt").extra
    assert up["warm_start"] == {"from": str(up1), "keys": "items", "copied": 39, "new": 5, "dropped": 1}
    assert GONE not in up["item_ids"] and set(NEW_ITEMS) <= set(up["item_ids"])
    assert read_checkpoint(run2 / "retrieval" / "checkpoint.pt").extra["init_from"] == str(run2 / "upstream")
    pre = read_checkpoint(run2 / "prerank" / "prerank.pt").extra
    assert pre["warm_start"]["from"] == m1.prerank.source and pre["warm_start"]["copied"] > 0
    assert read_checkpoint(run2 / "rerank" / "prm.pt").extra["warm_start"]["from"] == str(m1.rerank.source if m1.rerank else None)
    # each run has its own checkpoint folders: the live version's were read, never overwritten
    assert run2 != loop["ckpt_root"] and digests(loop["ckpt_root"]) == loop["before"]


def test_a_checkpoint_that_does_not_fit_falls_back_to_training_anew(loop: dict[str, Any], tmp_path: Path) -> None:
    up1 = Path(str(loop["m1"].retrieval.source)).parent / "upstream"
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
    assert sum("--warm-from" in s for s in warm) == 3  # fold retriever, pre-ranker, re-ranker
    assert stripped == scratch
    assert [s[:2] for s in scratch] == [["train", "retrieval"], ["train", "retrieval"], ["train", "prerank"],
                                        ["train", "rerank"], ["export", "--data"]]
