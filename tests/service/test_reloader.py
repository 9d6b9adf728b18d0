"""Hot swap survives corrupt versions (issue 15, finding 1) and serves exactly what the shared
smoke check passes (finding 2): service/reloader.py, service/smoke.py, service/artifacts.py.

Each corruption below escaped the loaders' narrow excepts before (BadZipFile,
UnicodeDecodeError, TypeError on `"dims": null`, KeyError from an empty feature spec), killed
the polling and pub/sub tasks for good and answered 500 on /v1/admin/reload.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.artifacts import ArtifactError, current_version, load_version
from service.core.config import Settings
from service.main import create_app
from service.notify import notify_version
from service.smoke import load_checked
from tests.service.test_api import API_KEY, artifacts_root, catalog, copy_version  # noqa: F401  (module fixtures)
from training.publish.versions import set_current
from service.contract.layout import CATALOG, CURRENT, ITEMS_NPY, MANIFEST, PRERANK_FEATURES


def _truncate_catalog(folder: Path) -> None:
    data = (folder / CATALOG).read_bytes()
    (folder / CATALOG).write_bytes(data[: len(data) // 2])


def _binary_manifest(folder: Path) -> None:
    (folder / MANIFEST).write_bytes(b"\xff\xfe\x00\x81binary\x00")


def _edit_manifest(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        m = json.loads((folder / MANIFEST).read_text())
        m.update(changes)
        (folder / MANIFEST).write_text(json.dumps(m))
    return edit


def _features(text: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / PRERANK_FEATURES).write_text(text)
    return edit


def _feature_spec_without(key: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        spec = json.loads((folder / PRERANK_FEATURES).read_text())
        del spec["user"][key]
        (folder / PRERANK_FEATURES).write_text(json.dumps(spec))
    return edit


# (name, corruption, a word the error must contain)
CORRUPTIONS: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated_catalog", _truncate_catalog, CATALOG),
    ("binary_manifest", _binary_manifest, MANIFEST),
    ("dims_null", _edit_manifest(dims=None), "dims"),
    ("empty_features", _features(""), PRERANK_FEATURES),
    ("features_object_empty", _features("{}"), PRERANK_FEATURES),
    ("features_no_sparse", _feature_spec_without("sparse"), "smoke run failed"),
]


@pytest.fixture()
def root(artifacts_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    r = tmp_path / "artifacts"
    r.mkdir()
    copy_version(r, artifacts_root / "v1", "v1")
    set_current(r, "v1")
    return r


def _corrupt(root: Path, name: str, edit: Callable[[Path], None]) -> None:
    copy_version(root, root / "v1", name)
    edit(root / name)


@pytest.mark.parametrize(("name", "edit", "word"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_every_corruption_is_one_artifact_error_naming_the_file(root: Path, name: str,
                                                               edit: Callable[[Path], None], word: str) -> None:
    _corrupt(root, name, edit)
    with pytest.raises(ArtifactError, match=re.escape(word)) as info:
        load_checked(root / name)
    assert str(root / name) in str(info.value)


def _metric(c: TestClient, line: str) -> float:
    for row in c.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


FAILED = 'recsys_reloads_total{result="failed"}'


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_polling_survives_each_corruption_then_serves_a_good_version(root: Path, catalog: list[str],  # noqa: F811
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    poll = 0.3
    for name, edit, _ in CORRUPTIONS:
        _corrupt(root, name, edit)
    copy_version(root, root / "v1", "good")
    app = create_app(Settings(artifacts=root, reload_poll_s=poll, api_key=API_KEY))
    with TestClient(app) as c, caplog.at_level(logging.ERROR, logger="service.reloader"):
        failed = 0
        for name, _, word in CORRUPTIONS:
            set_current(root, name)
            _wait(lambda: _metric(c, FAILED) > failed, 30, f"failure of {name} counted")
            failed += 1
            time.sleep(2 * poll)  # more polls of the same broken version: neither logged nor counted again
            assert _metric(c, FAILED) == failed
            assert len([r for r in caplog.records if name in r.getMessage()]) == 1
            assert c.post("/v1/recommend", json={"history": catalog[:3], "k": 3}).json()["model_version"] == "v1"
            r = c.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})  # was a 500 for these
            assert r.status_code == 409 and name in r.json()["detail"] and word in r.json()["detail"]
            failed += 1
            assert _metric(c, FAILED) == failed  # an admin retry is counted
            set_current(root, "v1")  # back to the served one before the next corruption
            time.sleep(2 * poll)
            caplog.clear()
        set_current(root, "good")
        took = _wait(lambda: c.get("/v1/version").json()["model_version"] == "good", 30, "good version served")
        assert took < poll + 3.0, f"the good version took {took:.1f} s (poll every {poll} s)"
        assert _metric(c, 'recsys_reloads_total{result="ok"}') == 1.0
        assert app.state.watcher._tasks and not any(t.done() for t in app.state.watcher._tasks)


def test_pubsub_keeps_listening_after_corrupt_versions(root: Path, redis_url: str) -> None:
    app = create_app(Settings(artifacts=root, reload_poll_s=0, redis_url=redis_url))
    with TestClient(app) as c:
        _wait(lambda: notify_version(redis_url, "v1") >= 1, 10, "subscribed")
        for i, (name, edit, _) in enumerate(CORRUPTIONS, start=1):
            _corrupt(root, name, edit)
            set_current(root, name)
            assert notify_version(redis_url, name) == 1  # still subscribed (was 0 after the first)
            _wait(lambda: _metric(c, FAILED) >= i, 30, f"failure of {name} counted")
        copy_version(root, root / "v1", "good")
        set_current(root, "good")
        assert notify_version(redis_url, "good") == 1
        _wait(lambda: c.get("/v1/version").json()["model_version"] == "good", 30, "good version served")


def test_unreadable_current_is_an_artifact_error(root: Path) -> None:
    (root / CURRENT).write_bytes(b"\xff\xfe\n")
    with pytest.raises(ArtifactError, match="CURRENT: unreadable"):
        current_version(root)
    for bad in ("../v1", ".hidden", "v1/../v1", "a b", CURRENT, ""):
        (root / CURRENT).write_text(bad + "\n")
        with pytest.raises(ArtifactError, match="invalid version name"):
            current_version(root)


@pytest.mark.parametrize("bad", ["../v0/items.npy", "/etc/passwd", ".hidden.npy", "sub/items.npy", 7, None])
def test_manifest_file_names_are_confined_to_the_version_folder(root: Path, bad: object) -> None:
    copy_version(root, root / "v1", "v2")
    m = json.loads((root / "v2" / MANIFEST).read_text())
    m["files"]["items"] = bad
    (root / "v2" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="files.items = .* not a file name inside the version folder"):
        load_version(root / "v2")


def test_a_symlink_out_of_the_version_folder_is_refused(root: Path, tmp_path: Path) -> None:
    copy_version(root, root / "v1", "v2")
    outside = tmp_path / "elsewhere.npy"
    (root / "v2" / ITEMS_NPY).rename(outside)
    (root / "v2" / ITEMS_NPY).symlink_to(outside)
    with pytest.raises(ArtifactError, match="resolves outside the version folder"):
        load_version(root / "v2")
