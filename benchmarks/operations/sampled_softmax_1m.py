"""Sampled softmax with logQ on a 1M-item catalog: what a training step costs, per sampler.

    python benchmarks/operations/sampled_softmax_1m.py --items 1000000 --steps 5

A full softmax over 1M items at every position of a (B, L) batch needs a (B * L, N + 1) logit
matrix (B = 32, L = 50: 1600 x 1M floats = 6.4 GB, and as much again for its gradient), so
large catalogs train on K shared negatives instead. This times NegativeSampler.draw (inverse
CDF, O(K log N)) and one SASRec training step (forward, max-fusion loss with the logQ
correction, backward, AdamW) on random histories over a Zipf(1.1) popularity; it measures cost,
not quality. step_ms - fwd+bwd_ms is the AdamW update, dense over the whole (N + 1, D) table.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from models.sasrec import SASRecConfig
from training.stages.retrieval.encoders import build_model
from training.report import table
from training.stages.retrieval.losses import NegativeSampler, encoder_loss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--negatives", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--maxlen", type=int, default=50)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    counts = np.r_[0, np.floor(1e6 / np.arange(1, a.items + 1) ** 1.1) + 1]  # Zipf-like target counts
    torch.manual_seed(0)
    model = build_model(SASRecConfig(num_items=a.items, maxlen=a.maxlen, dropout=0.2, num_launchers=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows: dict[str, dict[str, float]] = {}
    for kind in ("uniform", "popularity", "in-batch"):
        sampler = NegativeSampler(kind, counts, 0 if kind == "in-batch" else a.negatives)  # type: ignore[arg-type]
        p = counts / counts.sum()
        draw_ms, step_ms, fb_ms = [], [], []
        for _ in range(a.steps + 1):
            seq = rng.choice(a.items + 1, size=(a.batch, a.maxlen + 1), p=None).astype(np.int64)
            seq[seq == 0] = 1
            x, y = torch.from_numpy(seq[:, :-1]), torch.from_numpy(seq[:, 1:])
            if kind == "in-batch":  # targets drawn by popularity, as real batches are
                y = torch.from_numpy(rng.choice(a.items + 1, size=y.shape, p=p))
            t0 = time.perf_counter()
            neg, log_q = sampler.draw(rng, y.numpy())
            t1 = time.perf_counter()
            user = model(x)  # (B, L, 1, D)
            loss, _ = encoder_loss(model, user.flatten(0, 1), y.flatten(), neg, log_q)
            opt.zero_grad()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            draw_ms.append((t1 - t0) * 1e3)
            step_ms.append((t3 - t1) * 1e3)
            fb_ms.append((t2 - t1) * 1e3)
        rows[kind] = {"negatives": float(neg.numel()), "draw_ms": float(np.median(draw_ms[1:])),
                      "fwd+bwd_ms": float(np.median(fb_ms[1:])), "step_ms": float(np.median(step_ms[1:])),
                      "seq/s": a.batch / (float(np.median(step_ms[1:])) / 1e3)}
    print(f"# {a.items} items, D = 64, batch {a.batch} x maxlen {a.maxlen}, K = {a.negatives} shared negatives "
          f"(in-batch: the batch's distinct targets), {a.threads} thread(s), median of {a.steps} steps")
    print(table(rows, ("negatives", "draw_ms", "fwd+bwd_ms", "step_ms", "seq/s")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
