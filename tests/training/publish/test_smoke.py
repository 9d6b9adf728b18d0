"""One smoke check for export, reindex, rollback and serving (issue 15, finding 2).

`recsys rollback --to V` used to accept a version with `prerank_features.json = {}` (exit 0,
CURRENT flipped) that `recsys serve` then could not start (KeyError in the Recommender's feature
encoder, exit 3): training/artifacts.smoke now runs service/smoke.py, which builds the
Recommender and sends a request through every stage, as the service does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.test_api import artifacts_root, copy_version  # noqa: F401  (module fixture)
from training.publish.versions import CURRENT, PublishError, read_current, rollback, set_current, smoke
from service.contract.layout import PRERANK_FEATURES


@pytest.fixture()
def root(artifacts_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    r = tmp_path / "artifacts"
    r.mkdir()
    copy_version(r, artifacts_root / "v1", "v1")
    copy_version(r, artifacts_root / "v1", "v2")
    (r / "v1" / PRERANK_FEATURES).write_text("{}")  # loads as JSON, the encoder cannot use it
    set_current(r, "v2")
    return r


def test_rollback_refuses_a_version_the_service_cannot_build(root: Path) -> None:
    with pytest.raises(PublishError, match="version v1 cannot be served: .*prerank_features.json"):
        rollback(root, "v1")
    assert read_current(root) == "v2"
    proc = subprocess.run([sys.executable, "-m", "recsys_cli", "rollback", "--artifacts", str(root), "--to", "v1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "refused, CURRENT unchanged" in proc.stderr
    assert read_current(root) == "v2"


def test_smoke_runs_a_request_through_the_recommender(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smoke(root / "v2")  # a good version passes
    from service.pipeline import Recommender

    def broken(self: Recommender, *args: object) -> object:
        raise ValueError("re-ranker graph does not run")

    monkeypatch.setattr(Recommender, "_rerank", broken)  # the stage falls back: not servable as published
    with pytest.raises(PublishError, match=r"served by 'prerank;rerank_failed'"):
        smoke(root / "v2")


@pytest.mark.parametrize("bad", ["../v2", "v2/../v2", ".tmp-v2"])
def test_current_names_are_validated(root: Path, bad: str) -> None:
    (root / CURRENT).write_text(bad + "\n")
    with pytest.raises(PublishError, match="invalid version name"):
        read_current(root)


def test_serve_fails_with_one_line_and_exit_2_on_an_unservable_version(root: Path) -> None:
    set_current(root, "v1")
    proc = subprocess.run([sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(root), "--port", "1"],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "RECSYS_ALLOW_ANONYMOUS_WRITES": "1"})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("recsys serve: error:")]
    assert len(errors) == 1 and PRERANK_FEATURES in errors[0] and "Traceback" not in proc.stderr


class _Payload:
    """Unpickling this runs code: what weights_only=False would do for a planted checkpoint."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, ("touch pwned-by-checkpoint",)


@pytest.mark.parametrize("stage", ["retrieval", "prerank", "rerank"])
def test_checkpoints_load_with_weights_only(tmp_path: Path, stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from training.checkpoints import FILES, CheckpointError, load_checkpoint
    from training.data.sources import load

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"kind": "retrieval", "model": "inttower", "evil": _Payload()}, folder / FILES[stage])  # type: ignore[index]
    with pytest.raises(CheckpointError, match="Weights only load failed"):
        load_checkpoint(folder, stage, load("synthetic:users=40,items=30"))  # type: ignore[arg-type]
    assert not (tmp_path / "pwned-by-checkpoint").exists()
