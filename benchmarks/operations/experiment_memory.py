"""Memory of one worker serving an experiment of two versions vs one version (issue 25, "Must show").

    python benchmarks/operations/experiment_memory.py --artifacts DIR [--requests 300] [--out FILE]

A live `recsys serve` (one worker, in-process store) over a scratch root holding CURRENT's version
of DIR and a copy of it under another name (`second`: other files, so nothing is shared through
the page cache, as with two really different versions of the same size). Steps: serve --requests
recommendations with no experiment; PUT an A/B experiment (live vs `second`, half the users each)
and serve --requests more (users in both arms); PUT an interleaving experiment of the same two
(every request runs both) and serve again; DELETE it and serve again. After each step the worker's
own memory is read from its /metrics (recsys_process_memory_bytes: VmRSS, RssAnon = private,
RssFile = mapped file pages) with the versions it holds (recsys_versions_loaded,
recsys_version_file_bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.contract.layout import CURRENT, MANIFEST, read_current  # noqa: E402

KEY = "bench-key"


def scrape(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(("recsys_process_memory_bytes{", "recsys_versions_loaded ", "recsys_version_file_bytes{")):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def serve(base: str, catalog: list[str], n: int) -> float:
    """n requests by 200 distinct users (both arms of an A/B); returns the mean ms per request."""
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(n):
            hist = [catalog[(i * 7 + j * 13) % len(catalog)] for j in range(20)]
            r = c.post("/v1/recommend", json={"user_id": f"mem-{i % 200}", "history": hist, "k": 10})
            r.raise_for_status()
    return (time.perf_counter() - t0) * 1000.0 / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--port", type=int, default=18931)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    live = read_current(a.artifacts)
    if live is None:
        raise SystemExit(f"{a.artifacts}: no CURRENT")
    scratch = Path(tempfile.mkdtemp(prefix="recsys-expmem-"))
    base = f"http://127.0.0.1:{a.port}"
    proc = None
    try:
        shutil.copytree(a.artifacts / live, scratch / live)
        shutil.copytree(a.artifacts / live, scratch / "second")
        m = json.loads((scratch / "second" / MANIFEST).read_text())
        m["version"] = "second"
        (scratch / "second" / MANIFEST).write_text(json.dumps(m))
        (scratch / CURRENT).write_text(live + "\n")
        files = sum(f.stat().st_size for f in (scratch / live).iterdir() if f.is_file())
        env = {**os.environ, "RECSYS_API_KEY": KEY, "RECSYS_RELOAD_POLL_S": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "recsys_cli", "serve", "--artifacts", str(scratch), "--port",
                                 str(a.port), "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("recsys serve did not start")
            time.sleep(0.3)
        from service.artifacts import load_version
        catalog = [str(x) for x in load_version(scratch / live).item_ids[1:].tolist()]
        ab = {"name": "mem-ab", "mode": "ab", "arms": [{"name": "live", "share": 0.5},
                                                        {"name": "second", "version": "second", "share": 0.5}]}
        il = {"name": "mem-il", "mode": "interleave", "arms": [{"name": "live"}, {"name": "second",
                                                                                 "version": "second"}]}
        auth = {"X-API-Key": KEY}
        lines = [f"$ python {shlex.join(sys.argv)}",
                 f"# version {live}: files {files / 2**20:.1f} MiB; one worker, {a.requests} requests per step; "
                 f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
                 f"{'step':44s} {'versions':>8s} {'RSS MiB':>8s} {'anon':>7s} {'file':>7s} {'ms/req':>7s}"]
        rows = []
        for step, action in (("one version (no experiment)", None), ("A/B experiment: two versions", ab),
                             ("interleaving: two versions per request", il), ("experiment ended", "delete")):
            if action == "delete":
                httpx.delete(f"{base}/v1/admin/experiment", headers=auth, timeout=30).raise_for_status()
            elif action is not None:
                httpx.put(f"{base}/v1/admin/experiment", json=action, headers=auth, timeout=120).raise_for_status()
            ms = serve(base, catalog, a.requests)
            s = scrape(base)
            mib = {k: s[f'recsys_process_memory_bytes{{kind="{k}"}}'] / 2**20 for k in ("rss", "anon", "file")}
            rows.append(mib)
            lines.append(f"{step:44s} {int(s['recsys_versions_loaded']):>8d} {mib['rss']:8.1f} {mib['anon']:7.1f} "
                         f"{mib['file']:7.1f} {ms:7.2f}")
            print(lines[-1], flush=True)
        d = {k: rows[1][k] - rows[0][k] for k in ("rss", "anon", "file")}
        lines.append(f"second version held (A/B - one): RSS {d['rss']:+.1f} MiB (anon {d['anon']:+.1f}, file "
                     f"{d['file']:+.1f}); the version's files are {files / 2**20:.1f} MiB")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
