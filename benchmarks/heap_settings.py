"""CPU training under two settings of glibc's heap allocator, for docs/cpu.md.

oneDNN's LSTM (torch.nn's CPU LSTM, and fastbptt's ``cpu:onednn`` path in training) allocates its
workspace on every call, and fastbptt's kept gates are one buffer per layer call. Under glibc's
default settings a block above the mmap threshold (at most 32 MiB) comes as fresh pages that fault in
on first touch; with the threshold raised ("raised": MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
at 1 GiB) such blocks stay in the heap from call to call. For each shape and setting, one process
times its candidates in rounds of rotating order, forward+backward with a fixed output gradient.
Two studies:

- ``paths``: the LSTM under torch.nn, fastbptt's defaults (the rule picks the path, and the heap
  setting is part of the rule), and fastbptt forced to keep-gates on the packed path and to the onednn
  path;
- ``keep-budget``: the LSTM and the GRU under torch.nn and fastbptt's two memory policies,
  ``recompute=True`` and ``False`` (on the rule's path), at sizes of kept gates around the
  ``recompute="auto"`` budget.

    python benchmarks/heap_settings.py --threads 2                       # the paths study
    python benchmarks/heap_settings.py --study keep-budget --threads 2
    python benchmarks/heap_settings.py --smoke                           # tiny shapes, to check the script

Prints a markdown table: torch.nn's time, the speed-up over it of the others, and the default's path.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import NamedTuple

import torch


class Study(NamedTuple):
    shapes: tuple[str, ...]   # cell,B,H,T,layers
    fastbptt: dict            # fastbptt's keyword arguments per candidate, timed after torch.nn


STUDIES = {
    "paths": Study(
        ("lstm,32,256,128,1", "lstm,8,512,256,1", "lstm,128,128,128,1", "lstm,1,1024,512,1", "lstm,20,200,35,2"),
        {"fastbptt default": {}, "packed, keep gates": dict(backend="cpu:packed", recompute=False),
         "onednn": dict(backend="cpu:onednn")}),
    "keep-budget": Study(
        ("lstm,128,128,128,1", "lstm,64,256,256,1", "lstm,128,256,256,1", "gru,128,128,128,1", "gru,32,256,256,1"),
        {"recompute=True": dict(recompute=True), "recompute=False": dict(recompute=False)}),
}
SETTINGS = {"default": {}, "raised": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}}


def default_path(cell: str, batch: int, hidden: int, steps: int) -> str:
    """The kernel path fastbptt's defaults take for this layer in training, in this process, and
    whether they keep the gates ("cpu:packed, recompute"; the onednn path always keeps its workspace)."""
    from fastbptt import dispatch
    from fastbptt.ops import layer_call

    call = layer_call(False, False, "auto", cell, steps, batch, hidden, torch.float32)
    path = dispatch.layer_kernel("cpu", cell, torch.float32, batch, hidden, 0, call)
    return path if dispatch.names_whole_layer_path(path) else f"{path}, {'keep' if call else 'recompute'}"


def kept_gates_mib(cell: str, batch: int, hidden: int, steps: int) -> float:
    """MiB of gate pre-activations one layer call keeps with recompute=False (float32)."""
    from fastbptt import cells

    return steps * batch * cells.SPECS[cell].saved_width(hidden) * 4 / 2**20


class _TrainingCall:
    """One training call of a model (fastbptt.bench.timing.Timeable): forward, then backward with a fixed
    output gradient, gradients dropped before each round."""
    train = True

    def __init__(self, model, x, grad):
        self.model, self.x, self.grad = model, x, grad

    def reset(self) -> None:
        for p in (*self.model.parameters(), self.x):
            p.grad = None

    def forward(self):
        return self.model(self.x)[0]

    def backward(self, out) -> None:
        out.backward(self.grad)


def measure(study: str, shape: str, reps: int) -> dict:
    """Median seconds of one training call per candidate, timed in rounds of rotating order in this
    process (fastbptt.bench.timing.interleaved, 2 warm-up rounds), and the default's kernel path."""
    from fastbptt.bench import timing
    from fastbptt.nn import MODULE_OF_CELL, TORCH_MODULE_OF_CELL

    cell, *sizes = shape.split(",")
    batch, hidden, steps, layers = (int(v) for v in sizes)
    torch.manual_seed(0)
    models = {"torch.nn": TORCH_MODULE_OF_CELL[cell](hidden, hidden, layers)}
    for name, kwargs in STUDIES[study].fastbptt.items():
        models[name] = MODULE_OF_CELL[cell](hidden, hidden, layers, **kwargs)
        models[name].load_state_dict(models["torch.nn"].state_dict())
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    grad = torch.randn(steps, batch, hidden)
    samples = timing.interleaved({name: _TrainingCall(m, x, grad) for name, m in models.items()}, 2, reps, "cpu")
    failed = {name: s.error for name, s in samples.items() if s.error}
    if failed:
        raise RuntimeError(f"{shape}: {failed}")
    return {"times": {name: statistics.median(s.total) for name, s in samples.items()},
            "default_path": default_path(cell, batch, hidden, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=tuple(STUDIES), default="paths")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 2 rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one shape, in a process of its own
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.study, args.child, args.reps)))
        return
    study = STUDIES[args.study]
    shapes, reps = ((study.shapes[0].split(",")[0] + ",2,8,5,2",), 2) if args.smoke else (study.shapes, args.reps)
    from fastbptt.bench.environment import describe, environment

    env = environment("cpu")
    del env["allocator"]  # each row names its own setting
    print(f"{describe(env)}; {reps} interleaved rounds, medians\n")
    names = tuple(study.fastbptt)
    print("| cell,B,H,T,layers | kept gates per layer | setting | torch.nn | " + " | ".join(names)
          + " | default's path |")
    print("|---|---|---|---|" + "---|" * (len(names) + 1))
    for shape in shapes:
        cell, batch, hidden, steps, _ = shape.split(",")
        mib = kept_gates_mib(cell, int(batch), int(hidden), int(steps))
        for setting, extra in SETTINGS.items():
            inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS["raised"]}
            cmd = [sys.executable, __file__, "--study", args.study, "--child", shape, "--threads", str(args.threads),
                   "--reps", str(reps)]
            out = subprocess.run(cmd, env={**inherited, **extra}, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            t = result["times"]
            ratios = " | ".join(f"{t['torch.nn'] / t[name]:.2f}x" for name in names)
            print(f"| {shape} | {mib:.1f} MiB | {setting} | {t['torch.nn'] * 1e3:.1f} ms | {ratios} | "
                  f"{result['default_path']} |", flush=True)


if __name__ == "__main__":
    main()
