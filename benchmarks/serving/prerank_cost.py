"""Serving cost of the pre-rankers per candidate (issue #4): one user x C candidates.

    OMP_NUM_THREADS=1 python benchmarks/serving/prerank_cost.py [--candidates 200] [--reps 2000]

Each request does what serving would do, single-threaded:
- two-tower / IntTower: ONNX Runtime over the user part (one row) -> user heads, then
  service.prerank.score_candidates (NumPy) against the precomputed item heads of the
  candidates (prerank_items.npy);
- DCN-v2: nothing is precomputable, so ONNX Runtime runs the full model over C
  (user, candidate) rows (the user row repeated, the item rows gathered from the catalog).
Weights do not change the cost, so the models are the ml-100k configurations, untrained.
Times are medians over `reps` requests after warm-up.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.layers import Fields  # noqa: E402
from service.prerank import score_candidates  # noqa: E402
from training.stages.prerank import train as pr  # noqa: E402
from training.publish.onnx.prerank import export_prerank  # noqa: E402
from training.stages.prerank.data import build_ctr_data  # noqa: E402
from training.data.sources import load  # noqa: E402
from training.data.splits import CTRSplit  # noqa: E402

ML100K = f"movielens:{ROOT.parent / 'shared' / 'data' / 'ml-100k'}"


class FullModel(nn.Module):
    """DCN-v2 over six tensors, for ONNX export (benchmark only: DCN-v2 is never served)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, us: torch.Tensor, ud: torch.Tensor, um: torch.Tensor,
                is_: torch.Tensor, id_: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        return self.model(Fields(us, ud, um), Fields(is_, id_, im))


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def median_us(fn, reps: int) -> float:  # noqa: ANN001
    for _ in range(min(200, reps)):
        fn()
    times = np.empty(reps)
    for r in range(reps):
        t0 = time.perf_counter()
        fn()
        times[r] = time.perf_counter() - t0
    return float(np.median(times) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=ML100K)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--save", metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load(args.data)
    data = build_ctr_data(ds, CTRSplit(ds))
    C = args.candidates
    rng = np.random.default_rng(0)
    users = data.test.user
    cands = [rng.choice(np.arange(1, ds.num_items + 1), C, replace=False) for _ in range(64)]
    tmp = Path(tempfile.mkdtemp())
    rows: dict[str, dict[str, float]] = {}
    for name in ("two-tower", "inttower"):
        torch.manual_seed(0)
        model = pr.build_model(name, data.spec).eval()
        paths = export_prerank(model, data.spec, data.catalog, tmp / name)
        sess = session(Path(paths["user_onnx"]))
        items = np.load(paths["items"])
        state = {"i": 0}

        def user_part() -> np.ndarray:
            b = state["i"] % len(users.sparse)
            feeds = {"user_sparse": users.sparse[b : b + 1], "user_dense": users.dense[b : b + 1],
                     "user_multi": users.multi[b : b + 1]}
            return sess.run(None, feeds)[0][0]

        heads = user_part()

        def item_part() -> np.ndarray:
            state["i"] += 1
            return score_candidates(heads, items, cands[state["i"] % 64])

        def request() -> np.ndarray:
            state["i"] += 1
            return score_candidates(user_part(), items, cands[state["i"] % 64])

        cfg = model.cfg
        rows[name] = {"user": median_us(user_part, args.reps), "items": median_us(item_part, args.reps),
                      "total": median_us(request, args.reps), "shape": f"user {tuple(heads.shape)} item {items.shape[1:]}",
                      "params": sum(p.numel() for p in model.parameters()), "hidden": cfg.hidden}

    torch.manual_seed(0)
    dcn = pr.build_model("dcnv2", data.spec).eval()
    full = FullModel(dcn).eval()
    u, it = users.take(np.zeros(2, dtype=np.int64)), data.catalog.take(np.array([1, 2]))
    example = tuple(torch.from_numpy(a) for a in (*u, *it))
    names = ["user_sparse", "user_dense", "user_multi", "item_sparse", "item_dense", "item_multi"]
    torch.onnx.export(full, example, tmp / "dcnv2.onnx", input_names=names, output_names=["logits"],
                      dynamic_axes={**{n: {0: "batch"} for n in names}, "logits": {0: "batch"}}, dynamo=False)
    sess = session(tmp / "dcnv2.onnx")
    state = {"i": 0}

    def dcn_request() -> np.ndarray:
        state["i"] += 1
        b = state["i"] % len(users.sparse)
        c = cands[state["i"] % 64]
        ur = np.repeat(np.array([b]), C)
        feeds = dict(zip(names, (users.sparse[ur], users.dense[ur], users.multi[ur],
                                 data.catalog.sparse[c], data.catalog.dense[c], data.catalog.multi[c])))
        return sess.run(None, feeds)[0]

    rows["dcnv2"] = {"user": float("nan"), "items": float("nan"), "total": median_us(dcn_request, max(args.reps // 10, 50)),
                     "shape": "full model over C rows", "params": sum(p.numel() for p in dcn.parameters()),
                     "hidden": dcn.cfg.hidden}

    base = rows["two-tower"]["total"] / C
    lines = [
        f"serving cost per candidate — one user x {C} candidates, {ds.name} feature spec, 1 thread, "
        f"median of {args.reps} requests (DCN-v2: {max(args.reps // 10, 50)})",
        f"onnxruntime {ort.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}",
        "",
        f"{'model':<10} {'user part µs':>13} {'item scoring µs':>16} {'request µs':>11} {'µs/candidate':>13} "
        f"{'vs two-tower':>13}  shapes",
        "-" * 110,
    ]
    for name, r in rows.items():
        per = r["total"] / C
        lines.append(f"{name:<10} {r['user']:>13.1f} {r['items']:>16.1f} {r['total']:>11.1f} {per:>13.3f} "
                     f"{per / base:>12.2f}x  {r['shape']}")
    text = "\n".join(lines)
    print(text)
    if args.save:
        Path(args.save).write_text(text + "\n")


if __name__ == "__main__":
    main()
