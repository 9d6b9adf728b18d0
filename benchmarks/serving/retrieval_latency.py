"""Encode latency of the retrieval model: ONNX Runtime vs eager PyTorch.

    python benchmarks/serving/retrieval_latency.py [--checkpoint runs/sweep/M4-copy_last] [--launchers 1,4,8]

Latency does not depend on the weights, so without --checkpoint freshly initialised models of
the ml-100k shape (1,682 items, D = 64, 2 blocks, maxlen 50) are exported and timed. Both
runtimes get one intra-op thread (the serving set-up: one request per core). Histories are
full length (maxlen), the worst case. Reports median and p99 per call, and ORT / eager ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from models.sasrec import MultiLauncherSASRec, SASRecConfig
from training.publish.onnx.retrieval import export_retrieval, retrieval_parity
from training.report import table
from training.checkpoints import checkpoint_path, read_checkpoint


def timings(fn, reps: int) -> tuple[float, float]:
    for _ in range(max(3, reps // 10)):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    ms = np.array(out) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[], help="checkpoint folder (repeatable)")
    ap.add_argument("--launchers", default="0,1,4,8", help="M values to time when no checkpoint is given")
    ap.add_argument("--items", type=int, default=1682)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models: dict[str, MultiLauncherSASRec] = {}
    for path in args.checkpoint:
        # timing only, no data set to check against: read and built, not fingerprint-checked
        model = read_checkpoint(checkpoint_path(path, "retrieval")).build()  # type: ignore[assignment]
        models[Path(path).name] = model
    if not models:
        torch.manual_seed(0)
        for m in map(int, args.launchers.split(",")):
            cfg = SASRecConfig(num_items=args.items, num_launchers=m)
            models["sasrec" if m == 0 else f"M={m}"] = MultiLauncherSASRec(cfg).eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    rows: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            onnx_path, _ = export_retrieval(model, Path(tmp) / name)
            parity = retrieval_parity(model, onnx_path)
            sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            for B in map(int, args.batches.split(",")):
                seq = rng.integers(1, model.config.num_items + 1, size=(B, model.config.maxlen)).astype(np.int64)
                tseq = torch.from_numpy(seq)

                def eager() -> None:
                    with torch.inference_mode():
                        model.encode_user(tseq)

                def onnx() -> None:
                    sess.run(None, {"item_seq": seq})

                reps = args.reps if B == 1 else max(20, args.reps // 4)
                e50, e99 = timings(eager, reps)
                o50, o99 = timings(onnx, reps)
                rows[f"{name} B={B}"] = {
                    "eager p50 ms": e50, "eager p99 ms": e99, "ORT p50 ms": o50, "ORT p99 ms": o99,
                    "ORT/eager p50": o50 / e50, "max |diff|": parity,
                }
                print(f"{name} B={B}: eager {e50:.3f} ms, ORT {o50:.3f} ms", file=sys.stderr)
    cols = ("eager p50 ms", "eager p99 ms", "ORT p50 ms", "ORT p99 ms", "ORT/eager p50", "max |diff|")
    print(table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
