"""Docker for the container tests: which client and Compose to run, whether a daemon answers,
and local stand-ins for the public base images on machines that cannot pull from Docker Hub
(the public images are used when they are here or can be pulled).

Stand-ins (built once, kept as a cache by tag; the tag carries a hash of the recipe):
- ``recsys-local/python:3.11-bookworm-<hash>``: a Debian bookworm ``minbase`` root file system
  from debootstrap with python3, python3-venv and python-is-python3, loaded with
  ``docker import``; it stands in for ``python:3.11-slim`` (the Dockerfile's BASE_IMAGE).
- ``recsys-local/redis:7-bookworm-<hash>``: that base plus Debian's redis-server, for ``redis:7``
  (Compose's REDIS_IMAGE); like the official image it runs as ``redis`` in /data with protected
  mode off (the port is reachable only on the Compose network).
- ``recsys-local/prometheus:bookworm-<hash>``: that base plus Debian's prometheus, for
  ``prom/prometheus`` (PROMETHEUS_IMAGE); only for running the README by hand, no test uses it.
- ``recsys-local/wheels:<wheel name hash>``: the CPU torch wheel found through this machine's pip
  configuration (``find-links``), for the Dockerfile's WHEELS_IMAGE.

``python -m tests.deploy.containers`` builds what is missing and prints the overrides as one
``export`` line, for running the README's Compose section by hand on such a machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_BASE, PUBLIC_REDIS, PUBLIC_PROMETHEUS = "python:3.11-slim", "redis:7", "prom/prometheus:v2.53.0"
TORCH_PIN = "torch==2.13.0"
PYPI = "https://pypi.org/simple"
DEBIAN_MIRROR = os.environ.get("RECSYS_DEBIAN_MIRROR", "http://deb.debian.org/debian")

BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3")
BASE_RECIPE = f"debootstrap --variant=minbase bookworm +{','.join(BASE_PACKAGES)}; no apt lists, caches, docs"
BASE_CHANGES = ('ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'ENV LANG=C.UTF-8',
                'CMD ["python"]')
# Official redis images are built with protected mode off; Debian's binary needs the flag.
REDIS_DOCKERFILE = """\
FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* \\
 && mkdir -p /data && chown redis:redis /data \\
 && printf '#!/bin/sh\\nif [ "$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi\\nexec "$@"\\n' \\
    > /usr/local/bin/redis-entrypoint && chmod 755 /usr/local/bin/redis-entrypoint
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
"""
# As the official image: prometheus is the entry point, it runs as nobody in /prometheus.
PROMETHEUS_DOCKERFILE = """\
FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \\
 && rm -rf /var/lib/apt/lists/* \\
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
"""


class Unavailable(RuntimeError):
    """Containers cannot run here; the message is the one-line reason the tests skip with."""


def _run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 60, check: bool = True,
         input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=input is None, env=env, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed (exit {proc.returncode}):\n{err[-3000:]}")
    return proc


def _tag_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


# ---------------------------------------------------------------- client, Compose, daemon


def _candidates(name: str) -> list[str]:
    seen, found = set(), []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        exe = Path(folder) / name
        if exe.is_file() and os.access(exe, os.X_OK) and exe.resolve() not in seen:
            seen.add(exe.resolve())
            found.append(str(exe))
    return found


def find_docker_client() -> str:
    """The first `docker` on PATH that builds with BuildKit: one with the buildx plug-in, or a
    client older than 23 (BuildKit built in, switched on by DOCKER_BUILDKIT=1; Debian's docker.io).
    A newer client without buildx (a static binary, say) only asks for the plug-in."""
    clients = _candidates("docker")
    if not clients:
        raise Unavailable("no docker client on PATH (Debian: apt-get install docker.io)")
    for exe in clients:
        if _run([exe, "buildx", "version"], check=False, timeout=30).returncode == 0:
            return exe
        version = _run([exe, "version", "--format", "{{.Client.Version}}"], check=False, timeout=30).stdout
        m = re.match(r"(\d+)\.", version.strip())
        if m and int(m.group(1)) < 23:
            return exe
    raise Unavailable(f"no docker client on PATH builds with BuildKit ({', '.join(clients)}: no buildx plug-in)")


def find_compose(docker: str) -> list[str]:
    """`docker-compose` (v1.29 or a v2 binary), else the v2 plug-in `docker compose`."""
    for exe in _candidates("docker-compose"):
        if _run([exe, "version"], check=False, timeout=30).returncode == 0:
            return [exe]
    if _run([docker, "compose", "version"], check=False, timeout=30).returncode == 0:
        return [docker, "compose"]
    raise Unavailable("no Docker Compose (Debian: apt-get install docker-compose)")


def daemon_answers(docker: str) -> str | None:
    """None when the daemon answers, else its one-line complaint."""
    proc = _run([docker, "version", "--format", "{{.Server.Version}}"], check=False, timeout=30)
    if proc.returncode == 0 and proc.stdout.strip():
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("template:")]
    return lines[-1].strip() if lines else f"docker version exit {proc.returncode}"


# ---------------------------------------------------------------- images


def image_exists(docker: str, ref: str) -> bool:
    return _run([docker, "image", "inspect", ref], check=False, timeout=30).returncode == 0


def image_size_mb(docker: str, ref: str) -> float:
    return int(_run([docker, "image", "inspect", "--format", "{{.Size}}", ref]).stdout) / 1e6


def public_image(docker: str, ref: str) -> str | None:
    """`ref` when it is here or can be pulled (without Docker Hub the pull fails at once)."""
    if image_exists(docker, ref) or _run([docker, "pull", ref], check=False, timeout=600).returncode == 0:
        return ref
    return None


def debian_python_base(docker: str) -> str:
    tag = f"recsys-local/python:3.11-bookworm-{_tag_hash(BASE_RECIPE, *BASE_CHANGES)}"
    if image_exists(docker, tag):
        return tag
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        raise Unavailable(f"{PUBLIC_BASE} is not here and no stand-in can be built (debootstrap needs root "
                          "and Debian's debootstrap package)")
    with tempfile.TemporaryDirectory(prefix="recsys-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run([debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
              str(rootfs), DEBIAN_MIRROR], timeout=1200)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/info", "usr/share/locale"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        changes = [a for c in BASE_CHANGES for a in ("--change", c)]
        try:
            proc = subprocess.run([docker, "import", *changes, "-", tag], stdin=tar.stdout, capture_output=True,
                                  text=True, timeout=600)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        if proc.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import {tag} failed: {proc.stderr[-2000:]}")
    return tag


def debian_redis(docker: str, base: str) -> str:
    return _debian_image(docker, "recsys-local/redis:7-bookworm", REDIS_DOCKERFILE.format(base=base))


def debian_prometheus(docker: str, base: str) -> str:
    return _debian_image(docker, "recsys-local/prometheus:bookworm", PROMETHEUS_DOCKERFILE.format(base=base))


def _debian_image(docker: str, name: str, dockerfile: str) -> str:
    tag = f"{name}-{_tag_hash(dockerfile)}"
    if not image_exists(docker, tag):
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        _run([docker, "build", "-t", tag, "-"], env=env, input=dockerfile.encode(), timeout=900)
    return tag


@dataclass
class PipSettings:
    """What this machine's pip configuration says that a build needs too."""

    ca_bundle: str | None = None
    find_links: list[str] = field(default_factory=list)

    @classmethod
    def read(cls) -> "PipSettings":
        proc = _run([sys.executable, "-m", "pip", "config", "list"], check=False, timeout=60)
        values: dict[str, list[str]] = {}
        for line in proc.stdout.splitlines():  # global.cert='/etc/ssl/certs/ca.crt'
            name, eq, value = line.strip().partition("=")
            if eq:
                values.setdefault(name.rsplit(".", 1)[-1], []).extend(value.strip("'\"").split())
        ca = next((c for c in [os.environ.get("PIP_CERT"), *values.get("cert", []), os.environ.get("SSL_CERT_FILE")]
                   if c and Path(c).is_file()), None)
        links = [*os.environ.get("PIP_FIND_LINKS", "").split(), *values.get("find-links", [])]
        return cls(ca_bundle=ca, find_links=list(dict.fromkeys(links)))

    def torch_wheel(self) -> Path | None:
        """The pinned CPU torch for CPython 3.11 on x86-64 Linux, from a find-links folder."""
        version = TORCH_PIN.split("==")[1]
        for link in self.find_links:
            folder = Path(link.removeprefix("file://"))
            if folder.is_dir():
                wheels = sorted(folder.glob(f"torch-{version}+cpu-cp311-cp311-*linux*x86_64.whl"))
                if wheels:
                    return wheels[0]
        return None


def wheels_image(docker: str, wheel: Path) -> str:
    tag = f"recsys-local/wheels:{_tag_hash(wheel.name, str(wheel.stat().st_size))}"
    if not image_exists(docker, tag):
        tar = subprocess.Popen(["tar", "-C", str(wheel.parent), "-c", wheel.name], stdout=subprocess.PIPE)
        try:
            proc = subprocess.run([docker, "import", "-", tag], stdin=tar.stdout, capture_output=True, text=True,
                                  timeout=600)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"docker import {tag} failed: {proc.stderr[-2000:]}")
    return tag


@dataclass
class BuildInputs:
    """Base images, build arguments and secrets for this machine."""

    base_image: str
    redis_image: str
    build_args: dict[str, str]
    secrets: list[str]

    def env(self) -> dict[str, str]:
        return {"BASE_IMAGE": self.base_image, "REDIS_IMAGE": self.redis_image}


def build_inputs(docker: str) -> BuildInputs:
    """BASE_IMAGE / REDIS_IMAGE when set, else the public images (here or pulled), else stand-ins;
    the pip CA bundle as the `ca` secret; the local CPU torch wheel when pip's config has one."""
    base = os.environ.get("BASE_IMAGE") or public_image(docker, PUBLIC_BASE) or debian_python_base(docker)
    redis = (os.environ.get("REDIS_IMAGE") or public_image(docker, PUBLIC_REDIS)
             or debian_redis(docker, debian_python_base(docker)))
    pip = PipSettings.read()
    args = {"BASE_IMAGE": base}
    wheel = pip.torch_wheel()
    if wheel is not None:  # torch's own dependencies then come from PyPI
        args |= {"WHEELS_IMAGE": wheels_image(docker, wheel), "TORCH_INDEX_URL": PYPI}
    secrets = [f"id=ca,src={pip.ca_bundle}"] if pip.ca_bundle else []
    return BuildInputs(base_image=base, redis_image=redis, build_args=args, secrets=secrets)


def build_command(docker: str, inputs: BuildInputs, target: str, tag: str) -> list[str]:
    argv = [docker, "build", "--target", target, "-t", tag]
    for key, value in inputs.build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    for secret in inputs.secrets:
        argv += ["--secret", secret]
    return [*argv, str(ROOT)]


def main() -> int:
    docker = find_docker_client()
    inputs = build_inputs(docker)
    prometheus = (os.environ.get("PROMETHEUS_IMAGE") or public_image(docker, PUBLIC_PROMETHEUS)
                  or debian_prometheus(docker, inputs.base_image))
    exports = {**inputs.env(), "PROMETHEUS_IMAGE": prometheus,
               **{k: v for k, v in inputs.build_args.items() if k != "BASE_IMAGE"}}
    print("export " + " ".join(f"{k}={v}" for k, v in exports.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
