"""examples/cell_tbptt.py: TBPTT(k1, k2) with cells, one step at a time. fastbptt's cells train as
torch.nn's do, the update gradient is exactly the truncated one (against a brute-force graph per
loss), bad k1/k2 are refused, and the command line runs."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastbptt
from conftest import cpu_backends
from helpers import load_script

pytestmark = pytest.mark.usefixtures("one_thread")

example = load_script("examples/cell_tbptt.py")

CELLS = ["RNNCell", "GRUCell", "LSTMCell"]
TINY = dict(hidden=5, batch=2, channels=2)


def fast_cell(name):
    return getattr(fastbptt, name)


# ----------------------------------------------------------------------------- parity with torch.nn
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", CELLS)
def test_fastbptt_cells_train_as_torch_nn(name, backend):
    """Same seed, same initial weights; float64, so the two runs agree to rounding over every update."""
    kw = dict(k1=3, k2=5, steps=24, seed=1, dtype=torch.float64, **TINY)
    sizes = TINY["channels"], TINY["hidden"], kw["seed"]
    fast_init = example.build_model(fast_cell(name), *sizes, cell_kwargs={"backend": backend}).state_dict()
    torch.testing.assert_close(fast_init, example.build_model(getattr(nn, name), *sizes).state_dict(), rtol=0, atol=0)
    fast, fast_losses = example.train(fast_cell(name), cell_kwargs={"backend": backend}, **kw)
    ref, ref_losses = example.train(getattr(nn, name), **kw)
    assert type(fast.cell) is fast_cell(name) and fast.cell.backend == backend
    assert type(ref.cell) is getattr(nn, name)
    assert len(fast_losses) == 24 // 3
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.state_dict(), ref.state_dict(), rtol=1e-10, atol=1e-12)
    assert fast_losses[-1] < fast_losses[0]    # and it learns


# ----------------------------------------------------------------------------- exact truncation
def brute_force_grads(model, signal, weights, k1, t, reach):
    """The gradient of the update at step ``t``, built independently of the example: one graph
    per loss ``s`` in ``t - k1 + 1 .. t`` that starts from the detached state of step
    ``t - reach`` (the initial state if that is before the stream) and runs to ``s``; step ``u``
    runs on ``weights[(u - 1) // k1]``, the weights of its time. ``reach = k2`` is TBPTT(k1, k2);
    ``reach = t`` is full BPTT. Each epoch's weights are separate leaves; their gradients add up."""
    lstm = isinstance(model.cell, nn.LSTMCell)
    batch, hidden = signal.shape[1], model.cell.hidden_size
    state = (signal.new_zeros(batch, hidden),) * (2 if lstm else 1)
    trajectory = [state]                                   # trajectory[u]: the state after step u
    with torch.no_grad():
        for u in range(1, t + 1):
            _, out = functional_call(model, weights[(u - 1) // k1], (signal[u - 1], state if lstm else state[0]))
            state = out if lstm else (out,)
            trajectory.append(state)
    leaves = [{n: w.clone().requires_grad_() for n, w in ws.items()} for ws in weights]
    start = max(t - reach, 0)
    total = 0
    for s in range(t - k1 + 1, t + 1):
        state = trajectory[start]
        for u in range(start + 1, s + 1):
            pred, out = functional_call(model, leaves[(u - 1) // k1], (signal[u - 1], state if lstm else state[0]))
            state = out if lstm else (out,)
        total = total + F.mse_loss(pred, signal[s])
    # weights of epochs outside the window get no gradient: zeros
    grads = torch.autograd.grad(total, [w for ws in leaves for w in ws.values()], materialize_grads=True)
    names = list(weights[0])
    return {n: sum(grads[e * len(names) + i] for e in range(len(leaves))) for i, n in enumerate(names)}


@pytest.mark.parametrize("k1,k2", [(2, 2), (2, 3), (3, 7)])
@pytest.mark.parametrize("name", CELLS)
def test_update_gradient_is_exactly_truncated(name, k1, k2):
    """Every update's gradient equals the brute-force TBPTT(k1, k2) one, with weights that change
    between updates; and once t > k2 it is not full BPTT's, so the truncation is really there."""
    steps, seed = 4 * k1 + k2, 2
    steps -= steps % k1
    seen = []                                  # (t, weights before the step, their gradient)

    def record(t, model):
        seen.append((t, {n: p.detach().clone() for n, p in model.named_parameters()},
                     {n: p.grad.clone() for n, p in model.named_parameters()}))

    example.train(fast_cell(name), k1=k1, k2=k2, steps=steps, seed=seed, lr=0.05, dtype=torch.float64,
                  on_update=record, **TINY)
    assert [t for t, _, _ in seen] == list(range(k1, steps + 1, k1))
    # the reference runs torch.nn's cell: plain autograd all the way
    model = example.build_model(getattr(nn, name), TINY["channels"], TINY["hidden"], seed, torch.float64)
    signal = example.make_signal(steps, TINY["batch"], TINY["channels"], seed, torch.float64)
    weights = [w for _, w, _ in seen]
    assert not torch.equal(weights[0]["head.weight"], weights[1]["head.weight"])   # the weights did move
    differs = []
    for t, _, grad in seen:
        expected = brute_force_grads(model, signal, weights, k1, t, k2)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
        full = brute_force_grads(model, signal, weights, k1, t, t)
        gap = max((grad[n] - full[n]).abs().max().item() for n in grad)
        if t <= k2:
            assert gap < 1e-9                 # the window reaches the start of the stream: nothing cut
        else:
            differs.append(gap)
    assert differs and min(differs) > 1e-6


# ----------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("k1,k2,arg", [(0, 4, "k1"), (-2, 4, "k1"), (2.0, 4, "k1"), (True, 4, "k1"),
                                       (4, 0, "k2"), (4, -1, "k2"), (4, 3, "k2"), (2, None, "k2")])
def test_bad_window_raises_value_error_naming_the_argument(k1, k2, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        example.train(nn.GRUCell, k1=k1, k2=k2, steps=8, **TINY)


def test_bad_steps_raises():
    with pytest.raises(ValueError, match="^steps"):
        example.train(nn.GRUCell, k1=2, k2=2, steps=0, **TINY)


def test_cli_refuses_k2_below_k1(capsys):
    assert example.main(["--k1", "4", "--k2", "2", "--steps", "8"]) == 2
    assert "k2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_cli_runs_and_prints_a_final_loss(cell, capsys):
    assert example.main(["--cell", cell, "--k1", "2", "--k2", "3", "--steps", "12", "--hidden", "4",
                         "--batch", "2", "--channels", "2", "--log-every", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"fastbptt.{example.CELLS[cell]}" in out
    assert len(re.findall(r"^step +\d+ +update +\d+ +loss", out, re.M)) == 3
    final = re.search(r"final loss (\S+)", out)
    assert final and float(final.group(1)) > 0
