# Two images from one file (DESIGN.md §1, §8), built with BuildKit (the default from Docker 23;
# older engines: DOCKER_BUILDKIT=1):
#   docker build --target serve -t recsys-serve .   ONNX Runtime + FAISS + NumPy, no torch
#   docker build --target train -t recsys-train .   + CPU torch: train, export, reindex, demo
# Both run as the non-root user `recsys` (uid 10001) and keep data under /data.
#
# For machines without Docker Hub or behind a TLS-inspecting proxy (defaults are the public
# ones; README "Run with Docker Compose"):
#   --build-arg BASE_IMAGE=...       a Debian-like image with Python 3.11 as `python` + venv
#   --build-arg WHEELS_IMAGE=...     an image whose root holds wheels pip may take (CPU torch)
#   --build-arg TORCH_INDEX_URL=...  where torch and its dependencies come from
#   --secret id=ca,src=/path/to/ca-bundle.crt   a CA bundle for pip, mounted per RUN, never stored
# No `# syntax=` line: it makes BuildKit pull a frontend image; the built-in one has RUN --mount.

ARG BASE_IMAGE=python:3.11-slim
ARG WHEELS_IMAGE=scratch

FROM ${WHEELS_IMAGE} AS local-wheels

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 recsys \
 && useradd --system --uid 10001 --gid recsys --home-dir /home/recsys --create-home --shell /usr/sbin/nologin recsys \
 && python -m venv /opt/venv \
 && mkdir -p /data/artifacts /data/runs \
 && chown -R recsys:recsys /data
WORKDIR /home/recsys

# The dependencies of pyproject.toml as requirement files: the dependency layers below are
# rebuilt only when pyproject.toml changes, not on every source edit.
FROM base AS requirements
COPY pyproject.toml /src/
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
open('/src/serve.txt', 'w').write('\n'.join(p['dependencies'])); \
open('/src/train.txt', 'w').write('\n'.join(p['optional-dependencies']['train']))"

# The package as a wheel, so neither image carries the source tree or build tools.
# Every pip RUN that reaches an index mounts the optional `ca` secret (present only during
# that RUN) as PIP_CERT.
FROM base AS wheel
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY models /src/models
COPY training /src/training
COPY recsys_cli /src/recsys_cli
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip wheel --no-deps --wheel-dir /wheels /src

# Serving: the base dependencies of pyproject.toml only (no `train` extra, so no torch).
FROM base AS serve
RUN --mount=type=secret,id=ca --mount=type=bind,from=requirements,source=/src,target=/req \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install -r /req/serve.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/recsys-*.whl \
 && ! python -c "import torch" 2>/dev/null
USER recsys
VOLUME ["/data"]
EXPOSE 8000
# slim images have no curl; /readyz answers 503 until a version is loaded
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["recsys", "serve", "--host", "0.0.0.0", "--port", "8000", "--artifacts", "/data/artifacts"]

# Training, export and re-index: the `train` extra with the CPU build of the pinned torch,
# installed first (from TORCH_INDEX_URL, or a wheel in WHEELS_IMAGE) so that `torch==2.13.0`
# in the extra is already met by `2.13.0+cpu`.
FROM base AS train
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=ca --mount=type=bind,from=requirements,source=/src,target=/req \
    --mount=type=bind,from=local-wheels,target=/local-wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --find-links /local-wheels --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
 && pip install -r /req/serve.txt -r /req/train.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/recsys-*.whl
USER recsys
VOLUME ["/data"]
CMD ["recsys", "demo", "--no-serve", "--out", "/data/runs", "--artifacts", "/data/artifacts"]
