"""LSTM training on CPU under two settings of glibc's heap allocator, for docs/cpu.md.

oneDNN's LSTM (torch.nn's CPU LSTM) allocates its workspace on every call. Under glibc's default
settings a block above the mmap threshold comes as fresh pages that fault in on first touch;
with the threshold raised ("raised": MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GiB)
the workspace stays in the heap from call to call. For each shape and setting, one process times,
interleaved: torch.nn.LSTM, fastbptt.LSTM (default settings) and oneDNN's training primitive called
per layer (``aten::mkldnn_rnn_layer`` with train=True, then ``aten::mkldnn_rnn_layer_backward``
with the workspace kept, as torch.nn does), forward+backward with a fixed output gradient.

    python benchmarks/lstm_allocator.py --threads 2          # the shapes of docs/cpu.md
    python benchmarks/lstm_allocator.py --smoke              # tiny shapes, to check the script

Prints a markdown table: torch.nn's time and the speed-up over it of the other two, per setting.
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

from fastbptt.native import ONEDNN_LSTM_MODE

SHAPES = ["32,256,128,1", "8,512,256,1", "128,128,128,1", "1,1024,512,1", "20,200,35,2"]  # B,H,T,layers
SETTINGS = {"default": {}, "raised": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}}
CANDIDATES = ("torch.nn", "fastbptt", "oneDNN per layer")


class OneDNNLayer(torch.autograd.Function):
    """One LSTM layer (with biases) on oneDNN's primitive, its workspace kept for the backward."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        with torch.enable_grad():  # the primitive returns its workspace only with grad mode on
            out, h_n, c_n, workspace = torch.ops.aten.mkldnn_rnn_layer(
                x, w_ih, w_hh, b_ih, b_hh, h0, c0, False, [], ONEDNN_LSTM_MODE, w_hh.shape[1], 1, True, False, False,
                True)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, h_n, c_n, workspace)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, h_n, c_n, workspace = ctx.saved_tensors
        dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0 = torch.ops.aten.mkldnn_rnn_layer_backward(
            x, w_ih, w_hh, b_ih, b_hh, h0, c0, out, h_n, c_n, grad_out, grad_h_n, grad_c_n, False, ONEDNN_LSTM_MODE,
            w_hh.shape[1], 1, True, True, False, [], False, workspace)
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh


def onednn_stack(module: torch.nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    zeros = x.new_zeros(x.shape[1], module.hidden_size)
    for layer in range(module.num_layers):
        weights = [getattr(module, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        x, _, _ = OneDNNLayer.apply(x, zeros, zeros, *weights)
    return x


def measure(shape: str, reps: int) -> dict:
    """Median seconds of one training call per candidate, interleaved in this process."""
    import fastbptt

    batch, hidden, steps, layers = (int(v) for v in shape.split(","))
    torch.manual_seed(0)
    ref = torch.nn.LSTM(hidden, hidden, layers)
    fused = fastbptt.LSTM(hidden, hidden, layers)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    grad = torch.randn(steps, batch, hidden)
    calls = {"torch.nn": lambda: ref(x)[0], "fastbptt": lambda: fused(x)[0],
             "oneDNN per layer": lambda: onednn_stack(ref, x)}
    times = {name: [] for name in calls}
    for rnd in range(reps + 2):  # 2 warm-up rounds
        for name, call in calls.items():
            for p in (*ref.parameters(), *fused.parameters(), x):
                p.grad = None
            start = time.perf_counter()
            call().backward(grad)
            if rnd >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
    print("| B,H,T,layers | setting | torch.nn | " + " | ".join(CANDIDATES[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(CANDIDATES) - 1))
    for shape in shapes:
        for setting, extra in SETTINGS.items():
            inherited = {k: v for k, v in os.environ.items() if k not in SETTINGS["raised"]}
            cmd = [sys.executable, __file__, "--child", shape, "--threads", str(args.threads), "--reps", str(reps)]
            out = subprocess.run(cmd, env={**inherited, **extra}, capture_output=True, text=True, check=True).stdout
            t = json.loads(out.strip().splitlines()[-1])
            ratios = " | ".join(f"{t['torch.nn'] / t[name]:.2f}x" for name in CANDIDATES[1:])
            print(f"| {shape} | {setting} | {t['torch.nn'] * 1e3:.1f} ms | {ratios} |")


if __name__ == "__main__":
    main()
