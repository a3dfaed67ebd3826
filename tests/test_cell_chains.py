"""Chains of cell steps (csrc/cell_chain.cpp): in eager training the steps of a cell loop read
their weights through one node, and their weight gradients are summed in a few products when
autograd reaches it. Every way a program can run backward over such a loop must give torch.nn's
gradients: one pass, repeated passes (retain_graph), part of the graph, some weights frozen,
hooks, double backward; and the chain must form only where it is exact."""
from __future__ import annotations

import pytest
import torch

from fastbptt import native
from fastbptt.nn import CELL_MODULE_OF_CELL, TORCH_CELL_MODULE_OF_CELL, cell_kwargs
from test_cell_modules import CELLS, INPUT, HIDDEN, native as needs_native

pytestmark = needs_native
STEPS, BATCH = 7, 3


def make_pair(cell: str, dtype=torch.float64, bias: bool = True, backend: str = "cpu"):
    torch.manual_seed(0)
    ref = TORCH_CELL_MODULE_OF_CELL[cell](INPUT, HIDDEN, bias=bias, **cell_kwargs(cell)).to(dtype)
    fast = CELL_MODULE_OF_CELL[cell](INPUT, HIDDEN, bias=bias, backend=backend, **cell_kwargs(cell)).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def inputs(batch=BATCH, dtype=torch.float64, steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    lead = () if batch is None else (batch,)
    return torch.randn(steps, *lead, INPUT, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()


def loop(module, xs, state=None):
    """The hidden states of a loop over xs (stacked) and the last state."""
    outs = []
    for x_t in xs:
        state = module(x_t, state)
        outs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outs), state


def weighted(outs):
    gen = torch.Generator().manual_seed(2)
    return (outs * torch.randn(outs.shape, generator=gen, dtype=outs.dtype)).sum()


def grads_of(module, xs):
    return [xs.grad] + [p.grad for p in module.parameters()]


def chain_of(state):
    """An id of the chain whose step produced ``state``; None when no chain step did."""
    info = native._C.cell_chain_info(state[0] if isinstance(state, tuple) else state)
    return None if info is None else info[0]


def passes_held(state) -> int:
    """How many backward passes the tape of ``state``'s chain holds sums of."""
    return native._C.cell_chain_info(state[0] if isinstance(state, tuple) else state)[1]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch", [1, BATCH, None], ids=["B1", "B3", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_a_loop_is_one_chain_with_torch_nns_gradients(cell, batch, bias):
    ref, fast = make_pair(cell, bias=bias)
    chains = set()
    results = []
    for module in (ref, fast):
        xs = inputs(batch)
        outs, state = [], None
        for x_t in xs:
            state = module(x_t, state)
            outs.append(state[0] if isinstance(state, tuple) else state)
            if module is fast:
                chains.add(chain_of(state))
        weighted(torch.stack(outs)).backward()
        results.append(grads_of(module, xs))
    assert len(chains) == 1 and None not in chains   # every step, the first included, reads the weights through one node
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_many_steps_sum_in_several_products_like_one(cell):
    """More rows than one product takes: several partial sums (the last one short), the same gradients."""
    batch = 48
    steps = 2 * native._C.cell_chain_rows // batch + 2
    ref, fast = make_pair(cell)
    results = []
    for module in (ref, fast):
        xs = inputs(batch, steps=steps)
        weighted(loop(module, xs)[0]).backward()
        results.append(grads_of(module, xs))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell", CELLS)
def test_repeated_and_partial_backward_passes(cell):
    """retain_graph twice, then a pass that asks for the input only (it never reaches the weights and
    must leave nothing behind), then one that asks for a single weight."""
    ref, fast = make_pair(cell)
    results = []
    for module in (ref, fast):
        xs = inputs()
        outs, state = loop(module, xs)
        loss = weighted(outs)
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        (grad_x,) = torch.autograd.grad(loss, [xs], retain_graph=True)
        (grad_w_hh,) = torch.autograd.grad(2 * loss, [module.weight_hh])
        results.append(grads_of(module, xs) + [grad_x, grad_w_hh])
        if module is fast:
            assert passes_held(state) == 0
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell", CELLS)
def test_two_losses_on_overlapping_steps(cell):
    """A loss on the first steps backpropagated alone, then one on all: the first steps' gradients
    arrive twice, each pass on its own."""
    ref, fast = make_pair(cell)
    results = []
    for module in (ref, fast):
        xs = inputs()
        outs, _ = loop(module, xs)
        outs[:3].sum().backward(retain_graph=True)
        weighted(outs).backward()
        results.append(grads_of(module, xs))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm"])
def test_frozen_weights_and_hooks(cell):
    """Only some weights train; a hook on a weight sees its whole gradient, once per pass."""
    ref, fast = make_pair(cell)
    results, seen = [], {}
    for module in (ref, fast):
        module.weight_ih.requires_grad_(False)
        calls = seen[module] = []
        module.weight_hh.register_hook(lambda g, calls=calls: calls.append(g.clone()))
        xs = inputs()
        weighted(loop(module, xs)[0]).backward()
        results.append([xs.grad, module.weight_hh.grad, module.bias_ih.grad, module.bias_hh.grad])
        assert module.weight_ih.grad is None
    assert len(seen[fast]) == len(seen[ref]) == 1
    torch.testing.assert_close(seen[fast][0], seen[ref][0])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell", CELLS)
def test_double_backward_through_a_chain(cell):
    """A gradient penalty over a loop: torch.nn's second derivatives."""
    ref, fast = make_pair(cell)
    results = []
    for module in (ref, fast):
        xs = inputs()
        loss = weighted(loop(module, xs)[0])
        grads = torch.autograd.grad(loss, [xs, *module.parameters()], create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, [xs, *module.parameters()]))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_chain_ends_where_its_weights_or_its_state_change(cell):
    """A detached state or an updated weight starts a new chain; no grad mode makes none."""
    _, fast = make_pair(cell)
    xs = inputs()
    _, state = loop(fast, xs[:2])
    first = chain_of(state)
    assert chain_of(fast(xs[2], state)) == first
    detached = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    assert chain_of(fast(xs[2], detached)) != first
    with torch.no_grad():
        fast.weight_hh.add_(0.01)
    assert chain_of(fast(xs[2], state)) != first
    with torch.no_grad():
        out = fast(xs[2], state)
    assert (out[0] if isinstance(out, tuple) else out).grad_fn is None


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bfloat16_chain_within_torch_nns_own_error(cell):
    """bfloat16 weight gradients of a loop: sums in float32, no further from the float64 result than
    torch.nn's own bfloat16 cell."""
    ref64, _ = make_pair(cell)
    ref, fast = make_pair(cell, dtype=torch.bfloat16)
    results = []
    for module in (ref64, ref, fast):
        xs = inputs(dtype=module.weight_ih.dtype)
        weighted(loop(module, xs)[0].double()).backward()
        results.append([p.grad.double() for p in module.parameters()])
    for exact, theirs, ours in zip(*results):
        assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-2


@pytest.mark.parametrize("cell", CELLS)
def test_all_weights_frozen_input_and_state_gradients(cell):
    """Only the input and the initial state train (the weights frozen): the steps still run as a
    chain, with nothing to sum for the weights."""
    ref, fast = make_pair(cell)
    start = torch.randn(BATCH, HIDDEN, dtype=torch.float64)
    results = []
    for module in (ref, fast):
        module.requires_grad_(False)
        xs = inputs()
        h0 = start.clone().requires_grad_()
        state0 = (h0, torch.zeros_like(h0)) if cell == "lstm" else h0
        outs, state = loop(module, xs, state0)
        weighted(outs).backward()
        results.append([xs.grad, h0.grad])
        if module is fast:
            assert passes_held(state) == 0
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_chain_gradients_match_torch_nn(cell):
    """A loop on the cuda backend (its backward runs on autograd's device thread) against torch.nn
    on the same GPU, float64, with repeated passes."""
    ref, fast = make_pair(cell, backend="cuda")
    ref, fast = ref.cuda(), fast.cuda()
    results = []
    for module in (ref, fast):
        xs = inputs().detach().cuda().requires_grad_()
        outs, state = loop(module, xs)
        loss = weighted(outs.cpu())
        loss.backward(retain_graph=True)
        loss.backward()
        results.append(grads_of(module, xs))
        if module is fast:
            assert passes_held(state) == 0
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
