"""Builds every candidate of a case, times them together, measures their memory and turns the
figures into records (one per case and candidate). A candidate that cannot be built or fails
while running gets ``status: "failed"`` with the error; a fastbptt backend that cannot run here
gets ``status: "unavailable"`` with the reason. Nothing is dropped.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import cells, dispatch
from ..nn import CELL_MODULE_OF_CELL, MODULE_OF_CELL, TORCH_CELL_MODULE_OF_CELL, TORCH_MODULE_OF_CELL, cell_kwargs
from ..ops import layer_call
from . import timing
from .config import Candidate, Case, Plan
from .memory import peak_cuda_bytes, saved_activation_bytes

DTYPE = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
BASELINE = "torch.nn"


class Unavailable(Exception):
    """The candidate cannot run on this machine or case; the message says why."""


# ----------------------------------------------------------------------------- benches

class Bench:
    """One candidate on one case: ``forward()`` runs the layer stack (or the cell loop) on the
    case's input, ``backward(out)`` backpropagates a fixed output gradient (input and all
    parameters get gradients, as inside a model)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor, grad_out: Tensor,
                 train: bool):
        self.fn, self.params, self.x, self.grad_out, self.train = fn, params, x, grad_out, train

    def reset(self) -> None:
        for p in self.params:
            p.grad = None
        self.x.grad = None

    def forward(self) -> Tensor:
        return self.fn(self.x)

    def backward(self, out: Tensor) -> None:
        out.backward(self.grad_out)


def _module_kwargs(case: Case) -> dict:
    return dict(num_layers=case.layers, bidirectional=case.bidirectional, **cell_kwargs(case.cell))


def build_inputs(case: Case, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The torch.nn module (the weights every candidate copies: a layer stack, or a cell for a cell
    loop), x: [T, B, I], grad_out: [T, B, D*H]."""
    device, dtype = torch.device(case.device), DTYPE[case.dtype]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if case.loop == "cell":
        module = TORCH_CELL_MODULE_OF_CELL[case.cell](case.input_size, case.hidden, **cell_kwargs(case.cell))
    else:
        module = TORCH_MODULE_OF_CELL[case.cell](case.input_size, case.hidden, **_module_kwargs(case))
    module = module.to(device, dtype)
    x = torch.randn(case.steps, case.batch, case.input_size, generator=gen).to(device, dtype)
    x.requires_grad_(case.mode == "train")
    grad_out = torch.randn(case.steps, case.batch, case.directions * case.hidden, generator=gen).to(device, dtype)
    return module, x, grad_out


def _first_output(module: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: module(x)[0]


# The compiled baseline of a layer case: one cell step compiled (static shapes, whole graph),
# looped over T in Python; the input projection of all steps is one eager GEMM per layer and
# direction, as any sensible loop would do. Compiling the whole unrolled loop instead would cost
# minutes at T=1024. (A cell loop case compiles the torch.nn cell itself: see build_cell_bench.)

def _rnn_step(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor, relu: bool) -> Tensor:
    return cells.rnn_step(torch.addmm(b_hh, h, w_hh.t()) + gi, relu)


def _gru_step(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    return cells.gru_step(gi, torch.addmm(b_hh, h, w_hh.t()), h)


def _lstm_step(gi: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor) -> tuple[Tensor, Tensor]:
    return cells.lstm_step(torch.addmm(b_hh, h, w_hh.t()) + gi, c)


STEPS = {"rnn_tanh": functools.partial(_rnn_step, relu=False), "rnn_relu": functools.partial(_rnn_step, relu=True),
         "gru": _gru_step, "lstm": _lstm_step}


def compiled_cell_loop(module: nn.RNNBase, cell: str) -> Callable[[Tensor], Tensor]:
    """x: [T, B, I] -> output [T, B, D*H], the same maths as ``module`` (with biases)."""
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
    step = torch.compile(STEPS[cell], dynamic=False, fullgraph=True)
    lstm = cells.SPECS[cell].has_cell_state
    directions = 2 if module.bidirectional else 1

    def run(x: Tensor) -> Tensor:
        steps, batch = x.shape[0], x.shape[1]
        layer_input = x
        for layer in range(module.num_layers):
            outputs = []
            for direction in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)
                b_ih, b_hh = getattr(module, "bias_ih" + sfx), getattr(module, "bias_hh" + sfx)
                gi = torch.nn.functional.linear(layer_input, w_ih, b_ih)    # [T, B, G*H]
                h = x.new_zeros(batch, module.hidden_size)
                c = x.new_zeros(batch, module.hidden_size) if lstm else None
                hs = []
                for t in (range(steps - 1, -1, -1) if direction else range(steps)):
                    if lstm:
                        h, c = step(gi[t], h, c, w_hh, b_hh)
                    else:
                        h = step(gi[t], h, w_hh, b_hh)
                    hs.append(h)
                if direction:
                    hs.reverse()
                outputs.append(torch.stack(hs))
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        return layer_input

    return run


def cell_loop(cell: Callable, lstm: bool, hidden: int) -> Callable[[Tensor], Tensor]:
    """x: [T, B, I] -> the hidden states [T, B, H] of ``cell`` called once per step from a zero
    state, as a model with a per-step loop would do."""
    def run(x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[1], hidden)
        c = x.new_zeros(x.shape[1], hidden) if lstm else None
        hs = []
        for x_t in x:
            if lstm:
                h, c = cell(x_t, (h, c))
            else:
                h = cell(x_t, h)
            hs.append(h)
        return torch.stack(hs)

    return run


def build_cell_bench(case: Case, cand: Candidate, module: nn.Module, x: Tensor, grad_out: Tensor
                     ) -> tuple[Bench, dict]:
    """The bench of one candidate on a cell loop case and its notes; ``module`` is the torch.nn cell."""
    train = case.mode == "train"
    lstm = cells.SPECS[case.cell].has_cell_state
    notes: dict = {}
    if cand.impl == "torch.nn":
        m = copy.deepcopy(module)
        return Bench(cell_loop(m, lstm, case.hidden), list(m.parameters()), x, grad_out, train), notes
    if cand.impl == "torch.compile":
        m = copy.deepcopy(module)
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
        step = torch.compile(m, fullgraph=True, dynamic=False)
        notes["compile"] = ("torch.nn cell compiled with torch.compile(dynamic=False, fullgraph=True), "
                            "Python loop over steps")
        return Bench(cell_loop(step, lstm, case.hidden), list(m.parameters()), x, grad_out, train), notes
    if cand.chunk_size is not None or cand.recompute is not None:
        raise ValueError("chunk_size and recompute do not apply to a cell loop")
    name = cand.backend
    reason = dispatch.availability(name) if name != "auto" else ""
    if reason:
        raise Unavailable(reason)
    try:  # the kernel one step runs, as the cell picks it: "cpu:small-batch", "cpu:blas", "reference", ...
        resolved, path = dispatch.split(dispatch.cell_kernel(name, case.cell, x.device.type, x.dtype, case.batch,
                                                             case.hidden))
    except dispatch.BackendUnavailable as exc:
        raise Unavailable(str(exc)) from None
    notes["resolved_backend"] = resolved
    if path:
        notes["kernel_path"] = path
    m = CELL_MODULE_OF_CELL[case.cell](case.input_size, case.hidden, **cell_kwargs(case.cell),
                                       backend=name).to(x.device, x.dtype)
    m.load_state_dict(module.state_dict())
    return Bench(cell_loop(m, lstm, case.hidden), list(m.parameters()), x, grad_out, train), notes


def build_bench(case: Case, cand: Candidate, module: nn.Module, x: Tensor, grad_out: Tensor) -> tuple[Bench, dict]:
    """The bench of one candidate and its notes. Raises :class:`Unavailable` or any error."""
    if case.loop == "cell":
        return build_cell_bench(case, cand, module, x, grad_out)
    train = case.mode == "train"
    notes: dict = {}
    if cand.impl == "torch.nn":
        m = copy.deepcopy(module)
        if case.device == "cuda":
            m.flatten_parameters()
            notes["cudnn"] = cudnn_notes(case, x)
        return Bench(_first_output(m), list(m.parameters()), x, grad_out, train), notes
    if cand.impl == "torch.compile":
        m = copy.deepcopy(module)
        notes["compile"] = ("cell step compiled with torch.compile(dynamic=False, fullgraph=True), "
                            "Python loop over steps, eager input projection")
        return Bench(compiled_cell_loop(m, case.cell), list(m.parameters()), x, grad_out, train), notes
    # fastbptt, backend forced (or "auto", resolved here and recorded)
    name = cand.backend
    reason = dispatch.availability(name) if name != "auto" else ""
    if reason:
        raise Unavailable(reason)
    try:  # the case itself (device, dtype, size, a forced path's capacity) may be declined
        notes["resolved_backend"] = resolved = dispatch.resolve(name, case.cell, x, case.hidden, 0)
        call = layer_call(case.mode == "infer", False, cand.recompute, case.cell, case.steps, case.batch, case.hidden,
                          x.dtype, resolved)
        notes["kernel_path"] = dispatch.choose_path(resolved, case.cell, x.dtype, case.batch, case.hidden, 0,
                                                    call=call)
    except dispatch.BackendUnavailable as exc:
        raise Unavailable(str(exc)) from None
    m = MODULE_OF_CELL[case.cell](case.input_size, case.hidden, **_module_kwargs(case), chunk_size=cand.chunk_size,
                              recompute=cand.recompute, backend=name).to(x.device, x.dtype)
    m.load_state_dict(module.state_dict())
    return Bench(_first_output(m), list(m.parameters()), x, grad_out, train), notes


# ----------------------------------------------------------------------------- cuDNN

def cudnn_notes(case: Case, x: Tensor) -> dict:
    """The cuDNN flags torch runs under and the RNN algorithm it will pick. torch does not expose
    the choice; it is re-derived from ATen's heuristic (``get_algo`` in
    aten/src/ATen/native/cudnn/RNN.cpp): PERSIST_STATIC_SMALL_H for small H (any dtype but
    float64), PERSIST_STATIC only for float16 with one layer, one direction, H and I multiples of
    128 with H <= 1024, and on sm_80+ (not sm_86, >= 98 SMs) an LSTM/RNN batch that is a multiple
    of 8 and <= 128 (never GRU); STANDARD otherwise."""
    acceptable = bool(torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
                      and torch.backends.cudnn.is_acceptable(x))
    notes = {
        "enabled": bool(torch.backends.cudnn.enabled),
        "version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "benchmark": bool(torch.backends.cudnn.benchmark),
        "deterministic": bool(torch.backends.cudnn.deterministic),
        "allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "used": acceptable,
    }
    if acceptable:
        props = torch.cuda.get_device_properties(x.device)
        notes["algorithm_forward"] = cudnn_algorithm(case, props.major, props.minor, props.multi_processor_count, True)
        notes["algorithm_backward"] = cudnn_algorithm(case, props.major, props.minor, props.multi_processor_count,
                                                      False)
    return notes


def cudnn_algorithm(case: Case, major: int, minor: int, sm_count: int, forward: bool) -> str:
    if case.dtype != "float64":
        small = {"rnn": 384 if forward else 256, "gate": 192 if forward else 128}
        limit = small["rnn"] if case.cell.startswith("rnn") else small["gate"]
        if major >= 6 and case.hidden <= limit:
            return "PERSIST_STATIC_SMALL_H"
    if case.dtype == "float16":
        common = (case.layers == 1 and not case.bidirectional and case.hidden <= 1024 and case.hidden % 128 == 0
                  and case.input_size % 128 == 0)
        b = case.batch
        if major == 7 and minor != 5:
            device_ok = (((b % 16 == 0 and b not in (80, 112)) or b == 8)
                         and ((case.steps >= 40 and b <= 128) or (case.steps >= 20 and b <= 96)
                              or (case.steps >= 10 and b <= 32)))
        elif major >= 8 and sm_count >= 98 and minor != 6:
            if case.cell == "gru":
                device_ok = False
            elif case.cell == "lstm":
                device_ok = b % 8 == 0 and b <= 128
            else:
                device_ok = b % 8 == 0 and b <= 128 and (b < 96 or case.hidden < 896)
        else:
            device_ok = False
        if common and device_ok:
            return "PERSIST_STATIC"
    return "STANDARD"


# ----------------------------------------------------------------------------- one case

def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def _median(summary: Optional[dict]) -> Optional[float]:
    return summary["median_ms"] if summary else None


def _measure_memory(case: Case, bench: Bench) -> dict:
    mem: dict = {}
    train = case.mode == "train"
    bench.reset()
    if train:
        mem["saved_bytes"] = saved_activation_bytes(bench.forward, exclude=[*bench.params, bench.x])
    if case.device == "cuda":
        def step():
            bench.reset()
            if train:
                bench.backward(bench.forward())
                return None
            with torch.inference_mode():
                return bench.forward()
        mem["peak_bytes"] = peak_cuda_bytes(step, bench.x.device)
    bench.reset()
    return mem


def run_case(case: Case, candidates: list[Candidate], warmup: int, reps: int, time_baseline: bool = True) -> list[dict]:
    """Records for every candidate of ``case``; the first candidate must be torch.nn.

    ``time_baseline=False`` measures only torch.nn's memory (for shapes where its time would
    dominate the run); the candidates then have memory ratios but no speedups."""
    assert candidates and candidates[0].is_baseline, "torch.nn comes first: it is the baseline"
    records = {c.label: new_record(case, c) for c in candidates}
    try:
        module, x, grad_out = build_inputs(case)
    except Exception as exc:  # e.g. a dtype the device cannot hold
        for rec in records.values():
            rec.update(status="failed", error=timing.describe_error(exc))
        return list(records.values())

    benches: dict[str, Bench] = {}
    for cand in candidates:
        rec = records[cand.label]
        try:
            bench, notes = build_bench(case, cand, module, x, grad_out)
        except Unavailable as exc:
            rec.update(status="unavailable", error=str(exc))
            continue
        except Exception as exc:
            rec.update(status="failed", error=timing.describe_error(exc))
            continue
        rec["notes"].update(notes)
        if cand.impl == "torch.compile":
            # compile outside the timed region; a compile error is this candidate's failure
            t0 = time.perf_counter()
            try:
                timing.clock_for(case.device)(bench)
            except Exception as exc:
                rec.update(status="failed", error=timing.describe_error(exc))
                continue
            rec["notes"]["first_call_s"] = round(time.perf_counter() - t0, 3)
        benches[cand.label] = bench

    timed = {label: b for label, b in benches.items() if time_baseline or label != BASELINE}
    if case.timed:
        samples = timing.interleaved(timed, warmup, reps, case.device)
    else:  # memory only: one untimed call each, so lazy initialisation is not counted
        samples = timing.interleaved(timed, max(1, warmup), 0, case.device)
    if BASELINE in benches and BASELINE not in timed:
        samples[BASELINE] = timing.Samples()
        records[BASELINE]["notes"]["timed"] = False
    for label, s in samples.items():
        rec = records[label]
        if s.error:
            rec.update(status="failed", error=s.error)
            continue
        rec["status"] = "ok"
        if case.timed and label in timed:
            rec["time"] = {"forward": timing.summary(s.forward), "backward": timing.summary(s.backward),
                           "total": timing.summary(s.total)}
            rec["time_per_step_us"] = _median(rec["time"]["total"]) * 1e3 / case.steps
        try:
            rec["memory"].update(_measure_memory(case, benches[label]))
        except Exception as exc:
            rec["memory"]["error"] = timing.describe_error(exc)

    apply_ratios(list(records.values()))
    return list(records.values())


def new_record(case: Case, cand: Candidate) -> dict:
    out_bytes = (case.steps * case.batch * case.directions * case.hidden
                 * torch.empty((), dtype=DTYPE[case.dtype]).element_size())
    return {
        "key": f"{case.key()}|{cand.label}",
        "case": dataclasses.asdict(case),
        "candidate": {**dataclasses.asdict(cand), "label": cand.label},
        "baseline": BASELINE,
        "status": "pending",
        "error": "",
        "time": None,
        "time_per_step_us": None,
        "speedup": {"forward": None, "backward": None, "total": None},
        "memory": {"saved_bytes": None, "peak_bytes": None, "output_bytes": out_bytes,
                   "saved_ratio": None, "peak_ratio": None, "saved_to_output": None},
        "notes": {},
    }


def apply_ratios(records: list[dict]) -> None:
    """Speedups (baseline median / candidate median) and memory ratios (candidate / baseline),
    both against the torch.nn record of the same case in the same run."""
    base = next((r for r in records if r["candidate"]["impl"] == BASELINE), None)
    for rec in records:
        mem = rec["memory"]
        if mem.get("saved_bytes") is not None:
            mem["saved_to_output"] = mem["saved_bytes"] / mem["output_bytes"]
        if base is None or base["status"] != "ok" or rec["status"] != "ok":
            continue
        if rec["time"] and base["time"]:
            for phase in ("forward", "backward", "total"):
                rec["speedup"][phase] = _ratio(_median(base["time"][phase]), _median(rec["time"][phase]))
        for kind in ("saved", "peak"):
            mem[f"{kind}_ratio"] = _ratio(mem.get(f"{kind}_bytes"), base["memory"].get(f"{kind}_bytes"))


# ----------------------------------------------------------------------------- a whole plan

def run_plan(plan: Plan, progress: Optional[Callable[[str], None]] = None,
             budget_s: Optional[float] = None) -> list[dict]:
    """Records of every case of ``plan``, in order. With ``budget_s``, a case is started only while
    that many seconds have not passed since the start; the cases left get ``status: "skipped"``
    records saying so (a run that must end in time still writes everything it measured)."""
    items = plan.items()
    records: list[dict] = []
    start = time.perf_counter()
    for i, (case, cands) in enumerate(items, 1):
        spent = time.perf_counter() - start
        if budget_s is not None and spent >= budget_s:
            for cand in cands:
                records.append({**new_record(case, cand), "status": "skipped",
                                "error": f"not run: the time budget of {budget_s:g} s was spent"})
            continue
        t0 = time.perf_counter()
        recs = run_case(case, cands, plan.warmup, plan.reps, plan.time_baseline)
        records.extend(recs)
        if progress:
            ok = sum(r["status"] == "ok" for r in recs)
            progress(f"[{i}/{len(items)}] {case.key()}: {ok}/{len(recs)} ok ({time.perf_counter() - t0:.1f} s)")
    skipped = sum(r["status"] == "skipped" for r in records)
    if progress and skipped:
        progress(f"time budget of {budget_s:g} s spent: {skipped} record(s) skipped")
    return records
