# syntax=docker/dockerfile:1
# Two images from one file (DESIGN.md §1, §8):
#   docker build --target serve -t recsys-serve .   ONNX Runtime + FAISS + NumPy, no torch
#   docker build --target train -t recsys-train .   + CPU torch: train, export, reindex, demo
# Both run as the non-root user `recsys` (uid 10001) and keep data under /data.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
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

# The package as a wheel, so neither image carries the source tree or build tools.
FROM base AS wheel
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY models /src/models
COPY training /src/training
RUN pip wheel --no-deps --wheel-dir /wheels /src

# Serving: the base dependencies of pyproject.toml only (no `train` extra, so no torch).
FROM base AS serve
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/recsys-*.whl && rm -rf /wheels \
 && ! python -c "import torch" 2>/dev/null
USER recsys
VOLUME ["/data"]
EXPOSE 8000
# slim images have no curl; /readyz answers 503 until a version is loaded
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["recsys", "serve", "--host", "0.0.0.0", "--port", "8000", "--artifacts", "/data/artifacts"]

# Training, export and re-index: the `train` extra with the CPU build of the pinned torch
# (installed first from the PyTorch CPU index; `torch==2.13.0` then matches `2.13.0+cpu`).
FROM base AS train
COPY --from=wheel /wheels /wheels
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install "$(echo /wheels/recsys-*.whl)[train]" && rm -rf /wheels
USER recsys
VOLUME ["/data"]
CMD ["recsys", "demo", "--no-serve", "--out", "/data/runs", "--artifacts", "/data/artifacts"]
