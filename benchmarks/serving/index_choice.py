"""Which FAISS index holds recall@100 >= 0.95 at the lowest search cost, on a version's real embeddings.

    python benchmarks/serving/index_choice.py (--artifacts DIR | --export DIR --data SPEC) [--grow N]
                                              [--queries 300] [--min-recall 0.95] [--kinds ivf,lifted,ivf4,hnsw,ivfpq]
                                              [--out FILE]

Items are the version's items.npy; queries are the retriever's user vectors (retrieval ONNX) on
the test histories of the version's data set, i.e. what the service searches. --export DIR reads
items.npy and retrieval.onnx from a folder export_retrieval wrote (before a version is published).
--grow N adds copies of trained items (with 1% noise, as benchmarks/serving/bench_versions.py --items) up
to N items. For each index kind the search parameter (nprobe, efSearch, nprobe x k_factor for
IVF-PQ) climbs a fixed ladder until recall@100 against exact search
(service.index_build.ann_recall, single vectors) reaches --min-recall; "lifted" is the IVF
`recsys export` builds (service/index_build.py: the same lists, trained on the items lifted onto
a sphere). The table gives the cheapest setting that does (and the step below it). Cost is
one serving call: search_fused of one user's M launcher vectors at k = 200, one FAISS thread,
p50 / p99 over --queries users. Also prints what SIMD level the installed FAISS dispatches to.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.index import factory_string, search_fused, set_faiss_threads  # noqa: E402
from service.index_build import IndexSpec, ann_recall, auto_nlist, build_index  # noqa: E402
from service.contract.layout import ITEMS_NPY, MANIFEST, RETRIEVAL_ONNX  # noqa: E402

LADDERS = {"nprobe": [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512],
           "efSearch": [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]}
TOP_K = 200


def simd_report() -> str:
    cfg = faiss.SIMDConfig
    lib = Path(faiss.__file__).parent
    return (f"faiss {faiss.__version__}: compile options {faiss.get_compile_options()!r}, dynamic dispatch "
            f"{cfg.has_dynamic_dispatch()}, level in use {cfg.get_level_name()}; modules "
            f"{sorted(p.name for p in lib.glob('*.so'))}")


def queries_of(onnx_path: Path, items_path: Path, spec: str, n: int, maxlen: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, M, D) user vectors of the first n test users, and items (N, D)."""
    import onnxruntime as ort

    from training.data.sources import load
    from training.data.splits import LeaveOneOut

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ds = load(spec)
    loo = LeaveOneOut(ds)
    hist = loo.histories("test", loo.eval_users[:n], maxlen=maxlen)  # (n, L), 0-padded on the left
    users = np.concatenate([sess.run(None, {"item_seq": h[None].astype(np.int64)})[0] for h in hist])
    return users, np.load(items_path)


def timed_search(index: faiss.Index, users: np.ndarray) -> tuple[float, float]:
    ms = []
    for u in users:
        t0 = time.perf_counter()
        search_fused(index, u, TOP_K)
        ms.append((time.perf_counter() - t0) * 1e3)
    ms = ms[len(ms) // 10:]
    return float(np.median(ms)), float(np.percentile(ms, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--export", type=Path)
    ap.add_argument("--data")
    ap.add_argument("--maxlen", type=int, default=50, help="with --export: the retriever's maxlen")
    ap.add_argument("--grow", type=int)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--min-recall", type=float, default=0.95)
    ap.add_argument("--kinds", default="flat,ivf,lifted,ivf4,hnsw,ivfpq")
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.artifacts:
        from service.artifacts import current_version

        folder = a.artifacts / current_version(a.artifacts)
        m = json.loads((folder / MANIFEST).read_text())
        users, items = queries_of(folder / m["files"]["retrieval_onnx"], folder / m["files"]["items"],
                                  m["data"]["spec"], a.queries, m["dims"]["maxlen"])
    else:
        users, items = queries_of(a.export / RETRIEVAL_ONNX, a.export / ITEMS_NPY, a.data, a.queries, a.maxlen)
    if a.grow and a.grow > items.shape[0]:
        rng = np.random.default_rng(0)
        rows = items[rng.integers(0, items.shape[0], size=a.grow - items.shape[0])]
        scale = np.linalg.norm(rows, axis=1, keepdims=True) / np.sqrt(rows.shape[1]) * 0.01
        items = np.concatenate([items, (rows + rng.standard_normal(rows.shape, dtype=np.float32) * scale)])
    items = np.ascontiguousarray(items, dtype=np.float32)
    n, d = items.shape
    nl, nl4 = auto_nlist(n), max(1, min(int(4 * np.sqrt(n)), n // 39))
    factories = {"flat": "Flat", "ivf": f"IVF{nl},Flat", "lifted": f"IVF{nl},Flat", "ivf4": f"IVF{nl4},Flat",
                 "hnsw": "HNSW32,Flat",
                 "ivfpq": f"IVF{nl},PQ{d // 2}x4fs,RFlat"}
    lines = [f"# python {' '.join(shlex.quote(x) for x in sys.argv)}", "# " + simd_report(),
             f"# {n:,} items, D={d}, M={users.shape[1]} launchers, {users.shape[0]} users; recall@100 on "
             f"{min(1000, users.shape[0] * users.shape[1])} single vectors; search_fused k={TOP_K}, 1 faiss thread; "
             f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
             f"{'kind':6s} {'factory':28s} {'params':22s} {'build s':>7s} {'recall@100':>10s} {'p50 ms':>7s} "
             f"{'p99 ms':>7s}"]
    print("\n".join(lines), flush=True)
    rows: list[dict[str, object]] = []
    for kind in a.kinds.split(","):
        factory = factories[kind]
        set_faiss_threads(a.build_threads)
        t0 = time.perf_counter()
        if kind == "lifted":
            index = build_index(items, IndexSpec(kind="ivf", nlist=nl))
        else:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            index.train(items[np.sort(rng.choice(n, size=min(n, 64 * nl4 if kind == "ivf4" else 64 * nl),
                                                 replace=False))])
        if kind == "hnsw":
            faiss.downcast_index(index).hnsw.efConstruction = 80
        if kind != "lifted":
            index.add(items)
        build = time.perf_counter() - t0
        set_faiss_threads(1)
        ps = faiss.ParameterSpace()
        if kind == "flat":
            settings = [""]
        elif kind == "hnsw":
            settings = [f"efSearch={e}" for e in LADDERS["efSearch"]]
        elif kind == "ivfpq":
            settings = [f"nprobe={p},k_factor_rf={kf}" for p in LADDERS["nprobe"] if p <= nl for kf in (2, 4, 8)]
        else:
            settings = [f"nprobe={p}" for p in LADDERS["nprobe"] if p <= (nl4 if kind == "ivf4" else nl)]
        below = None
        for s in settings:
            if s:
                ps.set_index_parameters(index, s)
            recall = ann_recall(index, items, users, k=100)
            if recall >= a.min_recall or s == settings[-1]:
                p50, p99 = timed_search(index, users)
                row = {"kind": kind, "factory": factory_string(index) if kind != "ivfpq" else factory,
                       "params": s or "-", "build_s": build, "recall": recall, "p50": p50, "p99": p99}
                if below is not None:
                    print(f"{'':6s} {'(one step lower)':28s} {below[0]:22s} {'':>7s} {below[1]:10.4f}", flush=True)
                rows.append(row)
                lines.append(f"{kind:6s} {row['factory']:28s} {row['params']:22s} {build:7.1f} {recall:10.4f} "
                             f"{p50:7.3f} {p99:7.3f}" + ("" if recall >= a.min_recall else "  (below target)"))
                print(lines[-1], flush=True)
                break
            below = (s, recall)
        del index
    best = min((r for r in rows if r["recall"] >= a.min_recall), key=lambda r: r["p50"], default=None)  # type: ignore[arg-type,return-value]
    if best is not None:
        lines.append(f"cheapest at recall@100 >= {a.min_recall}: {best['factory']} {best['params']} "
                     f"(p50 {best['p50']:.3f} ms)")
    text = "\n".join(lines) + "\n"
    print(lines[-1])
    if a.out:
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
