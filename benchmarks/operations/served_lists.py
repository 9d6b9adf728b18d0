"""The lists one code tree serves from one version folder, to compare two trees score for score.

A refactor must serve a version published before it exactly as before: dump the lists with the
old tree and with the new one, then compare the two files (`cmp`, or `--compare A B`).

    python benchmarks/operations/served_lists.py SRC_TREE VERSION_DIR OUT.json [--requests 500]
    python benchmarks/operations/served_lists.py --compare A.json B.json

SRC_TREE goes first on sys.path, so its own `service` package loads VERSION_DIR
(`service.artifacts.load_version`), runs its smoke run and replays seeded requests through
`service.pipeline.Recommender.recommend`: random histories of the version's own item ids (1-30
items), k from 1 to 39, every third request with an exclude list, every other one with explain.
Every item id, score, launcher, per-stage score and `served_by` is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def dump(src: str, folder: str, out: str, requests: int) -> None:
    sys.path.insert(0, src)
    import numpy as np

    import service
    if not str(service.__file__).startswith(src):
        raise SystemExit(f"imported {service.__file__}, not the tree {src}")
    from service.artifacts import load_version, smoke_run
    from service.pipeline import Recommender

    version = load_version(folder)
    shapes = smoke_run(version)
    rec = Recommender(version)
    rng = np.random.default_rng(0)
    ids = [str(x) for x in version.item_ids[1:]]
    rows: list[dict[str, Any]] = []
    for r in range(requests):
        hist = [ids[i] for i in rng.integers(0, len(ids), rng.integers(1, 31))]
        exclude = [ids[i] for i in rng.integers(0, len(ids), 3)] if r % 3 == 0 else None
        res = rec.recommend(hist, k=int(rng.integers(1, 40)), exclude=exclude, explain=bool(r % 2))
        rows.append({"served_by": res.served_by, "items": [
            [it.item_id, it.score, it.launcher, {k: (None if x != x else x) for k, x in it.stages.items()}]
            for it in res.items]})
    with open(out, "w") as f:
        json.dump({"smoke": {k: list(s) for k, s in shapes.items()}, "requests": rows}, f)
    print(f"{len(rows)} requests, {sum(len(r['items']) for r in rows)} items, smoke {shapes}, "
          f"served_by {sorted({r['served_by'] for r in rows})}")


def compare(a: str, b: str) -> int:
    with open(a) as fa, open(b) as fb:
        x, y = json.load(fa), json.load(fb)
    same = sum(p == q for p, q in zip(x["requests"], y["requests"]))
    print(f"smoke equal: {x['smoke'] == y['smoke']}; requests equal item for item and score for score: "
          f"{same} / {len(x['requests'])} (vs {len(y['requests'])})")
    return 0 if x == y else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("args", nargs="+", help="SRC_TREE VERSION_DIR OUT.json, or with --compare: A.json B.json")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--compare", action="store_true", help="compare two dumps; exit 1 when they differ")
    a = p.parse_args()
    if a.compare:
        return compare(*a.args)
    dump(*a.args, requests=a.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
