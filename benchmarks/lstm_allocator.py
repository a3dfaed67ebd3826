"""LSTM training on CPU under two settings of glibc's heap allocator, for docs/cpu.md.

oneDNN's LSTM (torch.nn's CPU LSTM, and fastbptt's ``cpu:onednn`` path in training) allocates its
workspace on every call. Under glibc's default settings a block above the mmap threshold comes as
fresh pages that fault in on first touch; with the threshold raised ("raised": MALLOC_MMAP_THRESHOLD_
and MALLOC_TRIM_THRESHOLD_ at 1 GiB) the workspace stays in the heap from call to call. For each
shape and setting, one process times, interleaved: torch.nn.LSTM, fastbptt.LSTM with its defaults
(the rule picks the path, and the heap setting is part of the rule), and fastbptt forced to keep-gates
on the packed path and to the onednn path; forward+backward with a fixed output gradient.

    python benchmarks/lstm_allocator.py --threads 2          # the shapes of docs/cpu.md
    python benchmarks/lstm_allocator.py --smoke              # tiny shapes, to check the script

Prints a markdown table: torch.nn's time, the speed-up over it of the others, and the default's path.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SHAPES = ["32,256,128,1", "8,512,256,1", "128,128,128,1", "1,1024,512,1", "20,200,35,2"]  # B,H,T,layers
SETTINGS = {"default": {}, "raised": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}}
# fastbptt's keyword arguments per candidate, after torch.nn
FASTBPTT = {"fastbptt default": {}, "packed, keep gates": dict(backend="cpu:packed", recompute=False),
            "onednn": dict(backend="cpu:onednn")}
CANDIDATES = ("torch.nn", *FASTBPTT)


def default_path(batch: int, hidden: int, steps: int) -> str:
    """The kernel path fastbptt's rule takes for these layers in training, in this process."""
    from fastbptt import dispatch
    from fastbptt.ops import layer_call

    call = layer_call(False, False, "auto", "lstm", steps, batch, hidden, torch.float32)
    return dispatch.layer_kernel("cpu", "lstm", torch.float32, batch, hidden, 0, call)


def measure(shape: str, reps: int) -> dict:
    """Median seconds of one training call per candidate, interleaved in this process, and the
    default's kernel path."""
    import fastbptt

    batch, hidden, steps, layers = (int(v) for v in shape.split(","))
    torch.manual_seed(0)
    models = {"torch.nn": torch.nn.LSTM(hidden, hidden, layers)}
    for name, kwargs in FASTBPTT.items():
        models[name] = fastbptt.LSTM(hidden, hidden, layers, **kwargs)
        models[name].load_state_dict(models["torch.nn"].state_dict())
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    grad = torch.randn(steps, batch, hidden)
    times = {name: [] for name in models}
    for rnd in range(reps + 2):  # 2 warm-up rounds
        for name, model in models.items():
            for p in (*model.parameters(), x):
                p.grad = None
            start = time.perf_counter()
            model(x)[0].backward(grad)
            if rnd >= 2:
                times[name].append(time.perf_counter() - start)
    return {"times": {name: statistics.median(t) for name, t in times.items()},
            "default_path": default_path(batch, hidden, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 2 rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one shape, in a process of its own
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.reps)))
        return
    shapes, reps = (["2,8,5,2"], 2) if args.smoke else (SHAPES, args.reps)
    from fastbptt.bench.environment import describe, environment

    env = environment("cpu")
    del env["allocator"]  # each row names its own setting
    print(f"{describe(env)}; {reps} interleaved rounds, medians\n")
    print("| B,H,T,layers | setting | torch.nn | " + " | ".join(CANDIDATES[1:]) + " | default's path |")
    print("|---|---|---|" + "---|" * len(CANDIDATES))
    for shape in shapes:
        for setting, extra in SETTINGS.items():
            inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS["raised"]}
            cmd = [sys.executable, __file__, "--child", shape, "--threads", str(args.threads), "--reps", str(reps)]
            out = subprocess.run(cmd, env={**inherited, **extra}, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            t = result["times"]
            ratios = " | ".join(f"{t['torch.nn'] / t[name]:.2f}x" for name in CANDIDATES[1:])
            print(f"| {shape} | {setting} | {t['torch.nn'] * 1e3:.1f} ms | {ratios} | {result['default_path']} |")


if __name__ == "__main__":
    main()
