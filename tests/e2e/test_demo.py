"""`recsys demo` (the README's first command) end to end on tiny data, without serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.artifacts import load_current


def test_demo_publishes_a_servable_version(tmp_path: Path) -> None:
    art = tmp_path / "artifacts"
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_cli", "demo", "--data", "synthetic:users=200,items=80",
         "--minutes", "0.1", "--epochs", "1", "--out", str(tmp_path / "runs"), "--artifacts", str(art),
         "--no-serve"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "popularity" in proc.stdout and "ml-sasrec(M=2)" in proc.stdout
    version = load_current(art)
    assert version.manifest.to_dict()["item_count"] == 80
    # it ends with the served-cut table of the published version (test users), `*` on what is served
    table = proc.stdout[proc.stdout.rindex("$ recsys evaluate --artifacts"):]
    stages = version.manifest.to_dict()["serving"]["stages"]
    assert f"199 test users, served by default: {' -> '.join(stages)} (*)" in table
    rows = [line for line in table.splitlines() if line.startswith(("retrieval", "+ prerank", "+ rerank"))]
    assert len(rows) == 3 and sum("*" in r for r in rows) == 1
    assert "*" in rows[len(stages) - 1]
