"""The benchmark harness itself, on tiny shapes: it runs, records every field, takes its ratios
from the same run, reports failures instead of dropping them, and writes JSON, markdown, plots
and comparisons."""
from __future__ import annotations

import argparse
import json
import time

import pytest
import torch
from conftest import cpu_backends
from helpers import load_script

import fastbptt.reference
from fastbptt import dispatch, heap
from fastbptt.bench import cli, config, environment, report, runner
from fastbptt.bench.config import Candidate, Case

TINY = dict(device="cpu", dtype="float32", batch=2, hidden=4, input_size=3, steps=5)
CELL_TINY = dict(device="cpu", dtype="float32", batch=2, hidden=8, input_size=5, steps=3, loop="cell")
REFERENCE = [Candidate("fastbptt", "reference", 2, True), Candidate("fastbptt", "reference", 2, False)]
# the CPU rule's path for B <= 2 on this CPU (fastbptt/dispatch.py)
SMALL_BATCH_RULE = "blas" if not dispatch.availability("cpu") and dispatch.vector_isa("cpu") == "avx512" else \
    "small-batch"
RECORD_FIELDS = {"key", "case", "candidate", "baseline", "status", "error", "time", "time_per_step_us", "speedup",
                 "memory", "notes"}


def run(case: Case, cands, reps: int = 3) -> dict[str, dict]:
    return {r["candidate"]["label"]: r for r in runner.run_case(case, [config.TORCH_NN, *cands], 1, reps)}


@pytest.mark.parametrize("cell", ["rnn_relu", "gru", "lstm"])
def test_train_records_every_field_and_ratios_from_the_same_run(cell):
    recs = run(Case(cell, "train", **TINY), REFERENCE)
    base = recs["torch.nn"]
    for label, rec in recs.items():
        assert set(rec) == RECORD_FIELDS
        assert rec["status"] == "ok", rec["error"]
        assert rec["case"]["cell"] == cell and rec["candidate"]["label"] == label
        for phase in ("forward", "backward", "total"):
            s = rec["time"][phase]
            assert s["reps"] == 3 and len(s["samples_ms"]) == 3
            assert 0 < s["min_ms"] <= s["median_ms"] <= s["max_ms"]
            assert rec["speedup"][phase] == base["time"][phase]["median_ms"] / s["median_ms"]
        assert rec["time_per_step_us"] == pytest.approx(rec["time"]["total"]["median_ms"] * 1e3 / 5)
        mem = rec["memory"]
        assert mem["saved_bytes"] > 0 and mem["output_bytes"] == 5 * 2 * 4 * 4
        assert mem["saved_ratio"] == mem["saved_bytes"] / base["memory"]["saved_bytes"]
        assert mem["saved_to_output"] == mem["saved_bytes"] / mem["output_bytes"]
        assert mem["peak_bytes"] is None  # GPU only
    assert base["speedup"]["total"] == 1.0
    # recompute keeps about the output; torch.nn's GRU and LSTM keep several times more
    if cell != "rnn_relu":
        assert recs[REFERENCE[0].label]["memory"]["saved_ratio"] < 0.5


def test_infer_times_the_forward_only():
    recs = run(Case("gru", "infer", **TINY), REFERENCE[:1])
    for rec in recs.values():
        assert rec["status"] == "ok"
        assert rec["time"]["backward"] is None
        assert rec["time"]["total"] == rec["time"]["forward"]
        assert rec["memory"]["saved_bytes"] is None
    cand = recs[REFERENCE[0].label]
    assert cand["speedup"]["total"] == recs["torch.nn"]["time"]["total"]["median_ms"] / \
        cand["time"]["total"]["median_ms"]


def test_failing_backend_is_reported_not_dropped(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fastbptt.reference, "gru_forward", broken)
    recs = run(Case("gru", "train", **TINY), REFERENCE)
    assert recs["torch.nn"]["status"] == "ok"
    for cand in REFERENCE:
        rec = recs[cand.label]
        assert rec["status"] == "failed"
        assert "kernel exploded" in rec["error"]
        assert rec["time"] is None and rec["speedup"]["total"] is None


def test_backend_that_cannot_run_here_is_unavailable_with_the_reason():
    # 'cuda' never takes CPU tensors: unavailable on a CPU-only machine, declined on a GPU one
    recs = run(Case("lstm", "train", **TINY), [Candidate("fastbptt", "cuda", 2, True)], reps=1)
    rec = recs["fastbptt[cuda,C=2,recompute]"]
    assert rec["status"] == "unavailable" and rec["error"]


@pytest.mark.skipif(bool(dispatch.availability("cpu")), reason="needs the C++ CPU kernels")
def test_records_name_the_kernel_path_and_a_forced_path_that_declines_is_unavailable():
    cands = [Candidate("fastbptt", "cpu", 2, True), Candidate("fastbptt", "cpu:packed", 2, True)]
    gru = run(Case("gru", "train", **TINY), cands, reps=1)  # B=2: small-batch on AVX2, blas on AVX-512
    assert gru["fastbptt[cpu,C=2,recompute]"]["notes"]["kernel_path"] == SMALL_BATCH_RULE
    assert gru["fastbptt[cpu:packed,C=2,recompute]"]["notes"]["kernel_path"] == "packed"
    lstm = run(Case("lstm", "train", **{**TINY, "dtype": "float64"}), cands, reps=1)
    rec = lstm["fastbptt[cpu:packed,C=2,recompute]"]
    assert rec["status"] == "unavailable" and "the packed kernels take float32 and bfloat16" in rec["error"]


@pytest.mark.skipif(bool(dispatch.availability("cpu")) or not torch.backends.mkldnn.is_available(),
                    reason="needs the cpu backend and oneDNN")
def test_a_forced_onednn_path_is_recorded_as_the_module_runs_it(monkeypatch):
    """With recompute="auto" above the gate budget a named onednn path still trains, keeping its workspace
    (the layer entry point's rule): the record names it and is not declined."""
    import fastbptt.ops

    monkeypatch.setattr(fastbptt.ops, "AUTO_KEEP_GATES_BYTES", 0)
    recs = run(Case("lstm", "train", **TINY), [Candidate("fastbptt", "cpu:onednn", 2, "auto")], reps=1)
    rec = recs["fastbptt[cpu:onednn,C=2,auto]"]
    assert rec["status"] == "ok" and rec["notes"]["kernel_path"] == "onednn"


@pytest.mark.parametrize("shape", [TINY, CELL_TINY], ids=["layer", "cell-loop"])
def test_compile_failure_is_reported(monkeypatch, shape):
    def no_compile(*args, **kwargs):
        raise RuntimeError("inductor is not usable here")

    monkeypatch.setattr(torch, "compile", no_compile)
    recs = run(Case("gru", "train", **shape), [config.COMPILED], reps=1)
    assert recs["torch.compile"]["status"] == "failed"
    assert "inductor is not usable here" in recs["torch.compile"]["error"]
    assert recs["torch.nn"]["status"] == "ok"


@pytest.mark.slow
def test_compiled_cell_loop_runs():
    recs = run(Case("lstm", "train", **{**TINY, "bidirectional": True}), [config.COMPILED], reps=1)
    assert recs["torch.compile"]["status"] == "ok", recs["torch.compile"]["error"]
    assert recs["torch.compile"]["notes"]["first_call_s"] > 0


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_compiled_loop_maths_matches_torch_nn(cell, bidirectional, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the loop's maths, without compiling
    case = Case(cell, "train", **TINY, layers=2, bidirectional=bidirectional)
    module, x, _ = runner.build_inputs(case)
    torch.testing.assert_close(runner.compiled_cell_loop(module, cell)(x), module(x)[0])


def test_cudnn_algorithm_follows_atens_heuristic():
    h100 = (9, 0, 132)
    lstm16 = Case("lstm", "train", "cuda", "float16", 16, 768, 768, 1024)
    assert runner.cudnn_algorithm(lstm16, *h100, True) == "PERSIST_STATIC"
    assert runner.cudnn_algorithm(Case(**{**lstm16.__dict__, "cell": "gru"}), *h100, True) == "STANDARD"
    assert runner.cudnn_algorithm(Case(**{**lstm16.__dict__, "dtype": "bfloat16"}), *h100, True) == "STANDARD"
    assert runner.cudnn_algorithm(Case(**{**lstm16.__dict__, "batch": 12}), *h100, True) == "STANDARD"
    assert runner.cudnn_algorithm(Case(**{**lstm16.__dict__, "hidden": 128}), *h100, False) == \
        "PERSIST_STATIC_SMALL_H"


# ----------------------------------------------------------------------------- cell loops

CELL_CANDIDATES = [Candidate("fastbptt", name) for name in cpu_backends()]


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_cell_loop_records_are_ok_with_ratios_from_the_same_run(cell):
    recs = run(Case(cell, "train", **CELL_TINY), CELL_CANDIDATES, reps=1)
    base = recs["torch.nn"]
    assert set(recs) == {"torch.nn", *(f"fastbptt[{name}]" for name in cpu_backends())}
    for label, rec in recs.items():
        assert set(rec) == RECORD_FIELDS
        assert rec["status"] == "ok", rec["error"]
        assert rec["key"] == f"{cell}/train/cpu/float32/B2/H8/I5/T3/L1/uni/cell-loop|{label}"
        assert rec["case"]["loop"] == "cell"
        for phase in ("forward", "backward", "total"):
            assert rec["speedup"][phase] == base["time"][phase]["median_ms"] / rec["time"][phase]["median_ms"]
        mem = rec["memory"]
        assert mem["saved_bytes"] > 0 and mem["output_bytes"] == 3 * 2 * 8 * 4
        assert mem["saved_ratio"] == mem["saved_bytes"] / base["memory"]["saved_bytes"]
    for cand in CELL_CANDIDATES:
        rec = recs[cand.label]
        assert rec["candidate"]["chunk_size"] is None and rec["candidate"]["recompute"] is None
        assert rec["notes"]["resolved_backend"] == cand.backend
        if cand.backend == "cpu":  # the path one step of B=2 takes
            assert rec["notes"]["kernel_path"] == SMALL_BATCH_RULE


def test_cell_loop_infer_times_the_forward_only():
    recs = run(Case("lstm", "infer", **CELL_TINY), CELL_CANDIDATES[:1], reps=1)
    for rec in recs.values():
        assert rec["status"] == "ok", rec["error"]
        assert rec["time"]["backward"] is None and rec["memory"]["saved_bytes"] is None
    assert recs["fastbptt[reference]"]["speedup"]["total"] is not None


def _cell_bench(case: Case, cand: Candidate, inputs):
    module, x, grad_out = inputs
    x.grad = None
    bench, _ = runner.build_bench(case, cand, module, x, grad_out)
    out = bench.forward()
    bench.backward(out)
    return out.detach(), x.grad.clone(), [p.grad.clone() for p in bench.params]


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
def test_cell_loop_maths_matches_torch_nn(cell, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the compiled loop's maths, without compiling
    case = Case(cell, "train", **CELL_TINY)
    inputs = runner.build_inputs(case)
    module, x, _ = inputs
    out, dx, dparams = _cell_bench(case, config.TORCH_NN, inputs)
    # torch.nn's cell loop is the maths of torch.nn's layer with the same weights, from a zero state
    layer = runner.TORCH_MODULE_OF_CELL[cell](5, 8, **runner.cell_kwargs(cell))
    layer.load_state_dict({f"{k}_l0": v for k, v in module.state_dict().items()})
    torch.testing.assert_close(out, layer(x)[0].detach())
    for cand in [config.COMPILED, *CELL_CANDIDATES]:
        got, got_dx, got_dparams = _cell_bench(case, cand, inputs)
        torch.testing.assert_close(got, out, msg=lambda m: f"{cand.label}: {m}")
        torch.testing.assert_close(got_dx, dx, msg=lambda m: f"{cand.label}: {m}")
        for a, b in zip(got_dparams, dparams):
            torch.testing.assert_close(a, b, msg=lambda m: f"{cand.label}: {m}")


def test_cell_loop_candidates_are_the_cell_modules():
    case = Case("gru", "train", **CELL_TINY)
    module, x, grad_out = runner.build_inputs(case)
    assert type(module) is torch.nn.GRUCell
    for cell, cls in (("rnn_tanh", fastbptt.RNNCell), ("gru", fastbptt.GRUCell), ("lstm", fastbptt.LSTMCell)):
        assert runner.CELL_MODULE_OF_CELL[cell] is cls
    with pytest.raises(ValueError, match="do not apply to a cell loop"):
        runner.build_bench(case, Candidate("fastbptt", "reference", 2, True), module, x, grad_out)


def test_cell_backend_that_cannot_run_here_is_unavailable_with_the_reason():
    recs = run(Case("gru", "train", **CELL_TINY), [Candidate("fastbptt", "cuda")], reps=1)
    assert recs["fastbptt[cuda]"]["status"] == "unavailable" and recs["fastbptt[cuda]"]["error"]


@pytest.mark.slow
def test_compiled_cell_module_loop_runs():
    recs = run(Case("lstm", "train", **CELL_TINY), [config.COMPILED], reps=1)
    assert recs["torch.compile"]["status"] == "ok", recs["torch.compile"]["error"]
    assert recs["torch.compile"]["notes"]["first_call_s"] > 0


def test_layer_case_keys_are_unchanged_and_cell_loops_are_marked():
    layer = Case("gru", "train", "cpu", "float32", 32, 256, 256, 128)
    assert layer.key() == "gru/train/cpu/float32/B32/H256/I256/T128/L1/uni"
    assert Case(**{**layer.__dict__, "layers": 2, "bidirectional": True, "timed": False}).key() == \
        "gru/train/cpu/float32/B32/H256/I256/T128/L2/bi/memory-only"
    assert Case(**{**layer.__dict__, "loop": "cell"}).key() == \
        "gru/train/cpu/float32/B32/H256/I256/T128/L1/uni/cell-loop"
    assert all(c.loop == "layer" and "cell" not in c.key() for name in config.PRESETS if name != "cells"
               for c, _ in config.preset(name).items())


def test_cell_loops_have_one_layer_and_direction():
    with pytest.raises(ValueError, match="one layer and one direction"):
        Case("gru", "train", **{**CELL_TINY, "layers": 2})
    with pytest.raises(ValueError, match="one layer and one direction"):
        config.Grid(loop="cell", bidirectional=(False, True)).validate()
    with pytest.raises(ValueError, match="unknown loop"):
        config.Grid(loop="step").validate()


def test_cell_grid_has_one_fastbptt_candidate_per_backend():
    grid = config.Grid(loop="cell", backends=("reference", "cpu"), chunk_sizes=(2, 4), recompute=(True, False))
    assert [c.label for c in grid.candidates("cpu")] == ["torch.nn", "torch.compile", "fastbptt[reference]",
                                                         "fastbptt[cpu]"]
    assert [c.label for c in config.override(config.Plan("p", [grid]), loop="layer").grids[0].candidates("cpu")] \
        == ["torch.nn", "torch.compile"] + [f"fastbptt[{b},C={c},{p}]" for b in ("reference", "cpu") for c in (2, 4)
                                            for p in ("recompute", "keep-gates")]


def test_cli_runs_a_cell_loop_grid(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--loop", "cell", "--cells", "lstm", "--batch", "1", "2", "--hidden", "8",
                              "--steps", "3", "--modes", "train", "--backends", "reference", "--baselines", "torch.nn",
                              "--warmup", "0", "--reps", "1", "--out", str(tmp_path), "--name", "cells"])
    assert cli.main(args) == 0
    doc = report.load_json(tmp_path / "cells.json")
    assert [r["key"] for r in doc["records"]] == [f"lstm/train/cpu/float32/B{b}/H8/I8/T3/L1/uni/cell-loop|{label}"
                                                  for b in (1, 2) for label in ("torch.nn", "fastbptt[reference]")]
    assert all(r["status"] == "ok" for r in doc["records"])
    printed = capsys.readouterr().out
    assert "| cell | mode | B | torch.nn | reference |" in printed
    assert "cell loops: a Python loop of T calls of one cell module" in printed
    assert (tmp_path / "cells-speedup-vs-batch.png").exists()

    assert cli.main(parser.parse_args(["--loop", "cell", "--layers", "2", "--list"])) == 2
    assert "a cell loop has one layer and one direction" in capsys.readouterr().out


def test_auto_memory_policy_column():
    """--recompute auto measures the modules' default policy as its own column."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    plan = cli.build_plan(parser.parse_args(["--cells", "gru", "--backends", "reference", "--recompute", "auto",
                                                 "on"]))
    (_, cands), *_ = plan.items()
    assert [c.label for c in cands][-2:] == ["fastbptt[reference,C=32,auto]", "fastbptt[reference,C=32,recompute]"]
    recs = runner.run_case(Case("gru", "train", **TINY), [config.TORCH_NN, cands[-2]], 0, 1)
    doc = {"format": report.FORMAT, "preset": "t", "environment": {}, "records": recs,
           "settings": {"timer": "t", "warmup": 0, "reps": 1}}
    text = report.summary_tables(doc)
    assert "| cell | mode | torch.nn | reference auto |" in text


def test_tables_read_runs_saved_before_cell_loops():
    recs = runner.run_case(Case("gru", "infer", **TINY), [config.TORCH_NN, *REFERENCE[:1]], 0, 1)
    for rec in recs:
        del rec["case"]["loop"]
    doc = {"format": report.FORMAT, "preset": "old", "environment": {}, "records": recs,
           "settings": {"timer": "t", "warmup": 0, "reps": 1}}
    assert "| cell | mode | torch.nn | reference recompute |" in report.summary_tables(doc)


def test_presets_expand():
    for name in config.PRESETS:
        items = config.preset(name).items()
        assert items and all(cands[0].is_baseline for _, cands in items)
    kernels_plan = config.preset("cpu-kernels")
    kernels = kernels_plan.items()
    assert {(c.batch, c.hidden, c.steps, c.layers) for c, _ in kernels} == {
        (32, 256, 128, 1), (8, 512, 256, 1), (128, 128, 128, 1), (1, 1024, 512, 1), (20, 200, 35, 2)}
    policies = {"train": ["auto", "recompute", "keep-gates"], "infer": ["recompute"]}  # inference keeps nothing
    assert all([x.label for x in cands] == ["torch.nn", "torch.compile"] + [
        f"fastbptt[cpu,C=32,{p}]" for p in policies[case.mode]] for case, cands in kernels)
    cells = config.preset("cells")
    assert cells.device == "cpu" and cells.out_dir == kernels_plan.out_dir
    assert {(c.cell, c.mode, c.batch) for c, _ in cells.items()} == {
        (cell, mode, b) for cell in ("rnn_tanh", "gru", "lstm") for mode in ("train", "infer") for b in (1, 32)}
    for case, cands in cells.items():
        assert (case.loop, case.dtype, case.hidden, case.input_size, case.steps, case.layers, case.bidirectional) == \
            ("cell", "float32", 256, 256, 64, 1, False)
        assert [x.label for x in cands] == ["torch.nn", "torch.compile", "fastbptt[cpu]"]
    gpu_cells = config.preset("cells", "cuda")   # what scripts/gpu_check.sh runs after gpu-kernels
    assert gpu_cells.device == "cuda"
    assert {cands[-1].label for _, cands in gpu_cells.items()} == {"fastbptt[cuda]"}
    gpu = config.preset("gpu-kernels").items()
    timed = {(c.cell, c.mode, c.dtype, c.batch, c.hidden, c.steps) for c, _ in gpu if c.timed}
    assert timed == {(cell, mode, dtype, b, h, t) for cell in ("gru", "lstm") for mode in ("train", "infer")
                     for dtype in ("float32", "bfloat16") for b, h, t in ((16, 768, 1024), (64, 512, 512),
                                                                           (256, 1024, 256))}
    memory_only = [(c, cands) for c, cands in gpu if not c.timed]
    assert {(c.cell, c.mode, c.steps) for c, _ in memory_only} == {("gru", "train", 4096), ("lstm", "train", 4096)}
    for case, cands in gpu:
        labels = {x.label for x in cands}
        assert {"torch.nn", "fastbptt[cuda,C=64,recompute]", "fastbptt[cuda:persistent,C=64,recompute]",
                "fastbptt[triton,C=64,recompute]"} <= labels
        # the compiled loop in timed training; both memory policies wherever a backward runs
        assert ("torch.compile" in labels) == (case.timed and case.mode == "train")
        assert ("fastbptt[cuda,C=64,keep-gates]" in labels) == (case.mode == "train")


def test_time_budget_skips_the_cases_left_and_says_so(monkeypatch):
    plan = config.Plan("budget", [config.Grid(cells=("gru",), modes=("train",), batch=(1, 2, 3), hidden=(4,),
                                              steps=(3,), backends=("reference",), chunk_sizes=(2,),
                                              recompute=(True,), baselines=("torch.nn",))], "cpu", warmup=0, reps=1)

    def slow_case(case, cands, *args):  # each case takes half a second
        time.sleep(0.5)
        return [{**runner.new_record(case, c), "status": "ok"} for c in cands]

    monkeypatch.setattr(runner, "run_case", slow_case)
    lines = []
    records = runner.run_plan(plan, progress=lines.append, budget_s=0.75)
    assert [r["status"] for r in records] == ["ok"] * 4 + ["skipped"] * 2  # (torch.nn, reference) x 3 cases
    assert all(r["case"]["batch"] == 3 and "time budget of 0.75 s" in r["error"] for r in records[4:])
    assert lines[-1] == "time budget of 0.75 s spent: 2 record(s) skipped"
    assert [r["status"] for r in runner.run_plan(plan, budget_s=10)] == ["ok"] * 6


def test_cli_rejects_a_budget_that_is_not_positive(tmp_path, capsys):
    assert cli.main(_bench_args(tmp_path, "--budget", "0")) == 2
    assert "--budget must be a positive number of seconds, got 0.0" in capsys.readouterr().out


def _bench_args(tmp_path, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--cells", "gru", "--batch", "1", "2", "--hidden", "4", "--steps", "3", "6",
                              "--modes", "train", "--backends", "reference", "--chunk-size", "2",
                              "--baselines", "torch.nn", "--warmup", "1", "--reps", "2",
                              "--out", str(tmp_path), "--name", "run", *extra])


def test_cli_writes_json_markdown_plots_and_compares(tmp_path, capsys):
    assert cli.main(_bench_args(tmp_path)) == 0
    doc = report.load_json(tmp_path / "run.json")
    env = doc["environment"]
    for key in ("cpu_model", "cpu_capability", "threads", "torch", "cuda", "triton", "commit", "machine", "backends"):
        assert key in env
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["machine"].endswith(f"-{env['cpu_capability'].lower()}-{env['threads']}t")
    assert len(doc["records"]) == 4 * 3  # (B, T) x (torch.nn, two policies)
    md = (tmp_path / "run.md").read_text()
    for rec in doc["records"]:
        assert rec["key"].split("|")[0] in md  # every record in the detail table
    printed = capsys.readouterr().out
    assert "| cell | mode | B | T | torch.nn | reference recompute | reference keep-gates |" in printed
    assert printed.count("| gru | train |") == 8  # 4 cases, time and memory tables
    for name in ("speedup-vs-batch", "time_per_step-vs-steps", "memory-vs-steps"):
        png = tmp_path / f"run-{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"

    # run again and compare with the first run; then compare the two files without running
    assert cli.main(_bench_args(tmp_path, "--name", "run2", "--compare", str(tmp_path / "run.json"))) == 0
    text = (tmp_path / "run2-compare.md").read_text()
    assert "| case | candidate | old ms | new ms | time change |" in text
    assert text.count("| gru/train/") == 12 and "%" in text
    capsys.readouterr()
    assert cli.main(_bench_args(tmp_path, "--compare", str(tmp_path / "run.json"), str(tmp_path / "run2.json"))) == 0
    assert capsys.readouterr().out.count("| gru/train/") == 12


def test_environment_names_the_heap_allocator():
    # the allocator's settings move torch.nn's CPU LSTM training by up to 1.5x, so every CPU result names them
    env = environment.environment("cpu")
    assert env["allocator"] == heap.describe()
    assert env["allocator"] in environment.describe(env)


@pytest.mark.skipif(bool(dispatch.availability("cpu")) or not torch.backends.mkldnn.is_available(),
                    reason="needs the cpu backend and oneDNN")
@pytest.mark.parametrize("study,shape", [("paths", "lstm,2,8,5,2"), ("keep-budget", "gru,2,8,5,1")])
def test_heap_settings_script_times_every_candidate(study, shape):
    script = load_script("benchmarks/heap_settings.py")
    result = script.measure(study, shape, 1)
    assert set(result["times"]) == {"torch.nn", *script.STUDIES[study].fastbptt}
    assert all(t > 0 for t in result["times"].values())


@pytest.mark.skipif(bool(dispatch.availability("cpu")) or not torch.backends.mkldnn.is_available(),
                    reason="needs the cpu backend and oneDNN")
def test_heap_settings_script_names_the_default_path(monkeypatch):
    script = load_script("benchmarks/heap_settings.py")
    monkeypatch.setattr(dispatch, "vector_isa", lambda backend: "avx512")  # small-batch takes B <= 2 on AVX2
    for heap_reuses, path in ((False, "cpu:onednn"), (True, "cpu:onednn")):  # B=2: onednn either way
        monkeypatch.setattr(dispatch, "heap_reuses_large_blocks", lambda: heap_reuses)
        assert script.default_path("lstm", 2, 8, 5) == path
    for heap_reuses, path in ((False, "cpu:packed, keep"), (True, "cpu:onednn")):
        monkeypatch.setattr(dispatch, "heap_reuses_large_blocks", lambda: heap_reuses)
        assert script.default_path("lstm", 32, 8, 5) == path
    monkeypatch.setattr(fastbptt.ops, "AUTO_KEEP_GATES_BYTES", 0)
    assert script.default_path("gru", 32, 8, 5) == "cpu:packed, recompute"
    assert script.kept_gates_mib("gru", 32, 8, 5) == 5 * 32 * 6 * 8 * 4 / 2**20


def test_compare_reports_status_changes_and_missing_records(tmp_path):
    recs = runner.run_case(Case("gru", "train", **TINY), [config.TORCH_NN, *REFERENCE], 0, 1)
    old = {"format": report.FORMAT, "preset": "a", "environment": {"machine": "m"}, "records": recs}
    new_recs = json.loads(json.dumps(recs))
    new_recs[1].update(status="failed", error="boom")
    new = {**old, "preset": "b", "records": new_recs[:2]}
    text = report.compare(old, new)
    assert "ok -> failed (boom)" in text
    assert "Only in old (1)" in text
