"""``fastbptt sweep`` end to end on the tiny shipped corpus, and the generic table and plot
functions of the benchmark harness it writes its results with."""
from __future__ import annotations

import csv

import pytest

from fastbptt.bench import plots
from fastbptt.bench.environment import cpu_capability, describe
from fastbptt.bench.report import Column, fmt_count, markdown_table, table_lines
from fastbptt.cli import main
from fastbptt.lm import tiny_corpus_path

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG"


def test_sweep_writes_csv_table_and_plot(tmp_path, capsys):
    assert main(["sweep", "--text", str(tiny_corpus_path()), "--num-steps", "4", "8", "--budget-seconds", "0.5",
                 "--hidden-size", "8", "--embedding-dim", "4", "--batch-size", "4", "--eval-batch-size", "2",
                 "--eval-num-steps", "16", "--val-fraction", "0.1", "--device", "cpu", "--threads", "1",
                 "--baseline", "torch", "--recompute", "on", "--out", str(tmp_path)]) == 0
    assert "sweep.md" in capsys.readouterr().out
    with open(tmp_path / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["num_steps"], r["impl"]) for r in rows] == [("4", "fastbptt"), ("4", "torch"),
                                                           ("8", "fastbptt"), ("8", "torch")]

    setup, machine, table = (tmp_path / "sweep.md").read_text().split("\n\n")
    assert setup.startswith("Setup: GRU 1x8") and ", recompute on;" in setup and "0.5 s of training per setting" in setup
    assert machine.startswith("Machine: ") and f"({cpu_capability()})" in machine
    head, rule, *body = table.strip().splitlines()
    assert head == ("| num_steps | implementation | updates | tokens | tokens/s | validation ppl "
                    "| saved activations / window (MiB) |")
    assert rule == "|---:|---|---:|---:|---:|---:|---:|"
    assert len(body) == len(rows)
    for line, r in zip(body, rows):
        assert line == (f"| {r['num_steps']} | {r['impl']} | {int(r['updates']):,} | {int(r['tokens']):,} "
                        f"| {int(r['tokens_per_s']):,} | {float(r['val_ppl']):.3f} | {float(r['saved_mib']):.2f} |")
    # chunked recompute keeps less than torch.nn in the same window
    saved = {(r["num_steps"], r["impl"]): float(r["saved_mib"]) for r in rows}
    assert saved[("8", "fastbptt")] < saved[("8", "torch")]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == PNG


def test_markdown_table_formats_and_aligns_each_column():
    rows = [{"k": 8, "name": "a", "n": 12345, "x": 0.5}, {"k": 16, "name": "c", "n": None, "x": 2.0}]
    columns = [Column("k", "k", right=True), Column("name", "name"), Column("n", "count", fmt_count, right=True),
               Column("x", "x", "{:.2f}".format)]
    assert markdown_table(rows, columns).splitlines() == [
        "| k | name | count | x |",
        "|---:|---|---:|---|",
        "| 8 | a | 12,345 | 0.50 |",
        "| 16 | c |  | 2.00 |",
    ]
    assert markdown_table([], columns).splitlines()[1] == "|---:|---|---:|---|"


def test_table_lines_default_to_left_alignment():
    assert table_lines(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert table_lines(["a", "b"], [], right=[True])[1] == "|---:|---|"


def test_series_groups_points_per_label_sorted_by_x():
    rows = [{"k": 16, "impl": "torch", "v": 2}, {"k": 8, "impl": "fastbptt", "v": 1},
            {"k": 8, "impl": "torch", "v": 3}, {"k": 4, "impl": "fastbptt", "v": 5}]
    assert plots.series(rows, "k", "v", "impl") == {"torch": [(8, 3), (16, 2)], "fastbptt": [(4, 5), (8, 1)]}
    named = plots.series(rows, "k", "v", lambda r: r["impl"].upper())
    assert list(named) == ["TORCH", "FASTBPTT"]


def test_draw_panels_writes_one_png_with_a_panel_each(tmp_path):
    import matplotlib.image

    lines = {"torch.nn": [(4, 1.0), (8, 2.0)], "fastbptt": [(4, 0.5), (8, 1.0)]}
    one = plots.draw_panels([plots.Panel("a", "k", lines)], tmp_path / "one.png")
    three = plots.draw_panels([plots.Panel("a", "k", lines, ylabel="y", log_y=True, hline=1.0),
                               plots.Panel("b", "k", lines, reference=("output size", [(4, 0.2), (8, 0.4)])),
                               plots.Panel("c", "k", lines)], tmp_path / "sub" / "three.png", title="t")
    assert one.read_bytes()[:4] == PNG and three.read_bytes()[:4] == PNG
    assert matplotlib.image.imread(three).shape[1] > 2 * matplotlib.image.imread(one).shape[1]


def test_machine_line_names_the_cpu_of_a_cpu_run_on_a_gpu_machine():
    env = {"device": "cpu", "gpu": "NVIDIA H100", "gpu_driver": "1", "cpu_model": "AMD EPYC", "cpu_capability": "AVX2",
           "threads": 1, "torch": "2", "commit": "abc"}
    assert describe(env).startswith("AMD EPYC (AVX2), 1 threads; torch 2")
    assert describe({**env, "device": "cuda"}).startswith("NVIDIA H100 (driver 1,")
