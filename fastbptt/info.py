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
    lines.append("backends:")
    for name, spec in dispatch.BACKENDS.items():
        reason = dispatch.availability(name)
        state = "available" if not reason else f"unavailable: {reason}"
        lines.append(f"  {name:<10} {spec.summary:<50} {state}")
    lines.append("")
    lines.append("backend='auto' picks, in order:")
    for device, order in dispatch.PREFERENCE.items():
        chosen = next((n for n in order if not dispatch.availability(n)), "reference")
        lines.append(f"  {device:<5} {' > '.join(order)}  -> {chosen}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def main(args: argparse.Namespace | None = None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
