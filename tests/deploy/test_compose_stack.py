"""The Compose stack built and run for real (README "Run with Docker Compose").

Builds the `serve` and `train` images, publishes a small synthetic version with the `train`
job, starts redis + api, and through the published port checks that an event changes the next
recommendation, that requests keep answering (flagged) while Redis is killed and that the
events acknowledged before the kill are back after its restart (append-only file on the
volume), and that the `reindex` job flips the served version with no failed request.

Needs a Docker daemon (`make compose-test` installs and starts one on Debian as root); without
one every test here skips with the reason. Run alone: `pytest -m compose`. Everything it creates
is removed by name at the end (project `recsys-compose-test`: containers, network, volumes; the
images `recsys-{serve,train}:compose-test`); the stand-in base images (tests/deploy/containers.py)
and Docker's build cache are kept on purpose, as the cache of the next run.
The requests and answers go to out/compose_stack.txt (and are printed).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy import containers
from tests.service.conftest import free_port

pytestmark = pytest.mark.compose

ROOT = containers.ROOT
PROJECT = "recsys-compose-test"
TAG = "compose-test"
API_KEY = "compose-test-" + os.urandom(12).hex()  # writes are closed without one (issue 15)
IMAGES = {"serve": f"recsys-serve:{TAG}", "train": f"recsys-train:{TAG}"}
# A small synthetic version: publishing takes about a minute and a half on 2 cores.
TRAIN_ARGS = ["--data", "synthetic:users=300,items=150", "--minutes", "0.2", "--epochs", "1"]
LOG = ROOT / "out" / "compose_stack.txt"


class Transcript:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")
        self.t0 = time.monotonic()

    def __call__(self, line: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {line}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


@dataclass
class Stack:
    docker: str
    compose: list[str]
    env: dict[str, str]
    url: str
    log: Transcript
    http: httpx.Client
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, argv: list[str], timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def timed(self, name: str, argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
        start = time.monotonic()
        proc = self.run(argv, timeout=timeout)
        self.timings[name] = time.monotonic() - start
        self.log(f"{name} ({self.timings[name]:.1f}s): {' '.join(argv)}")
        return proc

    def build_together(self, builds: dict[str, list[str]], timeout: float = 1200) -> None:
        """Both targets at once: BuildKit builds their shared stages once, and one build's
        downloads overlap the other's unpacking."""
        start = time.monotonic()
        procs = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=self.env, cwd=ROOT) for name, argv in builds.items()}
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=timeout)
            self.log(f"build {name} ({time.monotonic() - start:.1f}s): {' '.join(builds[name])}")
            assert proc.returncode == 0, f"build {name}: exit {proc.returncode}\n{out[-3000:]}"
        self.timings["build serve + train"] = time.monotonic() - start

    def container(self, service: str) -> str:
        cid = self.run([*self.compose, "ps", "-q", service]).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(self, ref: str, fmt: str) -> str:
        return self.run([self.docker, "inspect", "--format", fmt, ref]).stdout.strip()

    def wait_healthy(self, service: str, timeout_s: float = 180) -> float:
        start = time.monotonic()
        while True:
            state = self.inspect(self.container(service), "{{.State.Status}} {{.State.Health.Status}}")
            if state == "running healthy":
                return time.monotonic() - start
            assert time.monotonic() - start < timeout_s, f"{service} not healthy after {timeout_s}s: {state}"
            time.sleep(1)

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.http.post(self.url + path, json=body, headers={"X-API-Key": API_KEY})

    def recommend(self, body: dict[str, Any], note: str = "") -> dict[str, Any]:
        r = self.post("/v1/recommend", body)
        out = r.json() if r.status_code == 200 else {}
        self.log(f"POST /v1/recommend {json.dumps(body)} -> {r.status_code} served_by={out.get('served_by')} "
                 f"version={out.get('model_version')} items={[i['item_id'] for i in out.get('items', [])]} {note}")
        assert r.status_code == 200, r.text
        return out


def _cleanup(docker: str, compose: list[str], env: dict[str, str]) -> None:
    subprocess.run([*compose, "--profile", "jobs", "--profile", "metrics", "down", "-v", "--remove-orphans"],
                   env=env, cwd=ROOT, capture_output=True, timeout=300)
    subprocess.run([docker, "rmi", *IMAGES.values()], capture_output=True, timeout=300)


def _leftovers(docker: str) -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    found = []
    for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
        out = subprocess.run([docker, *kind, "-q", "--filter", label], capture_output=True, text=True).stdout.split()
        found += [f"{kind[0]} {x}" for x in out]
    found += [ref for ref in IMAGES.values() if containers.image_exists(docker, ref)]
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    try:
        docker = containers.find_docker_client()
        compose = containers.find_compose(docker)
    except containers.Unavailable as exc:
        pytest.skip(str(exc))
    problem = containers.daemon_answers(docker)
    if problem is not None:
        pytest.skip(f"no Docker daemon answers ({problem}); `make compose-test` starts one on Debian")
    log = Transcript(LOG)
    start = time.monotonic()
    try:
        inputs = containers.build_inputs(docker)
    except containers.Unavailable as exc:
        pytest.skip(str(exc))
    log(f"client {docker}, compose {' '.join(compose)}; base {inputs.base_image}, redis {inputs.redis_image}, "
        f"build args {inputs.build_args}, secrets {inputs.secrets}")
    port = free_port()
    # the API key comes from an env file, as a user's recsys.env (a temporary one, never the user's)
    key_file = tmp_path_factory.mktemp("compose") / "recsys.env"
    key_file.write_text(f"RECSYS_API_KEY={API_KEY}\n")
    # Compose never builds here (the images exist under RECSYS_IMAGE_TAG before it runs)
    env = {**os.environ, **inputs.env(), "DOCKER_BUILDKIT": "1", "COMPOSE_PROJECT_NAME": PROJECT,
           "RECSYS_IMAGE_TAG": TAG, "RECSYS_PORT": str(port), "RECSYS_ENV_FILE": str(key_file)}
    _cleanup(docker, compose, env)  # what an interrupted run left behind
    with httpx.Client(timeout=10) as http:
        s = Stack(docker=docker, compose=compose, env=env, url=f"http://127.0.0.1:{port}", log=log, http=http)
        s.timings["base images"] = time.monotonic() - start
        try:
            s.build_together({target: containers.build_command(docker, inputs, target, ref)
                              for target, ref in IMAGES.items()})
            argv = _compose_command("train")
            s.timed("train job", [*compose, "--profile", "jobs", "run", "--rm", "train", *argv, *TRAIN_ARGS])
            s.timed("up", [*compose, "up", "-d"], timeout=300)
            s.timings["api healthy"] = s.wait_healthy("api")
            log(f"api healthy after {s.timings['api healthy']:.1f}s")
            yield s
        finally:
            s.timings["total"] = time.monotonic() - start
            log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.timings.items()))
            _cleanup(docker, compose, env)
            left = _leftovers(docker)
            log(f"after down -v and rmi: {left or 'nothing of the test is left'}")
            assert not left, left


def _compose_command(service: str) -> list[str]:
    return list(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service]["command"])


# ---------------------------------------------------------------- the images


def test_serve_image_has_no_torch_and_runs_as_uid_10001(stack: Stack) -> None:
    serve = IMAGES["serve"]
    uid = stack.run([stack.docker, "run", "--rm", "--entrypoint", "id", serve, "-u"]).stdout.strip()
    torch = stack.run([stack.docker, "run", "--rm", "--entrypoint", "python", serve, "-c", "import torch"], check=False)
    sizes = {ref: containers.image_size_mb(stack.docker, ref) for ref in IMAGES.values()}
    stack.log(f"serve image: uid {uid}; `import torch` exit {torch.returncode} "
              f"({torch.stderr.strip().splitlines()[-1]}); sizes " + ", ".join(f"{k} {v:.0f} MB" for k, v in sizes.items()))
    assert uid == "10001"
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    assert stack.inspect(stack.container("api"), "{{.Config.User}}") == "recsys"
    assert sizes[serve] < 600


# ---------------------------------------------------------------- through the published port


def test_an_event_changes_the_next_recommendation(stack: Stack) -> None:
    user = "compose-user-1"
    before = stack.recommend({"user_id": user, "k": 10}, "(no history yet)")
    assert before["served_by"].startswith("popularity")
    picked = [before["items"][i]["item_id"] for i in (0, 3, 6)]
    r = stack.post("/v1/events", [{"user_id": user, "item_id": item} for item in picked])
    stack.log(f"POST /v1/events {picked} for {user} -> {r.status_code} {r.text}")
    assert r.status_code == 202
    after = stack.recommend({"user_id": user, "k": 10}, "(after the events)")
    assert not after["served_by"].startswith("popularity")
    assert [i["item_id"] for i in after["items"]] != [i["item_id"] for i in before["items"]]
    assert not set(picked) & {i["item_id"] for i in after["items"]}  # seen items are removed


def test_requests_answer_while_redis_is_killed_and_events_survive_it(stack: Stack) -> None:
    user = "compose-user-2"
    items = [i["item_id"] for i in stack.recommend({"k": 20}, "(catalog sample)")["items"]]
    acknowledged: list[str] = []
    for item in items[:8]:  # one at a time, each acknowledged before the next
        r = stack.post("/v1/events", {"user_id": user, "item_id": item})
        assert r.status_code == 202, r.text
        acknowledged.append(item)
    stack.log(f"POST /v1/events x{len(acknowledged)} for {user}: all 202 -> acknowledged {acknowledged}")
    stack.recommend({"user_id": user, "k": 5}, "(before the kill)")

    redis = stack.container("redis")
    stack.run([stack.docker, "kill", redis])
    stack.log(f"docker kill redis -> {stack.inspect(redis, '{{.State.Status}} exit={{.State.ExitCode}}')}")
    stored_user, own_history = {"user_id": user, "k": 5}, {"history": items[:3], "k": 5}
    answers = []
    for body in [stored_user, own_history] * 6:  # over ~3 s: past the store's 1 s cooldown, so it tries again
        start = time.monotonic()
        r = stack.post("/v1/recommend", body)
        ms = (time.monotonic() - start) * 1000
        served_by = r.json().get("served_by", "") if r.status_code == 200 else r.text
        answers.append((body is stored_user, r.status_code, served_by))
        stack.log(f"  redis down: POST /v1/recommend {json.dumps(body)} -> {r.status_code} served_by={served_by} "
                  f"({ms:.0f} ms)")
        time.sleep(0.25)
    ready = stack.http.get(stack.url + "/readyz")
    refused = stack.post("/v1/events", {"user_id": user, "item_id": items[10]})
    stack.log(f"  redis down: GET /readyz -> {ready.status_code} {ready.text}; POST /v1/events -> "
              f"{refused.status_code} {refused.text} (refused, not acknowledged)")
    down = stack.inspect(redis, "{{.State.Status}}")
    assert all(code == 200 for _, code, _ in answers), answers
    assert all(("store_unavailable" in flags) == stored for stored, _, flags in answers), answers
    assert ready.status_code == 200 and ready.json()["store"] == "unavailable"
    assert refused.status_code == 503  # the client is told to retry: not an event lost
    assert down != "running", f"redis came back by itself during the check ({down})"

    stack.run([*stack.compose, "start", "redis"])
    waited = stack.wait_healthy("redis")
    stack.log(f"compose start redis -> healthy after {waited:.1f}s")
    time.sleep(1.5)  # the store's cooldown after a failure (RECSYS_STORE_COOLDOWN_S, 1 s)
    history = stack.http.get(f"{stack.url}/v1/users/{user}/history")
    stack.log(f"GET /v1/users/{user}/history -> {history.status_code} {history.text}")
    assert history.status_code == 200
    assert history.json()["items"] == acknowledged  # oldest first: every acknowledged event, nothing else
    back = stack.recommend({"user_id": user, "k": 5}, "(redis back)")
    assert "store_unavailable" not in back["served_by"] and not back["served_by"].startswith("popularity")


def test_reindex_flips_the_served_version_with_no_failed_request(stack: Stack) -> None:
    old = stack.http.get(stack.url + "/v1/version").json()
    stack.log(f"GET /v1/version -> {old}")
    results: list[tuple[int, str]] = []
    errors: list[str] = []
    stop = threading.Event()
    user = "compose-user-1"

    def load() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post(stack.url + "/v1/recommend", json={"user_id": user, "k": 10})
                    results.append((r.status_code, r.json().get("model_version", "") if r.status_code == 200 else r.text))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                time.sleep(0.02)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        proc = stack.timed("reindex job", [*stack.compose, "--profile", "jobs", "run", "--rm", "reindex"])
        stack.log("reindex stdout (last lines):\n" + "\n".join(proc.stdout.strip().splitlines()[-6:]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not results or results[-1][1] == old["model_version"]):
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        thread.join(timeout=20)
    new = stack.http.get(stack.url + "/v1/version").json()
    versions = list(dict.fromkeys(v for _, v in results))
    failed = [(c, v) for c, v in results if c != 200]
    stack.log(f"during reindex: {len(results)} POST /v1/recommend, {len(failed)} failed, {len(errors)} transport "
              f"errors; versions served in order {versions}; GET /v1/version -> {new}")
    assert not failed and not errors, (failed[:5], errors[:5])
    assert new["model_version"] != old["model_version"]
    assert versions == [old["model_version"], new["model_version"]]
