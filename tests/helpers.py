"""Shared test machinery: build a torch.nn / fastbptt module pair with the same weights, run
both forward and backward on the same input, and compare every output and gradient.

Tolerances live in one table per dtype. For float16/bfloat16 a kernel is held to a multiple of
torch.nn's *own* error against a float64 oracle, not to a fixed bound.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastbptt
from fastbptt.lm.model import sequence_cross_entropy
from fastbptt.tbptt import TrainConfig, Trainer

from fastbptt.nn import MODULE_OF_CELL as FAST_CLASS
from fastbptt.nn import cell_kwargs
from fastbptt.nn import TORCH_MODULE_OF_CELL as TORCH_CLASS

# dtype -> (atol, rtol) for fastbptt vs torch.nn on the same dtype (float32/float64)
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
}
# float32 on a GPU at realistic sizes, against cuDNN: sums over hundreds of terms per step in
# another order, compounded over the steps (small shapes are held to TOLERANCES[float32])
GPU_F32_TOLERANCE = (1e-4, 1e-3)
# float16/bfloat16: |fast - oracle| <= LOWP_FACTOR * |torch.nn(lowp) - oracle| + LOWP_ATOL
LOWP_FACTOR = 2.0
LOWP_ATOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclasses.dataclass
class Case:
    cell: str = "gru"
    input_size: int = 5
    hidden_size: int = 6
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    unbatched: bool = False
    packed: bool = False
    with_hx: bool = True
    proj_size: int = 0
    steps: int = 7
    batch: int = 3
    chunk_size: int = 3
    recompute: bool = True

    def module_kwargs(self) -> dict:
        kw = dict(num_layers=self.num_layers, bidirectional=self.bidirectional, batch_first=self.batch_first,
                  bias=self.bias, **cell_kwargs(self.cell))
        if self.proj_size:
            kw["proj_size"] = self.proj_size
        return kw


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository that is not in a package (examples/, benchmarks/), loaded by its
    path, e.g. ``load_script("examples/cell_tbptt.py")``."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_pair(case: Case, backend: str, dtype=torch.float64, device="cpu", seed: int = 0):
    """(torch.nn module, fastbptt module) with identical weights."""
    torch.manual_seed(seed)
    ref = TORCH_CLASS[case.cell](case.input_size, case.hidden_size, **case.module_kwargs()).to(device, dtype)
    fast = FAST_CLASS[case.cell](case.input_size, case.hidden_size, **case.module_kwargs(),
                                 chunk_size=case.chunk_size, recompute=case.recompute, backend=backend).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed: int = 1):
    """Returns (x, hx, lengths) with x and hx leaf tensors requiring grad."""
    g = torch.Generator().manual_seed(seed)
    if case.unbatched:
        shape = (case.steps, case.input_size)
    elif case.batch_first:
        shape = (case.batch, case.steps, case.input_size)
    else:
        shape = (case.steps, case.batch, case.input_size)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    hx = None
    if case.with_hx:
        dirs = 2 if case.bidirectional else 1
        out_size = case.proj_size or case.hidden_size
        lead = (case.num_layers * dirs,) + (() if case.unbatched else (case.batch,))
        h = torch.randn(lead + (out_size,), generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
        if case.cell == "lstm":
            c = torch.randn(lead + (case.hidden_size,), generator=g, dtype=torch.float64).to(device, dtype)
            hx = (h, c.requires_grad_())
        else:
            hx = h
    lengths = None
    if case.packed:
        # unsorted, with ties and a full-length row
        lengths = torch.tensor([max(1, case.steps - (3 * b) % case.steps) for b in range(case.batch)])
        lengths[min(1, case.batch - 1)] = case.steps
    return x, hx, lengths


def run(module, case: Case, x, hx, lengths, seed: int = 2) -> dict:
    """Forward + backward with a random cotangent; returns every output and gradient by name."""
    for p in module.parameters():
        p.grad = None
    leaves = [x] + (list(hx) if isinstance(hx, tuple) else ([hx] if hx is not None else []))
    for t in leaves:
        t.grad = None
    inp = x
    if lengths is not None:
        inp = pack_padded_sequence(x, lengths, batch_first=case.batch_first, enforce_sorted=False)
    out, h_n = module(inp, hx)
    out_t = out.data if lengths is not None else out
    states = h_n if isinstance(h_n, tuple) else (h_n,)
    g = torch.Generator().manual_seed(seed)
    loss = (out_t * torch.randn(out_t.shape, generator=g, dtype=torch.float64).to(out_t)).sum()
    for s in states:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s)).sum()
    loss.backward()
    result = {"output": out_t.detach().clone()}
    result.update({f"state{i}": s.detach().clone() for i, s in enumerate(states)})
    result.update({f"grad_leaf{i}": t.grad.clone() for i, t in enumerate(leaves)})
    result.update({f"grad_{n}": p.grad.clone() for n, p in module.named_parameters()})
    return result


def assert_results_close(actual: dict, expected: dict, atol: float, rtol: float, label: str = "") -> None:
    assert actual.keys() == expected.keys(), (label, sorted(actual), sorted(expected))
    for key in expected:
        torch.testing.assert_close(actual[key].double(), expected[key].double(), atol=atol, rtol=rtol,
                                   msg=lambda m, key=key: f"{label} {key}: {m}")


def assert_parity(case: Case, backend: str, dtype=torch.float64, device="cpu",
                  tolerance: Optional[tuple] = None) -> None:
    """fastbptt(backend) matches torch.nn on outputs, final states and every gradient."""
    ref, fast = make_pair(case, backend, dtype, device)
    x, hx, lengths = make_inputs(case, dtype, device)
    expected = run(ref, case, x, hx, lengths)
    actual = run(fast, case, x, hx, lengths)
    atol, rtol = tolerance or TOLERANCES[dtype]
    assert_results_close(actual, expected, atol, rtol, label=f"{backend} {dtype} {case}")


def assert_lowp_parity(case: Case, backend: str, dtype, device="cpu") -> None:
    """Low precision: fastbptt's error vs a float64 oracle is within LOWP_FACTOR x torch.nn's own."""
    ref64, _ = make_pair(case, "reference", torch.float64, device)
    ref, fast = make_pair(case, backend, dtype, device)
    x, hx, lengths = make_inputs(case, torch.float64, device)
    oracle = run(ref64, case, x, hx, lengths)
    cast = lambda t: None if t is None else (tuple(s.detach().to(dtype).requires_grad_() for s in t) if isinstance(t, tuple)
                                             else t.detach().to(dtype).requires_grad_())
    x_l, hx_l = cast(x), cast(hx)
    torch_err = {k: (v.double() - oracle[k]).abs().max().item() for k, v in run(ref, case, x_l, hx_l, lengths).items()}
    fast_res = run(fast, case, x_l, hx_l, lengths)
    for key, value in fast_res.items():
        err = (value.double() - oracle[key]).abs().max().item()
        bound = LOWP_FACTOR * torch_err[key] + LOWP_ATOL[dtype]
        assert err <= bound, f"{backend} {dtype} {key}: error {err:.3g} > {bound:.3g} (torch.nn's {torch_err[key]:.3g})"


def assert_compile_matches_eager(model: torch.nn.Module, x: torch.Tensor, fullgraph: bool = True) -> None:
    """torch.compile traces ``model`` and gives the eager output and input gradient. fullgraph:
    without graph breaks, which dynamo allows for modules that are ``torch.nn`` RNNs (fastbptt's
    are) only with ``allow_rnn`` set; without fullgraph, dynamo's defaults (a graph break at the
    RNN module, as for torch.nn's)."""
    torch._dynamo.reset()
    out_e, _ = model(x)
    (g_e,) = torch.autograd.grad(out_e.sum(), x)
    with torch._dynamo.config.patch(allow_rnn=fullgraph):
        out_c, _ = torch.compile(model, fullgraph=fullgraph)(x)
    (g_c,) = torch.autograd.grad(out_c.sum(), x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(g_c, g_e)


# ----------------------------------------------------------------------------- the chunk ops

def chunk_op_args(name, dtype=torch.float64, proj=False, masked=True, batch=3, hidden=5, path="blas", device="cpu"):
    """(op, args) for one *_chunk op on a small random case; ``path`` is the op's last argument."""
    g = torch.Generator().manual_seed(0)
    C, B, H = 4, batch, hidden
    P = 2 if proj else H
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
    valid = None
    if masked and B == 3:
        valid = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 1]], dtype=torch.bool, device=device)
    elif masked:  # each row padded at some step
        valid = torch.ones(C, B, dtype=torch.bool)
        for b in range(B):
            valid[(2 * b + 1) % C, b] = False
        valid = valid.to(device)
    ops = torch.ops.fastbptt
    if name == "rnn_forward_chunk":
        return ops.rnn_forward_chunk, (rnd(C, B, H), rnd(B, H), rnd(H, H), valid, rnd(C, B, H), False, path)
    if name == "rnn_backward_chunk":
        return ops.rnn_backward_chunk, (rnd(C, B, H).tanh(), rnd(H, H), rnd(C, B, H), rnd(B, H), valid, False, path)
    if name == "gru_forward_chunk":
        return ops.gru_forward_chunk, (rnd(C, B, 3 * H), rnd(B, H), rnd(3 * H, H), rnd(3 * H), valid,
                                       rnd(C, B, H), rnd(C, B, 3 * H), path)
    if name == "gru_backward_chunk":
        return ops.gru_backward_chunk, (rnd(C, B, 3 * H), rnd(C, B, 3 * H), rnd(C, B, H), rnd(3 * H, H),
                                        rnd(C, B, H), rnd(B, H), valid, path)
    if name == "lstm_forward_chunk":
        return ops.lstm_forward_chunk, (rnd(C, B, 4 * H), rnd(B, P), rnd(B, H), rnd(4 * H, P),
                                        rnd(P, H) if proj else None, valid, rnd(C, B, P), rnd(C, B, 4 * H), path)
    return ops.lstm_backward_chunk, (rnd(C, B, 4 * H), rnd(B, H), rnd(4 * H, P), rnd(P, H) if proj else None,
                                     rnd(C, B, P), rnd(B, P), rnd(B, H), valid, path)


def replace_arg(args: tuple, index: int, value) -> tuple:
    return args[:index] + (value,) + args[index + 1:]


# Bad arguments of the chunk ops and the message each gets: (op, argument index, bad version of
# the argument, message). The CPU and CUDA ops check with one helper (csrc/checks.h), so the same
# cases and messages hold on both devices.
CHUNK_OP_INPUT_ERRORS = [
    ("gru_forward_chunk", 1, lambda a: a[:, :-1].contiguous(), r"expected h0 of shape"),
    ("gru_forward_chunk", 2, lambda a: a.float(),
     r"expected w_hh to have dtype Double like the first input, got Float"),
    ("gru_forward_chunk", 5, lambda a: a.transpose(0, 1), r"expected out .*shape|expected out to be contiguous"),
    ("gru_forward_chunk", 5, lambda a: a.transpose(0, 2).contiguous().transpose(0, 2),
     r"expected out to be contiguous"),
    ("gru_forward_chunk", 4, lambda a: a.to(torch.uint8), r"expected valid to be a bool mask"),
    ("gru_forward_chunk", 0, lambda a: a[..., :-1], r"gi's last dimension must be 3 \* hidden_size, got 14"),
    ("gru_forward_chunk", 0, lambda a: a.transpose(0, 1).contiguous().transpose(0, 1),
     r"expected gi to be contiguous"),
    ("gru_backward_chunk", 4, lambda a: a[:-1], r"expected grad_out of shape \[4, 3, 5\], got \[3, 3, 5\]"),
    ("rnn_forward_chunk", 0, lambda a: a.to(torch.int64), r"pre_in must be float32, float64(, float16)? or bfloat16"),
    ("rnn_backward_chunk", 4, lambda a: a[:-1], r"expected valid of shape \[4, 3\]"),
    ("lstm_forward_chunk", 2, lambda a: a[:, :-1].contiguous(), r"expected c0 of shape"),
    ("lstm_forward_chunk", 1, lambda a: a[0], r"expected h0 to have 2 dimensions, got 1"),
    ("lstm_backward_chunk", 2, lambda a: a[:, :-1].contiguous(), r"expected w_hh of shape"),
    ("lstm_forward_chunk", 0, lambda a: a[0], r"expected gates_in to have 3 dimensions \[C, B, \*\], got 2"),
]


# ----------------------------------------------------------------------------- the TBPTT trainer
class TinyLM(nn.Module):
    """Embedding -> fastbptt RNN -> linear; forward(tokens [B, T], state) -> (logits [B, T, V], state)."""

    def __init__(self, cell="gru", vocab=7, hidden=5, layers=1, dropout=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        cls = {"rnn": fastbptt.RNN, "gru": fastbptt.GRU, "lstm": fastbptt.LSTM}[cell]
        self.embedding = nn.Embedding(vocab, 4)
        self.rnn = cls(4, hidden, layers, batch_first=True, dropout=dropout, chunk_size=2)
        self.head = nn.Linear(hidden, vocab)
        self.double()

    def forward(self, tokens, state=None):
        out, state = self.rnn(self.embedding(tokens), state)
        return self.head(out), state


def tokens(n=400, vocab=7, seed=1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def new_trainer(model, data, cfg, **kw):
    return Trainer(model, data, cfg, loss_fn=sequence_cross_entropy, **kw)


def config(**kw):
    base = dict(batch_size=3, k1=4, optimizer="sgd", lr=0.1, momentum=0.0, clip="none", progress=False,
                log_every=1000, eval_batch_size=2, eval_num_steps=16)
    base.update(kw)
    return TrainConfig(**base)
