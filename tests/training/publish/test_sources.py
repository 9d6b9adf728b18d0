"""The checkpoints a version is built from (training/publish/sources.py): folders trained before
the one checkpoint format still load, check against their exported item arrays and so export."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.training.publish.test_build import TINY, make_checkpoints, one_thread  # noqa: F401
from tests.training.test_checkpoints import same_weights
from training.checkpoints import FILES, read_checkpoint
from training.publish.sources import check_upstream, load_sources


def test_folders_written_in_the_old_layouts_load_as_sources(tmp_path: Path) -> None:
    ret, pre, rer = make_checkpoints(TINY, tmp_path / "new")
    want = load_sources(TINY, ret, pre, rer)
    old = tmp_path / "old"
    for folder in (ret, pre, rer):
        shutil.copytree(folder, old / folder.name)
    for stage, folder in (("retrieval", "ret"), ("prerank", "pre"), ("rerank", "re")):
        path = old / folder / FILES[stage]  # type: ignore[index]
        c = read_checkpoint(path)
        if stage == "retrieval":
            payload = {"kind": "retrieval", "encoder": c.name, "model_config": c.config.to_dict(),
                       "state_dict": c.state_dict, "fingerprint": c.fingerprint, **c.extra}
        elif stage == "prerank":
            payload = {"model": c.name, "config": c.config.to_dict(), "state_dict": c.state_dict,
                       "fingerprint": c.fingerprint, **c.extra}
        else:
            payload = {"kind": "rerank", "name": c.name, "config_type": type(c.config).__name__,
                       "config": c.config.to_dict(), "state_dict": c.state_dict, "fingerprint": c.fingerprint,
                       **c.extra}
        torch.save(payload, path)
    got = load_sources(TINY, old / "ret", old / "pre", old / "re")
    assert check_upstream(got) is not None  # the exported heads / features still match the checkpoints
    for a, b in ((got.retrieval, want.retrieval), (got.prerank, want.prerank), (got.rerank, want.rerank)):
        assert same_weights(a, b)
    assert got.pre_ckpt.extra == want.pre_ckpt.extra and got.rerank_ckpt is not None
    assert got.rerank_ckpt.name == "prm" and got.ret_ckpt.extra.keys() == want.ret_ckpt.extra.keys()
