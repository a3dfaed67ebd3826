"""The machine and versions a run was measured on, stored beside every result."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from .. import __version__, dispatch, heap
from ..info import triton_version

_REPO = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_capability() -> str:
    """The vector ISA ATen's CPU kernels were dispatched to ("AVX512", "AVX2", "DEFAULT", ...).
    CPU figures differ about 2x between AVX2 and AVX-512 machines of one vendor, and the CPU model
    string alone ("AMD EPYC") often does not tell them apart."""
    return torch.backends.cpu.get_cpu_capability()


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> dict:
    commit = _run(["git", "rev-parse", "HEAD"], cwd=_REPO)
    if not commit:
        return {"commit": "unknown", "dirty": None}
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO))
    return {"commit": commit, "dirty": dirty}


def gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
    return {
        "gpu": props.name,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_sm_count": props.multi_processor_count,
        "gpu_memory_bytes": props.total_memory,
        "gpu_driver": driver[0] if driver else "unknown",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_name(device: str) -> str:
    """A short file-name-safe name of the machine that the figures depend on: the CPU model, its
    ISA and the thread count on CPU, the GPU model on GPU."""
    if device == "cuda" and torch.cuda.is_available():
        return slug(torch.cuda.get_device_name())
    model = re.sub(r"\((R|TM)\)|CPU|Processor|@.*$|\d+-Core", "", cpu_model())
    return f"{slug(model)}-{slug(cpu_capability())}-{torch.get_num_threads()}t"


def environment(device: str) -> dict:
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "machine": machine_name(device),
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "allocator": heap.describe(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "fastbptt": __version__,
        **git_commit(),
        "backends": {name: (dispatch.availability(name) or "available") for name in dispatch.BACKENDS},
    }
    if not dispatch.availability("cpu"):
        env["cpu_packed_isa"] = dispatch.vector_isa("cpu")
    env.update(gpu_info())
    return env


def _on_gpu(env: dict) -> bool:
    # a CPU run on a machine with a GPU still records the GPU; results without a device ran on it
    return bool(env.get("gpu")) and env.get("device", "cuda") == "cuda"


def where(env: dict) -> str:
    """The machine a run was measured on, in words: the GPU for a GPU run, else the CPU with its ISA."""
    if _on_gpu(env):
        return env["gpu"]
    isa = f" ({env['cpu_capability']})" if env.get("cpu_capability") else ""  # absent in older results
    return f"{env.get('cpu_model')}{isa}, {env.get('threads')} threads"


def describe(env: dict) -> str:
    """One line naming the machine and versions, for the top of a table."""
    where_ = where(env)
    if _on_gpu(env):
        where_ += f" (driver {env.get('gpu_driver')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')})"
    else:
        if env.get("cpu_packed_isa"):
            where_ += f", packed kernels {env['cpu_packed_isa']}"
        if env.get("allocator"):  # absent in older results
            where_ += f", {env['allocator']}"
    commit = (env.get("commit") or "unknown")[:10] + ("+dirty" if env.get("dirty") else "")
    return (f"{where_}; torch {env.get('torch')}, Triton {env.get('triton')}, fastbptt {env.get('fastbptt')} "
            f"@ {commit}; {env.get('timestamp')}")
