"""`recsys demo` (the README's first command) end to end on tiny data, without serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from service.artifacts import load_current
from training.data.sources import load
from training.data.splits import LeaveOneOut
from training.stages.prerank.folds import tail_holdout


def test_demo_publishes_a_servable_version(tmp_path: Path) -> None:
    art = tmp_path / "artifacts"
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_cli", "demo", "--data", "synthetic:users=200,items=80",
         "--minutes", "0.1", "--epochs", "1", "--out", str(tmp_path / "runs"), "--artifacts", str(art),
         "--no-serve"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "popularity" in proc.stdout and "sasrec(M=1) alone" in proc.stdout  # M = 1 by default
    # the default ranking data: the served retriever is its own ranking fold (never trained on each
    # user's last H training items, H from the data: tail_holdout), and the rankers learn on those lists
    ret = torch.load(tmp_path / "runs" / "retrieval" / "checkpoint.pt", weights_only=False)["extra"]
    h = tail_holdout(LeaveOneOut(load("synthetic:users=200,items=80")))
    assert ret["ranking_data"] == "tail" and ret["holdout"] == h and "init_from" not in ret
    assert "pre-rank training examples" in proc.stdout and "(tail lists)" in proc.stdout
    assert "pair prior refit (towers frozen" in proc.stdout + proc.stderr  # the trainer's progress: stderr
    version = load_current(art)
    assert version.manifest.to_dict()["item_count"] == 80
    # evaluate prints the served-cut table of the published version (test users), `*` on what is served
    evaluated = proc.stdout[proc.stdout.rindex("$ recsys evaluate --artifacts"):proc.stdout.rindex("\n== ")]
    stages = version.manifest.to_dict()["serving"]["stages"]
    assert f"199 test users, served by default: {' -> '.join(stages)} (*)" in evaluated
    rows = [line for line in evaluated.splitlines() if line.startswith(("retrieval", "+ prerank", "+ rerank"))]
    assert len(rows) == 3 and sum("*" in r for r in rows) == 1
    assert "*" in rows[len(stages) - 1]
    # then ONE table: baselines, SASRec alone, every served cut; and the verdict against the baselines
    final = proc.stdout[proc.stdout.rindex("\n== "):]
    assert f"== {version.version}: 199 test users ==" in final
    ndcg = {}
    for line in final.splitlines():
        name = line.split("  ")[0]
        if name in ("popularity", "last-item", "item2item alone", "retrieval", "+ prerank", "+ rerank",
                    "+ rerank (served)", "retrieval (served)", "+ prerank (served)", "sasrec(M=1) alone"):
            ndcg[name] = float(line.split()[-4])  # columns: HR@10 NDCG@10 HR@50 NDCG@50 Coverage@10
    served = next(name for name in ndcg if name.endswith("(served)"))
    assert served.startswith({"retrieval": "retrieval", "prerank": "+ prerank", "rerank": "+ rerank"}[stages[-1]])
    best = max((n for n in ("popularity", "last-item", "item2item alone") if n in ndcg), key=ndcg.__getitem__)
    (line,) = [line for line in final.splitlines() if line.startswith("verdict:")]
    # evaluate's paired rule: a win needs more than one paired SE, so only a lower mean fixes the verdict
    assert f"{best} {ndcg[best]:.4f}" in line or f"{best} ({ndcg[best]:.4f}" in line
    if ndcg[served] <= ndcg[best]:
        assert line.startswith(f"verdict: BELOW BASELINE: the served cut ({served}, NDCG@10 {ndcg[served]:.4f}) "
                               f"does not beat {best} ({ndcg[best]:.4f}, ")
    assert "the publish gate (validation users) found it" in line  # the manifest's serving.baselines
