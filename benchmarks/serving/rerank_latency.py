"""Re-rank latency of rerank.onnx at batch 1: ONNX Runtime vs eager PyTorch.

    python benchmarks/serving/rerank_latency.py [--lengths 30,50,100] [--reps 300] [--item-dim 32 --pv-dim 16]

Latency does not depend on the weights, so freshly initialised models of the default PRM
shape (d_model 64, 2 heads, 2 layers, FFN 128, max_len 100) are exported and timed: PRM,
PRM-BASE (no PV; its ONNX graph still takes a 1-wide pv input) and the pointwise MLP
(128, 64). Both runtimes get one thread (the serving set-up: one request per core). Lists are
full (no padding). Reports median and p99 per call over --reps calls after a warm-up, the
ORT / eager ratio of medians, and the worst |ONNX - eager| of the parity check on padded lists.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from models.prm import PRM, PointwiseMLP, PointwiseMLPConfig, PRMConfig, RerankModel
from training.publish.onnx.rerank import INPUT_NAMES, export_rerank, random_lists, rerank_parity
from training.report import save_benchmark

RESULTS = Path(__file__).resolve().parent / "results"


def timings(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median, p99) in milliseconds over `reps` calls after a warm-up."""
    for _ in range(max(5, reps // 10)):
        fn()
    out = np.empty(reps)
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    ms = out * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="30,50,100")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--item-dim", type=int, default=32)
    ap.add_argument("--pv-dim", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "rerank_latency.txt"))
    args = ap.parse_args()
    if args.reps < 200:
        raise SystemExit(f"--reps must be >= 200 for a meaningful p99, got {args.reps}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    F, P = args.item_dim, args.pv_dim
    models: dict[str, RerankModel] = {
        "PRM": PRM(PRMConfig(F, P)).eval(),
        "PRM-BASE": PRM(PRMConfig(F, 0)).eval(),
        "MLP": PointwiseMLP(PointwiseMLPConfig(F, P)).eval(),
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    rng = np.random.default_rng(0)
    head = (f"{'model':<9} {'L':>4}  {'ORT p50 ms':>10}  {'ORT p99 ms':>10}  {'eager p50 ms':>12}  "
            f"{'eager p99 ms':>12}  {'ORT/eager p50':>13}  {'max |diff|':>10}")
    lines = [head, "-" * len(head)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = export_rerank(model, Path(tmp) / name)
            parity = rerank_parity(model, path)
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for L in (int(x) for x in args.lengths.split(",")):
                feeds = random_lists(model, 1, L, rng)
                feeds["mask"][:] = True  # full lists: the worst case
                tensors = tuple(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)

                def onnx() -> None:
                    sess.run(None, feeds)

                def eager() -> None:
                    with torch.inference_mode():
                        model(*tensors)

                o50, o99 = timings(onnx, args.reps)
                e50, e99 = timings(eager, args.reps)
                lines.append(f"{name:<9} {L:>4}  {o50:>10.3f}  {o99:>10.3f}  {e50:>12.3f}  {e99:>12.3f}  "
                             f"{o50 / e50:>13.2f}  {parity:>10.1e}")
                print(lines[-1], file=sys.stderr, flush=True)
    setting = (
        f"batch 1, full lists, item_dim {F}, pv_dim {P} (PRM-BASE: 1-wide ignored pv), PRM d_model 64 / 2 heads / "
        f"2 layers / FFN 128, MLP (128, 64); 1 intra-op thread for ORT and torch; {args.reps} timed calls each\n"
        f"onnxruntime {ort.__version__}, torch {torch.__version__}; shared 2-core machine (other jobs running)"
    )
    text = setting + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        save_benchmark(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
