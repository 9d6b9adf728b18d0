"""What a training run computed on: the CPU, the versions of the libraries whose arithmetic
decides its numbers, and torch's thread count.

The same code, data and seed train the same model only in the same environment: another NumPy or
torch release, another CPU (other vector kernels) or another thread count changes the order of
floating-point sums, so the losses differ in the last bits and early stopping can end at another
epoch (issue 22's ml-100k retrievers: the same code and seeds on a fresh machine and install
stopped seeds 0 and 1 at 82 and 73 epochs where the session before had stopped them at 50 and 86;
what differed was not recorded then). Every checkpoint records it (training/checkpoints.py
save_checkpoint, extra["environment"]) and `recsys demo` prints it, so two runs that disagree can
be told apart.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = ("torch", "numpy", "faiss-cpu", "onnxruntime")  # the distributions whose versions are recorded
ENVIRONMENT_KEY = "environment"  # the checkpoint's extra key


def environment() -> dict[str, str]:
    """{"cpu", "python", each of PACKAGES ("absent" when not installed), "torch_threads"}, all strings."""
    out = {"cpu": cpu_name(), "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    out["torch_threads"] = str(torch.get_num_threads())
    return out


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the machine type (e.g. 'x86_64')."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def describe(env: dict[str, str]) -> str:
    """One line: 'environment: cpu AMD EPYC, python 3.11.7, torch 2.13.0+cpu, ..., torch_threads 1'."""
    return "environment: " + ", ".join(f"{k} {v}" for k, v in env.items())
