"""Truncated backpropagation through time, TBPTT(k1, k2), written with cells, one step at a time.

A recurrent cell reads a long stream one step at a time and carries its hidden state from step
to step; it never restarts. Backpropagating through the whole stream would keep a graph that
grows without bound, so TBPTT(k1, k2) truncates it:

* every ``k1`` steps, at ``t = k1, 2 k1, 3 k1, ...``, the losses of the last ``k1`` steps,
  ``t - k1 + 1 .. t``, are summed and backpropagated, and the optimizer updates the weights;
* their gradient flows back through the last ``k2`` steps only (``k2 >= k1``): the loss of step
  ``s`` reaches steps ``t - k2 + 1 .. s`` (those that are also steps of the stream, ``>= 1``),
  and the state that entered step ``t - k2 + 1`` counts as a constant. The newest loss is
  backpropagated through ``k2`` steps, the oldest of the ``k1`` through ``k2 - k1 + 1``.

``k1 = k2`` is the usual "detach every k steps"; ``k2 > k1`` gives each loss a longer reach at
the cost of backpropagating ``k2`` steps per update.

Implementation: one small graph per step. Each step starts from a detached copy of the state
that requires grad, a leaf, so the graph of step ``s`` is ``state_in(s) -> state_out(s), loss(s)``
and nothing links it to step ``s - 1``. A deque keeps the last ``k2`` steps; older graphs fall out
of it and are freed, so memory stays bounded. At an update the gradient is pushed back by hand,
newest step first: the gradient a step's input leaf receives is fed to the previous step's output,
down to the oldest step in the deque, where it stops. With ``k2 > k1`` a step's graph is
backpropagated at several updates, and the gradient runs through the weights that step actually
ran on: the steps between two updates run on one clone of the parameters (the clone passes its
gradient on to the parameters), which the optimizer's in-place update leaves alone.

The demo predicts the next value of a noisy multi-channel signal (sums of sines) with a cell and
a linear head::

    python examples/cell_tbptt.py --cell gru --k1 8 --k2 16
"""
from __future__ import annotations

import argparse
import collections
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastbptt

CELLS = {"rnn": "RNNCell", "gru": "GRUCell", "lstm": "LSTMCell"}


def check_window(k1: int, k2: int) -> None:
    """Raises ValueError naming the argument unless ``1 <= k1 <= k2``."""
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if k2 < k1:
        raise ValueError(f"k2 (steps backpropagated, {k2}) must be >= k1 (steps per update, {k1})")


def make_signal(steps: int, batch: int, channels: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """``[steps + 1, batch, channels]``: per channel a sum of three sines (frequencies shared by
    the batch, phases per sequence) plus noise; step ``s`` predicts row ``s`` from row ``s - 1``."""
    g = torch.Generator().manual_seed(seed)
    freq = 2 * math.pi * (0.01 + 0.09 * torch.rand(1, 1, channels, 3, generator=g, dtype=dtype))
    phase = 2 * math.pi * torch.rand(1, batch, channels, 3, generator=g, dtype=dtype)
    amp = 0.2 + 0.8 * torch.rand(1, 1, channels, 3, generator=g, dtype=dtype)
    t = torch.arange(steps + 1, dtype=dtype).view(-1, 1, 1, 1)
    clean = (amp * torch.sin(freq * t + phase)).sum(-1)
    return clean + 0.05 * torch.randn(clean.shape, generator=g, dtype=dtype)


class Predictor(nn.Module):
    """A cell and a linear head: one step maps (x_s, state) to (prediction of x_{s+1}, state)."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(cell.hidden_size, cell.input_size)

    def forward(self, x, state):
        state = self.cell(x, state)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h), state


def build_model(cell_cls, input_size: int, hidden: int, seed: int, dtype=torch.float32,
                cell_kwargs=None) -> Predictor:
    # fork the RNG: the weights depend on the seed alone, and the caller's RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Predictor(cell_cls(input_size, hidden, **(cell_kwargs or {}))).to(dtype)


def backward_window(window, k1: int, retain_graph: bool) -> None:
    """Accumulates into ``.grad`` the gradient of the last ``k1`` losses in ``window`` (a
    sequence of ``(state_in, state_out, loss)``, oldest first), flowing back through all its steps."""
    grad_out = None                          # gradient w.r.t. the state_out of the step below
    for age, (state_in, state_out, loss) in enumerate(reversed(window)):
        roots, grads = [], []
        if age < k1:                         # one of the k1 newest steps: its loss counts
            roots.append(loss)
            grads.append(torch.ones_like(loss))
        if grad_out is not None:             # what later steps send back through this one's state
            for s, g in zip(state_out, grad_out):
                if g is not None:
                    roots.append(s)
                    grads.append(g)
        for s in state_in:                   # the leaves collect afresh at each update
            s.grad = None
        torch.autograd.backward(roots, grads, retain_graph=retain_graph)
        grad_out = [s.grad for s in state_in]


def train(cell_cls, *, k1: int = 8, k2: int = 16, steps: int = 1200, hidden: int = 32, batch: int = 16,
          channels: int = 3, lr: float = 1e-2, seed: int = 0, dtype=torch.float32, cell_kwargs=None,
          log_every: int = 0, on_update=None):
    """Trains ``Predictor(cell_cls(channels, hidden, **cell_kwargs))`` on the signal with
    TBPTT(k1, k2) and Adam. Returns ``(model, losses)``: ``losses[i]`` is the mean loss of the
    ``k1`` steps of update ``i``. ``on_update(t, model)`` is called at each update once the
    gradient is in ``.grad``, before the optimizer step. Steps after the last multiple of ``k1``
    run but do not update."""
    check_window(k1, k2)
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    signal = make_signal(steps, batch, channels, seed, dtype)
    model = build_model(cell_cls, channels, hidden, seed, dtype, cell_kwargs)
    names, params = zip(*model.named_parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    lstm = isinstance(model.cell, nn.LSTMCell)
    state = tuple(signal.new_zeros(batch, hidden) for _ in range(2 if lstm else 1))
    window = collections.deque(maxlen=k2)    # (state_in, state_out, loss) of the last k2 steps
    # a graph is revisited by later updates only when k2 > k1
    retain_graph = k2 > k1
    losses = []
    for t in range(1, steps + 1):
        if (t - 1) % k1 == 0:
            # the weights steps t .. t + k1 - 1 run on; graphs kept from older steps hold
            # their own clones, which the optimizer's in-place updates do not touch
            weights = {n: p.clone() for n, p in zip(names, params)}
        state_in = tuple(s.detach().requires_grad_() for s in state)
        pred, state_out = functional_call(model, weights, (signal[t - 1], state_in if lstm else state_in[0]))
        state = state_out if lstm else (state_out,)
        window.append((state_in, state, F.mse_loss(pred, signal[t])))
        if t % k1 == 0:
            optimizer.zero_grad()
            backward_window(window, k1, retain_graph)
            if on_update is not None:
                on_update(t, model)
            optimizer.step()
            losses.append(sum(loss.item() for _, _, loss in list(window)[-k1:]) / k1)
            if log_every and len(losses) % log_every == 0:
                print(f"step {t:6d}  update {len(losses):5d}  loss {losses[-1]:.5f}")
    return model, losses


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TBPTT(k1, k2) with fastbptt's cells, one step at a time: "
                                            "next-value prediction of a noisy multi-channel signal.")
    p.add_argument("--cell", choices=sorted(CELLS), default="gru")
    p.add_argument("--k1", type=int, default=8, help="steps between updates (losses per update)")
    p.add_argument("--k2", type=int, default=16, help="steps backpropagated per update (>= k1)")
    p.add_argument("--steps", type=int, default=1200, help="length of the stream")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="parallel streams")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="fastbptt backend of the cell (see `fastbptt info`)")
    p.add_argument("--log-every", type=int, default=25, help="print the loss every N updates")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_window(args.k1, args.k2)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps < args.k1:
        print(f"error: --steps ({args.steps}) must be >= --k1 ({args.k1}) for at least one update",
              file=sys.stderr)
        return 2
    cell_cls = getattr(fastbptt, CELLS[args.cell])
    print(f"fastbptt.{cell_cls.__name__}, TBPTT(k1={args.k1}, k2={args.k2}), {args.steps} steps, "
          f"batch {args.batch}, hidden {args.hidden}, backend {args.backend!r}")
    _, losses = train(cell_cls, k1=args.k1, k2=args.k2, steps=args.steps, hidden=args.hidden, batch=args.batch,
                      channels=args.channels, lr=args.lr, seed=args.seed, cell_kwargs={"backend": args.backend},
                      log_every=args.log_every)
    signal = make_signal(args.steps, args.batch, args.channels, args.seed)
    # for scale: predicting that the next value equals the current one
    baseline = F.mse_loss(signal[:-1], signal[1:]).item()
    print(f"final loss {losses[-1]:.5f} (first update {losses[0]:.5f}; repeat-last-value baseline {baseline:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
