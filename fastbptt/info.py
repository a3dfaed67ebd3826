"""``python -m fastbptt.info`` / ``fastbptt info``: versions and which backends can run here."""
from __future__ import annotations

import argparse
import platform

import torch

from . import __version__, dispatch


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def report() -> str:
    from .bench.environment import cpu_capability, cpu_model, gpu_info  # that module imports this one

    lines = [
        f"fastbptt {__version__}",
        f"python   {platform.python_version()} ({platform.machine()})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"{torch.get_num_threads()} CPU threads)",
        f"triton   {triton_version()}",
        f"CPU      {cpu_model()} (ATen CPU capability {cpu_capability()})",
    ]
    if torch.cuda.is_available():
        gpu = gpu_info()
        lines.append(f"GPU      {gpu['gpu']} (compute capability {gpu['gpu_capability']}, {gpu['gpu_sm_count']} SMs, "
                     f"driver {gpu['gpu_driver']}, cuDNN {gpu['cudnn']}; {torch.cuda.device_count()} device(s))")
    else:
        lines.append("GPU      none visible")
    lines.append("")
    lines.append("backends (BACKEND:PATH forces one kernel path; otherwise the first path that takes the case, "
                 "within its batch limit, runs):")
    for name, spec in dispatch.BACKENDS.items():
        reason = dispatch.availability(name)
        state = "available" if not reason else f"unavailable: {reason}"
        lines.append(f"  {name:<10} {spec.summary:<50} {state}")
        lines.extend(path_lines(spec, available=not reason))
    lines.append("")
    lines.append("backend='auto' picks, in order:")
    for device, order in dispatch.PREFERENCE.items():
        chosen = next((n for n in order if not dispatch.availability(n)), "reference")
        lines.append(f"  {device:<5} {' > '.join(order)}  -> {chosen}")
    return "\n".join(lines)


# Cases the paths are asked about, to list what each declines: (cell, projection) x dtype
PROBE_CELLS = (("rnn_tanh", 0), ("gru", 0), ("lstm", 0), ("lstm", 4))
PROBE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PROBE_HIDDEN = (16, 1024)


def path_lines(spec: dispatch.BackendSpec, available: bool) -> list[str]:
    """One line per kernel path: its name, when the rule takes it, what it is; then, where the
    backend runs here, what it declines (asked of the backend itself) and, for the persistent CUDA
    kernel, its capacity on this GPU."""
    lines = []
    for path in spec.paths:
        lines.append(f"    {spec.name + ':' + path.name:<18} {path.rule():<20} {path.summary}")
        if not available:
            continue
        reasons = {dispatch.path_decline(spec.name, path.name, cell, dtype, 4, hidden, proj)
                   for cell, proj in PROBE_CELLS for dtype in PROBE_DTYPES for hidden in PROBE_HIDDEN
                   if not dispatch.decline_reason(spec.name, cell, spec.devices[0], dtype, hidden, proj)}
        reasons.discard("")
        if reasons:
            lines.append(f"      declines: {'; '.join(sorted(reasons))}")
        if path.name == "packed":
            lines.append(f"      micro-kernel ISA here: {dispatch.vector_isa(spec.name)}")
        if path.name == "persistent":
            from .native import persistent_capacity

            caps = ", ".join(f"{str(dt).removeprefix('torch.')} H <= {persistent_capacity(cell, dt, 16)}"
                             for cell in ("gru", "lstm") for dt in (torch.float32, torch.bfloat16))
            lines.append(f"      capacity on this GPU at B=16 (GRU, then LSTM): {caps}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def main(args: argparse.Namespace | None = None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
