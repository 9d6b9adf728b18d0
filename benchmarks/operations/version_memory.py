"""Resident memory of a worker holding one, then two versions, memory-mapped vs read into memory.

    python benchmarks/operations/version_memory.py --artifacts DIR [--requests 300] [--out FILE]

For each loading mode (mmap, eager) a fresh process does what a worker does across a hot swap:
load the live version (service.artifacts.load_current) and its Recommender, serve --requests
recommendations, load a second version (a copy of the first under another name, made with
`cp`, so its files are other files, as a re-index writes them) while holding the first, serve
again, then drop the first. After each step it reads its own /proc/self/status (VmRSS,
RssAnon = private memory, RssFile = mapped file pages, shared through the page cache with every
process mapping the same file) and /proc/self/smaps_rollup (Pss: shared pages divided among the
processes mapping them). "arrays" is the size of the version's files (npy, npz, index, ONNX).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from service.contract.layout import CURRENT, MANIFEST

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def mem() -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) / 1024
    return out


def child(root: Path, second: str, mmap: bool, requests: int) -> None:
    import gc

    import numpy as np
    from threadpoolctl import threadpool_limits

    from service.artifacts import load_current, load_version
    from service.pipeline import Recommender

    threadpool_limits(1)

    def report(step: str, seconds: float | None = None) -> None:
        print(json.dumps({"step": step, "s": seconds, **mem()}), flush=True)

    def serve(rec: Recommender) -> None:
        rng = np.random.default_rng(0)
        ids = rec.v.item_ids
        for _ in range(requests):
            hist = [str(ids[i]) for i in rng.integers(1, rec.v.num_items + 1, size=30)]
            rec.recommend(hist, 10, explain=False)

    report("imports")
    t0 = time.perf_counter()
    first = Recommender(load_current(root, mmap=mmap))
    report("one version loaded", time.perf_counter() - t0)
    serve(first)
    report(f"one version, {requests} requests served")
    t0 = time.perf_counter()
    other = Recommender(load_version(root / second, mmap=mmap))
    report("second version loaded", time.perf_counter() - t0)
    serve(other)
    report(f"two versions, {requests} requests on the second")
    del first
    gc.collect()
    report("first version dropped")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", choices=("mmap", "eager"), help=argparse.SUPPRESS)
    ap.add_argument("--second", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.artifacts, a.second, a.child == "mmap", a.requests)
        return 0

    from service.artifacts import current_version

    live = current_version(a.artifacts)
    folder = a.artifacts / live
    manifest = json.loads((folder / MANIFEST).read_text())
    arrays = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".npy", ".npz", ".faiss", ".onnx", ".data"))
    scratch = Path(tempfile.mkdtemp(prefix="recsys-mem-", dir=a.artifacts.parent))
    try:
        (scratch / live).symlink_to(folder.resolve())
        (scratch / CURRENT).write_text(live + "\n")
        subprocess.run(["cp", "-r", str(folder), str(scratch / "second")], check=True)
        m2 = json.loads((scratch / "second" / MANIFEST).read_text())
        m2["version"] = "second"
        (scratch / "second" / MANIFEST).write_text(json.dumps(m2))
        lines = [f"# python {' '.join(shlex.quote(x) for x in sys.argv)}",
                 f"# {manifest['data']['name']}, {manifest['item_count']:,} items, version files {arrays / 2**20:.0f} MiB "
                 f"(arrays, index, ONNX); load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
                 f"{'mode':6s} {'step':36s} {'load s':>7s} {'RSS MiB':>8s} {'anon':>7s} {'file':>7s} {'PSS':>7s} "
                 f"{'RSS/files':>9s}"]
        for mode in ("mmap", "eager"):
            out = subprocess.run([sys.executable, __file__, "--artifacts", str(scratch), "--child", mode, "--second",
                                  "second", "--requests", str(a.requests)], check=True, capture_output=True,
                                 text=True).stdout
            for row in map(json.loads, out.strip().splitlines()):
                s = f"{row['s']:7.2f}" if row["s"] is not None else f"{'':7s}"
                lines.append(f"{mode:6s} {row['step']:36s} {s} {row['VmRSS']:8.0f} {row['RssAnon']:7.0f} "
                             f"{row['RssFile']:7.0f} {row['Pss']:7.0f} {row['VmRSS'] * 2**20 / arrays:9.2f}")
                print(lines[-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
