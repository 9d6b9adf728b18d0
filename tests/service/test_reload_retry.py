"""Reloading (issue 23, findings 5 and 6): a version that failed to load is retried once its
folder changes, every worker reports the version CURRENT names beside the one it serves, a
version folder that resolves outside the artifacts root is refused, and a 409 names the version
and the file but never a file's content or an absolute path (service/reloader.py,
service/artifacts.py, service/contract/layout.py).

On main: a folder completed in place after CURRENT named it was never picked up by a running
worker (until an admin reload), nothing reported the drift, a symlinked version folder was
served, and the 409 of a CURRENT pointed at another file quoted its first 256 bytes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.artifacts import ArtifactError, load_current
from service.contract.layout import CATALOG, CURRENT, INDEX_FAISS
from service.core.config import Settings
from service.main import create_app
from tests.service.test_api import API_KEY, artifacts_root, copy_version  # noqa: F401  (module fixtures)
from training.publish.versions import set_current

POLL = 0.3
FAILED = 'recsys_reloads_total{result="failed"}'


@pytest.fixture()
def root(artifacts_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    r = tmp_path / "artifacts"
    r.mkdir()
    copy_version(r, artifacts_root / "v1", "v1")
    set_current(r, "v1")
    return r


def _metric(c: TestClient, line: str) -> float:
    for row in c.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def _incomplete_v2(root: Path, tmp_path: Path) -> Path:
    """v2 published before its index is written; returns where the index waits."""
    copy_version(root, root / "v1", "v2")
    aside = tmp_path / "index.faiss.aside"
    shutil.move(root / "v2" / INDEX_FAISS, aside)
    return aside


def test_a_failed_version_is_retried_when_its_folder_changes(root: Path, tmp_path: Path) -> None:
    aside = _incomplete_v2(root, tmp_path)
    with TestClient(create_app(Settings(artifacts=root, reload_poll_s=POLL))) as c:
        set_current(root, "v2")
        _wait(lambda: _metric(c, FAILED) >= 1, 30, "the incomplete v2 fails")
        time.sleep(3 * POLL)
        assert _metric(c, FAILED) == 1  # an unchanged folder is not loaded again at every poll
        shutil.move(aside, root / "v2" / INDEX_FAISS)  # the folder is completed in place
        took = _wait(lambda: c.get("/v1/version").json()["model_version"] == "v2", 30, "v2 served once complete")
        assert took < POLL + 3.0, f"took {took:.1f} s with a poll every {POLL} s"


def test_the_version_current_names_and_drift_are_reported(root: Path, tmp_path: Path) -> None:
    aside = _incomplete_v2(root, tmp_path)
    with TestClient(create_app(Settings(artifacts=root, reload_poll_s=POLL))) as c:
        ready = c.get("/readyz").json()
        assert (ready["model_version"], ready["current"], ready["drift"]) == ("v1", "v1", False)
        set_current(root, "v2")
        _wait(lambda: _metric(c, FAILED) >= 1, 30, "the incomplete v2 fails")
        ready = c.get("/readyz").json()
        assert (ready["status"], ready["model_version"], ready["current"], ready["drift"]) == ("ready", "v1", "v2",
                                                                                               True)
        assert _metric(c, "recsys_version_drift") == 1
        assert _metric(c, 'recsys_current_version_info{version="v2"}') == 1
        shutil.move(aside, root / "v2" / INDEX_FAISS)
        _wait(lambda: c.get("/v1/version").json()["model_version"] == "v2", 30, "v2 served once complete")
        ready = c.get("/readyz").json()
        assert (ready["model_version"], ready["current"], ready["drift"]) == ("v2", "v2", False)
        assert _metric(c, "recsys_version_drift") == 0


def test_a_version_folder_resolving_outside_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    copy_version(outside, root / "v1", "v2")
    (root / "v2").symlink_to(outside / "v2", target_is_directory=True)
    with TestClient(create_app(Settings(artifacts=root, reload_poll_s=0, api_key=API_KEY))) as c:
        set_current(root, "v2")
        r = c.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert "version v2" in detail and "outside the artifacts root" in detail and str(tmp_path) not in detail
        assert c.get("/v1/version").json()["model_version"] == "v1"
    with pytest.raises(ArtifactError, match="resolves outside the artifacts root"):
        load_current(root)


def test_409_bodies_name_the_version_and_file_never_content_or_absolute_paths(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("db-password=hunter2-SECRET\n")
    copy_version(root, root / "v1", "v3")
    data = (root / "v3" / CATALOG).read_bytes()
    (root / "v3" / CATALOG).write_bytes(data[: len(data) // 2])
    with TestClient(create_app(Settings(artifacts=root, reload_poll_s=0, api_key=API_KEY))) as c:
        (root / CURRENT).unlink()
        (root / CURRENT).symlink_to(secret)  # CURRENT pointed at a file that is not a version name
        r = c.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})
        assert r.status_code == 409
        detail = r.json()["detail"]
        assert "SECRET" not in r.text and "hunter2" not in r.text and str(tmp_path) not in r.text, detail
        assert "CURRENT" in detail and "invalid version name" in detail
        (root / CURRENT).unlink()
        set_current(root, "v3")
        r = c.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})
        assert r.status_code == 409
        detail = r.json()["detail"]
        assert "version v3" in detail and CATALOG in detail and str(tmp_path) not in r.text, detail
        assert c.get("/v1/version").json()["model_version"] == "v1"
