"""Deployment files (Dockerfile, docker-compose.yml, deploy/): their structure, and that every
command line they run is a real `recsys` command with real flags.

No Docker engine or cluster is needed: the YAML is parsed, each command's flags are checked
against `recsys <command> --help` (a subprocess, like the container would run it), and the
serving entry point is started once to show it is real and torch-free.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.core.config import Settings
from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's console scripts: recsys, torchrun
K8S = ROOT / "deploy" / "k8s"
TRAIN_EXTRA = {"torch", "onnx", "onnxscript", "tqdm", "matplotlib"}  # pyproject's `train` extra, by import name


# ---------------------------------------------------------------- loading


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _k8s_docs() if d["kind"] == kind and d["metadata"].get("name", d["metadata"].get("generateName")) == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def _pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]["metadata"]["labels"]


def _workloads() -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob")]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = _pod_spec(doc)
    return pod.get("initContainers", []) + pod["containers"]


def _dockerfile_stages() -> dict[str, list[str]]:
    """Instructions per `FROM ... AS name` stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)$", line, re.IGNORECASE)
        if m:
            current = stages.setdefault(m.group(1), [])
        current.append(line)
    return stages


def _as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _command_lines() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) for every command the deployment runs (not the health checks)."""
    for name, svc in _compose()["services"].items():
        if "command" in svc and name != "prometheus":  # prometheus' own flags
            yield f"docker-compose.yml:{name}", _as_argv(svc["command"])
    for stage, lines in _dockerfile_stages().items():
        for line in lines:
            keyword, _, rest = line.partition(" ")
            if keyword in ("CMD", "ENTRYPOINT"):
                yield f"Dockerfile:{stage}:{keyword}", json.loads(rest)  # exec form only
    for doc in _workloads():
        for c in _containers(doc):
            yield f"deploy/k8s:{doc['kind']}/{doc['metadata'].get('name', doc['metadata'].get('generateName'))}:{c['name']}", \
                _as_argv(c.get("command", []) + c.get("args", []))


# ---------------------------------------------------------------- running the real CLI


@functools.cache
def _help(*argv: str) -> str:
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return proc.stdout


def _flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("-") and a != "-"]


def _assert_flags_in_help(flags: list[str], help_text: str, where: str) -> None:
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), f"{where}: {flag} is not in the help"


def _check_recsys(argv: list[str], where: str) -> None:
    assert argv[0] == "recsys", f"{where}: runs {argv[0]!r}"
    words = []
    for a in argv[1:]:
        if a.startswith("-"):
            break
        words.append(a)
    assert words, f"{where}: no sub-command"
    _assert_flags_in_help(_flags(argv[1 + len(words):]), _help(str(BIN / "recsys"), *words), where)


COMMAND_LINES = list(_command_lines())


@pytest.mark.parametrize(("where", "argv"), COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_every_command_is_a_real_cli_command_with_real_flags(where: str, argv: list[str]) -> None:
    if argv[0] == "redis-server":
        proc = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "Redis server v=" in proc.stdout
        return
    if argv[0] == "torchrun":
        split = argv.index("--no-python")  # torchrun options, then the program it starts on each rank
        _assert_flags_in_help(_flags(argv[1:split + 1]), _help(str(BIN / "torchrun")), where)
        _check_recsys(argv[split + 1:], where)
        return
    _check_recsys(argv, where)


def test_the_command_lines_cover_every_place_that_runs_one() -> None:
    wheres = {w.split(":")[0] + ":" + w.split(":")[1] for w, _ in COMMAND_LINES}
    assert {"docker-compose.yml:api", "docker-compose.yml:train", "docker-compose.yml:reindex",
            "docker-compose.yml:retrain", "deploy/k8s:CronJob/recsys-retrain", "docker-compose.yml:redis", "Dockerfile:serve", "Dockerfile:train"} <= wheres
    programs = {argv[0] for _, argv in COMMAND_LINES}
    assert programs == {"recsys", "torchrun", "redis-server"}


def test_serve_as_compose_runs_it_fails_with_one_line_without_artifacts(tmp_path: Path) -> None:
    argv = _as_argv(_compose()["services"]["api"]["command"])
    argv[argv.index("--artifacts") + 1] = str(tmp_path)  # an empty artifact root
    argv[argv.index("--port") + 1] = str(free_port())  # a server already on compose's port (a demo) is not this test's
    proc = subprocess.run([str(BIN / "recsys"), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == f"recsys serve: error: {tmp_path}/CURRENT: no CURRENT file (nothing published yet?)"
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- no torch on the serving path


def _imported_top_level(code_or_module: list[str]) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", *code_or_module],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_the_service_app_imports_nothing_from_the_train_extra() -> None:
    modules = _imported_top_level(["-c", "import service.main"])
    assert "fastapi" in modules and "onnxruntime" in modules  # the trace is real
    assert not modules & TRAIN_EXTRA


def test_recsys_serve_imports_nothing_from_the_train_extra() -> None:
    modules = _imported_top_level(["-m", "recsys_cli", "serve", "--help"])
    assert "recsys_cli" in modules  # the trace is real
    assert not modules & (TRAIN_EXTRA | {"training"})  # the CLI imports only service/ for serve


def _without_train_extra(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI as in the serving image: importing torch & co. fails."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in sorted(TRAIN_EXTRA))
    code = f"import sys; {block}; from recsys_cli.main import main; sys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_serve_runs_without_torch(tmp_path: Path) -> None:
    proc = _without_train_extra(["serve", "--artifacts", str(tmp_path), "--port", str(free_port())])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("no CURRENT file (nothing published yet?)")


def test_training_commands_without_torch_say_what_to_install() -> None:
    proc = _without_train_extra(["train", "retrieval", "--help"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("recsys: error: no module 'torch': this command needs the training "
                                   "install (pip install 'recsys[train]')")


def test_pyproject_base_dependencies_are_the_serving_set() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0] for d in project["dependencies"]}
    # + httpx: the Python client's (recsys_client/), installed with the package; the service does not import it
    assert names == {"numpy", "faiss-cpu", "onnxruntime", "fastapi", "uvicorn", "uvloop", "httptools", "pydantic",
                     "pydantic-settings", "redis", "prometheus-client", "threadpoolctl", "httpx"}
    assert "torch==2.13.0" in project["optional-dependencies"]["train"]
    assert "install --quiet -e '.[train,test,bench]'" in (ROOT / "Makefile").read_text()


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_serve_and_train_targets() -> None:
    stages = _dockerfile_stages()
    assert {"serve", "train"} <= set(stages)
    for name in ("serve", "train"):
        users = [line.split()[1] for line in stages[name] if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{name} runs as root"
    serve = " ".join(stages["serve"])
    assert "torch" not in serve.replace('import torch', '') and "[train]" not in serve
    assert "EXPOSE 8000" in serve and "/readyz" in serve
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
               ["optional-dependencies"]["train"] if d.startswith("torch"))
    train = " ".join(stages["train"])
    assert pin in train and "-r /req/train.txt" in train and "train.txt" not in serve
    assert "['optional-dependencies']['train']" in " ".join(stages["requirements"])


def test_dockerfile_pulls_only_its_base_images_and_keeps_no_secret() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax=", text, re.MULTILINE)  # BuildKit would pull a frontend image
    assert "ARG BASE_IMAGE=python:3.11-slim\n" in text and "FROM ${BASE_IMAGE} AS base" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu\n" in text  # the public default
    lines = [line for stage in _dockerfile_stages().values() for line in stage]
    pip_runs = [line for line in lines if line.startswith("RUN") and re.search(r"\bpip (install|wheel)\b", line)]
    local = [line for line in pip_runs if re.search(r"pip install --no-deps /wheels/recsys-\*\.whl\b", line)]
    assert len(pip_runs) == 5 and len(local) == 2  # the package wheel itself needs no index
    for line in set(pip_runs) - set(local):  # the CA bundle only as a per-RUN secret mount, never COPY'd or ENV'd
        assert "--mount=type=secret,id=ca" in line and "PIP_CERT=/run/secrets/ca" in line
    assert not [line for line in lines if line.startswith(("ENV", "ARG", "COPY", "ADD")) and re.search(r"CERT|\.crt|\.pem", line)]


# ---------------------------------------------------------------- docker compose


def test_compose_services_healthchecks_and_volumes() -> None:
    compose = _compose()
    svc = compose["services"]
    assert {"redis", "api", "train", "reindex", "retrain"} <= set(svc)

    redis = svc["redis"]
    assert redis["image"] == "${REDIS_IMAGE:-redis:7}"  # public default, overridable without Docker Hub
    assert "--appendonly yes" in " ".join(_as_argv(redis["command"]))
    assert "--maxmemory 512mb --maxmemory-policy volatile-lru" in " ".join(_as_argv(redis["command"]))
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])

    api = svc["api"]
    assert api["build"]["target"] == "serve"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    # closed by default (issue 15, finding 3): loopback unless RECSYS_BIND says otherwise, the key
    # from an env file kept out of git (RECSYS_ENV_FILE points elsewhere, e.g. for the container test)
    assert api["ports"] == ["${RECSYS_BIND:-127.0.0.1}:${RECSYS_PORT:-8000}:8000"]
    assert api["env_file"] == ["${RECSYS_ENV_FILE:-./recsys.env}"]
    assert "recsys.env" in (ROOT / ".gitignore").read_text().split()
    assert "RECSYS_API_KEY" not in api.get("environment", {})
    argv = _as_argv(api["command"])
    assert argv[argv.index("--port") + 1] == "8000" and argv[argv.index("--host") + 1] == "0.0.0.0"

    for job in ("train", "reindex", "retrain"):
        assert svc[job]["profiles"] == ["jobs"]
        assert svc[job]["build"]["target"] == "train"

    # one named volume at /data for the API and the jobs; every named volume is declared
    for name in ("api", "train", "reindex", "retrain"):
        assert any(v.split(":")[:2] == ["recsys-data", "/data"] for v in svc[name]["volumes"]), name
    for s in svc.values():
        for v in s.get("volumes", []):
            if not v.startswith((".", "/")):
                assert v.split(":")[0] in compose["volumes"]


def test_compose_paths_and_urls_point_at_mounts_and_services() -> None:
    svc = _compose()["services"]
    for name, s in svc.items():
        if "command" not in s or name == "prometheus":
            continue
        argv = _as_argv(s["command"])
        mounts = [v.split(":")[1] for v in s.get("volumes", [])]
        for flag in ("--artifacts", "--out"):
            if flag in argv:
                path = argv[argv.index(flag) + 1]
                assert any(path.startswith(m) for m in mounts), f"{name}: {flag} {path} is not on a volume"
        if "--redis-url" in argv:
            host = argv[argv.index("--redis-url") + 1].split("//")[1].split(":")[0]
            assert host in svc and host in s.get("depends_on", {}), f"{name}: redis host {host}"


# ---------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest_but_the_one_off_job() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files - {"train-job.yaml"}
    assert "generateName" in _k8s("Job", "recsys-train-")["metadata"]  # `kubectl create`, not apply


def test_api_deployment_probes_resources_config_and_volume() -> None:
    dep = _k8s("Deployment", "recsys-api")
    pod = _pod_spec(dep)
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    argv = _as_argv(c["command"])
    assert ports["http"] == int(argv[argv.index("--port") + 1])
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part])

    (ref,) = c["envFrom"]
    config = _k8s("ConfigMap", ref["configMapRef"]["name"])["data"]
    key = next(e for e in c["env"] if e["name"] == "RECSYS_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key["name"] == "recsys-api-key"

    vols = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == config["RECSYS_ARTIFACTS"])
    claim = vols[mount["name"]]["persistentVolumeClaim"]
    assert mount["readOnly"] is True and claim["readOnly"] is True
    assert _k8s("PersistentVolumeClaim", claim["claimName"])["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_configmap_holds_valid_service_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _k8s("ConfigMap", "recsys-config")["data"]
    for key in data:
        assert key.startswith("RECSYS_") and key[7:].lower() in Settings.model_fields, key
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on a bad value, as the pod would at start-up
    host = settings.redis_url.split("//")[1].split(":")[0]
    _k8s("Service", host)


def test_services_select_their_pods() -> None:
    for svc in (d for d in _k8s_docs() if d["kind"] == "Service"):
        pods = [w for w in _workloads() if w["kind"] in ("Deployment", "StatefulSet")
                and svc["spec"]["selector"].items() <= _pod_labels(w).items()]
        assert len(pods) == 1, f"Service {svc['metadata']['name']} selects {len(pods)} workloads"
        names = {p["name"] for c in _containers(pods[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names


def test_hpa_and_pdb_target_the_api() -> None:
    dep = _k8s("Deployment", "recsys-api")
    hpa = _k8s("HorizontalPodAutoscaler", "recsys-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "recsys-api"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _k8s("PodDisruptionBudget", "recsys-api")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels(dep).items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a drain can always evict one


def test_redis_is_append_only_on_a_volume() -> None:
    sts = _k8s("StatefulSet", "redis")
    (c,) = _pod_spec(sts)["containers"]
    assert "--appendonly yes" in " ".join(c["command"])
    assert c["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data" for m in c["volumeMounts"])


def _bytes(size: str) -> int:
    units = {"mb": 1 << 20, "gb": 1 << 30, "Mi": 1 << 20, "Gi": 1 << 30}
    unit = next(u for u in units if size.endswith(u))
    return int(size[: -len(unit)]) * units[unit]


def test_redis_is_bounded_below_its_memory_limit() -> None:
    """Issue 15, finding 4: maxmemory under the container limit (room for AOF replay and
    rewrite), evicting only keys with a TTL (histories)."""
    (c,) = _pod_spec(_k8s("StatefulSet", "redis"))["containers"]
    argv = c["command"]
    maxmemory = _bytes(argv[argv.index("--maxmemory") + 1])
    assert argv[argv.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert maxmemory <= 0.75 * _bytes(c["resources"]["limits"]["memory"])
    config = _k8s("ConfigMap", "recsys-config")["data"]
    assert int(config["RECSYS_HISTORY_TTL_S"]) > 0  # histories carry a TTL, so volatile-lru can evict them


def test_reindex_cronjob() -> None:
    cron = _k8s("CronJob", "recsys-reindex")
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # two publishers must not race on CURRENT
    (c,) = _pod_spec(cron)["containers"]
    assert c["command"][:2] == ["recsys", "reindex"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data/artifacts")
    assert not mount.get("readOnly", False)


def test_retrain_cronjob_reads_the_apis_log_and_keeps_its_snapshots() -> None:
    cron = _k8s("CronJob", "recsys-retrain")
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # two publishers must not race on CURRENT
    (c,) = _pod_spec(cron)["containers"]
    argv = _as_argv(c["command"])
    assert argv[:2] == ["recsys", "retrain"]
    config = _k8s("ConfigMap", "recsys-config")["data"]

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    # the log the API writes: the Redis stream of the URL the API is configured with
    assert value("--log") == f"log:{config['RECSYS_REDIS_URL']}"
    assert value("--artifacts") == config["RECSYS_ARTIFACTS"]
    export = next(_as_argv(e["command"]) for e in _containers(_k8s("Job", "recsys-train-")) if e["name"] == "export")
    assert value("--data") == export[export.index("--data") + 1]  # the base data the first version was trained on
    # the work folder (the data snapshots the versions record) and the artifacts both persist
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod_spec(cron)["volumes"]}
    for path in (value("--artifacts"), value("--work")):
        m = mounts[path]
        assert not m.get("readOnly", False) and "persistentVolumeClaim" in volumes[m["name"]], path
    # compose: the same command on the API's Redis, its work on the shared volume
    svc = _compose()["services"]["retrain"]
    cargv = _as_argv(svc["command"])
    assert cargv[:2] == ["recsys", "retrain"] and cargv[cargv.index("--log") + 1] == "log:redis://redis:6379/0"
    assert cargv[cargv.index("--work") + 1].startswith("/data/")


def test_training_job_steps_chain_their_outputs() -> None:
    job = _k8s("Job", "recsys-train-")
    steps = {c["name"]: _as_argv(c["command"]) for c in _containers(job)}
    assert list(steps) == ["retrieval", "prerank", "rerank", "export"]
    retrieval = steps["retrieval"]
    assert retrieval[:4] == ["torchrun", "--standalone", "--nproc_per_node=2", "--no-python"]
    assert retrieval[4:7] == ["recsys", "train", "retrieval"]

    def value(argv: list[str], flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value(steps["prerank"], "--retrieval") == value(retrieval, "--out")
    assert value(steps["rerank"], "--retrieval") == value(retrieval, "--out")
    assert value(steps["rerank"], "--prerank") == value(steps["prerank"], "--out")
    assert value(steps["export"], "--rerank") == value(steps["rerank"], "--out")
    assert value(steps["export"], "--out") == _k8s("ConfigMap", "recsys-config")["data"]["RECSYS_ARTIFACTS"]
    assert len({value(argv, "--data") for argv in steps.values()}) == 1


def test_every_container_env_reference_is_defined() -> None:
    for doc in _workloads():
        for c in _containers(doc):
            defined = {e["name"] for e in c.get("env", [])}
            for ref in c.get("envFrom", []):
                defined |= set(_k8s("ConfigMap", ref["configMapRef"]["name"])["data"])
            for var in re.findall(r"\$\((\w+)\)", " ".join(c.get("command", []) + c.get("args", []))):
                assert var in defined, f"{c['name']}: $({var}) is not defined"


# ---------------------------------------------------------------- Prometheus


def _scrape_jobs() -> dict[str, dict[str, Any]]:
    """Scrape jobs of the Compose Prometheus (deploy/prometheus.yml) and for a cluster's one."""
    jobs = {}
    for name in ("prometheus.yml", "prometheus-k8s.yml"):
        for job in yaml.safe_load((ROOT / "deploy" / name).read_text())["scrape_configs"]:
            jobs[job["job_name"]] = job | {"file": name}
    return jobs


def test_probe_and_scrape_paths_are_routes_of_the_app() -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app

    c = next(c for c in _pod_spec(_k8s("Deployment", "recsys-api"))["containers"] if c["name"] == "api")
    paths = {c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]}
    for text in (" ".join(_compose()["services"]["api"]["healthcheck"]["test"]), (ROOT / "Dockerfile").read_text()):
        paths |= set(re.findall(r"http://127\.0\.0\.1:8000(/\w+)", text))
    paths |= {j["metrics_path"] for j in _scrape_jobs().values()}
    assert paths == {"/readyz", "/healthz", "/metrics"}
    client = TestClient(create_app())  # no lifespan: nothing loaded, as a pod before its first version
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # not ready: kept out of the Service
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_prometheus_scrapes_the_api_metrics_route() -> None:
    jobs = _scrape_jobs()
    assert all(j["metrics_path"] == "/metrics" for j in jobs.values())

    compose = [j for j in jobs.values() if j["file"] == "prometheus.yml"]
    assert compose and all("static_configs" in j for j in compose)  # nothing to discover outside a cluster
    static = [t for j in compose for s in j["static_configs"] for t in s["targets"]]
    assert "api:8000" in static and "api" in _compose()["services"]
    mounts = _compose()["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts

    (k8s,) = [j for j in jobs.values() if "kubernetes_sd_configs" in j]
    assert k8s["kubernetes_sd_configs"][0]["role"] == "pod"
    labels = _pod_labels(_k8s("Deployment", "recsys-api"))
    meta = {"__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k): v for k, v in labels.items()}
    keep = [r for r in k8s["relabel_configs"] if r.get("action") == "keep"
            and all(s in meta for s in r["source_labels"])]
    assert keep, "no keep rule on the API pod labels"
    for rule in keep:
        assert re.fullmatch(rule["regex"], ";".join(meta[s] for s in rule["source_labels"]))



def test_redis_fsync_is_explicit_everysec_by_default_and_always_is_accepted() -> None:
    """Both Redis deployments say how often the AOF is fsynced (README "Event durability"), and
    redis-server accepts the setting each offers."""
    compose = _as_argv(_compose()["services"]["redis"]["command"])
    k8s = _as_argv(next(c for c in _containers(_k8s("StatefulSet", "redis")) if c["name"] == "redis")["command"])
    for argv in (compose, k8s):
        assert argv[argv.index("--appendonly") + 1] == "yes"
    assert compose[compose.index("--appendfsync") + 1] == "${REDIS_APPENDFSYNC:-everysec}"
    assert k8s[k8s.index("--appendfsync") + 1] == "everysec"
    for value in ("everysec", "always"):  # a bad value makes redis-server exit at once
        proc = subprocess.run(["redis-server", "--port", "0", "--appendfsync", value, "--appendonly", "yes",
                               "--dir", "/nonexistent-recsys"], capture_output=True, text=True, timeout=30)
        assert "appendfsync" not in proc.stdout + proc.stderr, (value, proc.stdout[-500:])
