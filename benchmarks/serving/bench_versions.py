"""Derive serving-benchmark versions from one published version: another index, the old inline
ONNX layout, or a larger catalog.

    python benchmarks/serving/bench_versions.py --src ROOT/VERSION --out ROOT2 --name NAME
        [--items 1000000] [--factory "IVF2000,Flat"] [--params nprobe=32] [--inline-onnx]

Writes ROOT2/NAME (and points ROOT2/CURRENT at it):

- --items N: the catalog grows to N items by copying trained items (a seeded sample, with small
  Gaussian noise on every vector so the copies are not duplicates) into new ids `x<j>`: item
  embeddings, pre-rank item heads, re-rank item features, catalog features (popularity 0) and
  the retrieval graph's item table. Histories of the data set only name the original items, so
  the retriever's answers for them are unchanged; what grows is what a request's cost and a
  version's load depend on (the index, the arrays, the graph's table). Training a 1M-item model
  with benchmarks/serving/serving_artifacts.py took longer than the time available on the shared cores.
- --params alone: the same index with these search parameters (recall measured again).
- --factory / --params: the FAISS index rebuilt (faiss.index_factory, inner product; IVF
  trained on 64 points per list) with these search parameters; its recall@100 against exact
  search on the retriever's vectors of 1000 test users is measured and written to the manifest,
  with the factory string.
- --nlist L (instead of --factory): the index `recsys export` builds (service/index_build.py:
  IVF-Flat with L lists trained on the lifted items) and the nprobe its publish check tunes
  (training/publish/checks.py: the cheapest power-of-two step from 64 reaching recall@100 0.95).
- --inline-onnx: retrieval.onnx with its weights inside the graph (the layout before issue 14)
  instead of retrieval.onnx.data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.contract.catalog import is_vocab  # noqa: E402
from service.index import factory_string, index_params, set_faiss_threads  # noqa: E402
from service.index_build import ann_recall  # noqa: E402
from service.contract.layout import CURRENT, MANIFEST  # noqa: E402

TABLE = "model.item_embedding.weight"
NOISE = 0.01  # relative to each copied row's norm


def grow(src: Path, dst: Path, m: dict, n_new: int, rng: np.random.Generator) -> np.ndarray:
    """Grow the item-side files of dst (a copy of src) to n_new items; returns the source row
    (original internal id) of every new item."""
    n = m["item_count"]
    extra = n_new - n
    source = rng.integers(1, n + 1, size=extra)  # original internal ids copied

    def noisy(rows: np.ndarray) -> np.ndarray:
        flat = rows.reshape(rows.shape[0], -1)
        scale = np.linalg.norm(flat, axis=1, keepdims=True) / np.sqrt(max(flat.shape[1], 1)) * NOISE
        return (flat + rng.standard_normal(flat.shape, dtype=np.float32) * scale).reshape(rows.shape).astype(np.float32)

    files = m["files"]
    items = np.load(src / files["items"])  # (N, D), row r = item r + 1
    np.save(dst / files["items"], np.concatenate([items, noisy(items[source - 1])]))
    for key in ("prerank_items", "rerank_items"):
        if key in files:
            arr = np.load(src / files[key])  # (N + 1, ...)
            np.save(dst / files[key], np.concatenate([arr, noisy(arr[source])]))
    with np.load(src / files["catalog"], allow_pickle=False) as z:
        cat = {k: z[k] for k in z.files}
    for k, v in list(cat.items()):
        if k == "item_ids":
            cat[k] = np.concatenate([v, np.asarray([f"x{j}" for j in range(extra)])])
        elif k == "popularity":
            cat[k] = np.concatenate([v, np.zeros(extra, v.dtype)])
        elif not is_vocab(k):
            cat[k] = np.concatenate([v, v[source]])
    with open(dst / files["catalog"], "wb") as f:
        np.savez(f, **cat)
    m["item_count"] = n_new
    m["data"] = {**m["data"], "grown_to": n_new}
    return source


def write_onnx(src: Path, dst: Path, m: dict, source: np.ndarray | None, inline: bool, rng: np.random.Generator) -> None:
    files = m["files"]
    model = onnx.load(str(src / files["retrieval_onnx"]))  # external data loaded too
    if source is not None:
        for init in model.graph.initializer:
            if init.name == TABLE:
                table = numpy_helper.to_array(init)
                grown = np.concatenate([table, table[source]]).astype(np.float32)
                init.CopyFrom(numpy_helper.from_array(grown, TABLE))
    for stale in (dst / files["retrieval_onnx"], dst / f"{files['retrieval_onnx']}.data"):
        stale.unlink(missing_ok=True)
    if inline:
        onnx.save(model, str(dst / files["retrieval_onnx"]))
        files.pop("retrieval_onnx_data", None)
    else:
        data = f"{files['retrieval_onnx']}.data"
        onnx.save(model, str(dst / files["retrieval_onnx"]), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data, size_threshold=1024)
        files["retrieval_onnx_data"] = data


def queries(version_dir: Path, m: dict, users: int = 1000) -> np.ndarray:
    """(users, M, D) retriever vectors of the data set's first test users."""
    import onnxruntime as ort

    from training.data.sources import load
    from training.data.splits import LeaveOneOut

    ds = load(m["data"]["spec"])
    loo = LeaveOneOut(ds)
    hist = loo.histories("test", loo.eval_users[:users], maxlen=m["dims"]["maxlen"]).astype(np.int64)
    sess = ort.InferenceSession(str(version_dir / m["files"]["retrieval_onnx"]), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"item_seq": hist[s:s + 256]})[0] for s in range(0, len(hist), 256)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--items", type=int)
    ap.add_argument("--factory")
    ap.add_argument("--params", default="", help="faiss ParameterSpace string, e.g. nprobe=32 or efSearch=128")
    ap.add_argument("--nlist", type=int, help="build with service/index_build.py (lifted IVF) and tune nprobe")
    ap.add_argument("--inline-onnx", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="FAISS threads for the build")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    m = json.loads((a.src / MANIFEST).read_text())
    dst = a.out / a.name
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(a.src, dst)
    m["version"] = a.name
    source = None
    t0 = time.perf_counter()
    if a.items and a.items > m["item_count"]:
        source = grow(a.src, dst, m, a.items, rng)
    write_onnx(a.src, dst, m, source, a.inline_onnx, rng)
    print(f"item side written in {time.perf_counter() - t0:.1f} s", flush=True)
    if a.nlist:
        from service.index_build import IndexSpec, build_index
        from training.publish.checks import measure_recall

        items = np.load(dst / m["files"]["items"])
        set_faiss_threads(a.threads)
        t0 = time.perf_counter()
        index = build_index(items, IndexSpec(kind="ivf", nlist=a.nlist, seed=a.seed))
        build_s = time.perf_counter() - t0
        recall, tuned = measure_recall(index, items, queries(dst, m), 100, 0.95, tune=True)
        faiss.write_index(index, str(dst / m["files"]["index"]))
        m["index"] = {**index_params(index), "recall@100": recall, "recall": recall, "recall_k": "recall@100",
                      "file": m["files"]["index"], "build_s": round(build_s, 1), "nprobe_tuned": tuned}
        print(f"index {m['index']['factory']} nprobe {index.nprobe} (tuned {tuned}): recall@100 {recall:.4f}, "
              f"built in {build_s:.1f} s", flush=True)
    elif a.factory or source is not None or a.params:
        items = np.load(dst / m["files"]["items"])
        factory = a.factory or m["index"].get("factory") or "Flat"
        set_faiss_threads(a.threads)
        t0 = time.perf_counter()
        if a.factory or source is not None:
            index = faiss.index_factory(items.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                nlist = faiss.extract_index_ivf(index).nlist
                index.train(items[np.sort(rng.choice(items.shape[0], size=min(items.shape[0], 64 * nlist),
                                                     replace=False))])
            index.add(items)
        else:  # --params only: the same index, searched with other parameters
            index = faiss.read_index(str(dst / m["files"]["index"]))
        build_s = time.perf_counter() - t0
        if a.params:
            faiss.ParameterSpace().set_index_parameters(index, a.params)
        recall = ann_recall(index, items, queries(dst, m), k=100)
        faiss.write_index(index, str(dst / m["files"]["index"]))
        m["index"] = {**index_params(index), "recall@100": recall, "recall": recall, "recall_k": "recall@100",
                      "file": m["files"]["index"], "build_s": round(build_s, 1), "factory": factory_string(index)}
        print(f"index {factory} {a.params}: recall@100 {recall:.4f}, built in {build_s:.1f} s", flush=True)
    (dst / MANIFEST).write_text(json.dumps(m, indent=1))
    (a.out / CURRENT).write_text(a.name + "\n")
    from service.smoke import load_checked

    load_checked(dst)  # the service's own loader and smoke run
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
