"""``fastbptt sweep``: the language model trained under one time budget for several truncation
lengths, side by side (optionally against torch.nn)."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from pathlib import Path

import torch

from ..bench import plots
from ..bench.environment import describe, environment
from ..bench.memory import saved_activation_bytes
from ..bench.report import Column, fmt_count, markdown_table
from ..tbptt import Trainer, seed_everything
from .cli import (_add_data_arguments, _add_model_arguments, _add_training_arguments, _check_backend, _describe,
                  _fail, _lm_config, _positive_float, _positive_int, _read_corpus, _resolve_device, _train_config)
from .data import Vocabulary, split_text
from .model import CharLM, sequence_cross_entropy


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-steps", type=_positive_int, nargs="+", default=[8, 16, 32, 64, 128], metavar="K",
                   help="truncation lengths to compare (k1 = k2 = K; default 8 16 32 64 128)")
    p.add_argument("--budget-seconds", type=_positive_float, default=60.0,
                   help="training time per setting, evaluation excluded (default 60)")
    _add_data_arguments(p)
    _add_model_arguments(p)
    _add_training_arguments(p, sweep=True)
    p.add_argument("--out", default=os.path.join("runs", "sweep"),
                   help="directory for sweep.csv, sweep.md and sweep.png (default runs/sweep)")


def run_sweep(args) -> int:
    try:
        return _sweep(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, ModuleNotFoundError) as exc:
        return _fail(str(exc))


def _saved_activation_mib(model: CharLM, batch: int, steps: int, device: torch.device) -> float:
    """Bytes autograd keeps for one training window (forward of batch x steps), in MiB."""
    tokens = torch.zeros(batch, steps, dtype=torch.int64, device=device)
    nbytes = saved_activation_bytes(lambda: model(tokens)[0], exclude=list(model.parameters()))
    return nbytes / 2**20


def _sweep(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    text = _read_corpus(args, log)
    train_text, val_text = split_text(text, args.val_fraction)
    val_text = val_text[:args.val_max_chars]
    vocab = Vocabulary.from_text(train_text)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    impls = ["fastbptt", "torch"] if args.baseline == "torch" else ["fastbptt"]
    _check_backend(_lm_config(args, len(vocab)), device, batches={args.batch_size, args.eval_batch_size})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in args.num_steps:
        for impl in impls:
            seed_everything(args.seed)
            lm_cfg = dataclasses.replace(_lm_config(args, len(vocab)), impl=impl)
            model = CharLM(lm_cfg).to(device)
            cfg = _train_config(args, k1=k, k2=None, epochs=1000, max_steps=None, time_budget=args.budget_seconds,
                                eval_every=None, log_every=10**9, progress=False)
            trainer = Trainer(model, train_ids, cfg, loss_fn=sequence_cross_entropy, val_data=val_ids, out_dir=None,
                              device=device)
            log(f"num_steps {k:>4} {impl:<9} training for {args.budget_seconds:g} s ...")
            summary = trainer.fit()
            row = {"num_steps": k, "impl": impl, "updates": summary["step"], "tokens": summary["tokens"],
                   "train_s": round(summary["train_time"], 2),
                   "tokens_per_s": round(summary["tokens"] / summary["train_time"]),
                   "val_ppl": round(summary["val_ppl"], 4),
                   "saved_mib": round(_saved_activation_mib(model, args.batch_size, k, device), 3)}
            log(f"    {row['updates']} updates, {row['tokens_per_s']:,} tokens/s, validation perplexity "
                f"{row['val_ppl']:.3f}, saved activations {row['saved_mib']:.2f} MiB per window")
            rows.append(row)
    setup = (f"{_describe(dataclasses.replace(_lm_config(args, len(vocab)), impl='fastbptt'), device)}, "
             f"recompute {args.recompute}; batch "
             f"{args.batch_size}; lr {args.lr:g} (schedule {args.schedule}); {args.budget_seconds:g} s of training "
             f"per setting; {len(train_ids):,} training characters")
    _write_sweep(rows, out, setup, describe(environment(device.type)))
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return 0


IMPL_LABELS = {"fastbptt": "fastbptt", "torch": "torch.nn"}

TABLE = [Column("num_steps", "num_steps", right=True),
         Column("impl", "implementation"),
         Column("updates", "updates", fmt_count, right=True),
         Column("tokens", "tokens", fmt_count, right=True),
         Column("tokens_per_s", "tokens/s", fmt_count, right=True),
         Column("val_ppl", "validation ppl", "{:.3f}".format, right=True),
         Column("saved_mib", "saved activations / window (MiB)", "{:.2f}".format, right=True)]

# row key -> panel title, in panel order
PANELS = {"val_ppl": "validation perplexity (same time budget)", "tokens_per_s": "training tokens/s",
          "saved_mib": "saved activations per window (MiB)"}


def _write_sweep(rows: list[dict], out: Path, setup: str, machine: str) -> None:
    """sweep.csv (the rows), sweep.md (the setup, the machine and the table) and sweep.png (a
    panel per metric against num_steps, a line per implementation)."""
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.md").write_text(f"Setup: {setup}.\n\nMachine: {machine}\n\n{markdown_table(rows, TABLE)}\n")
    label = lambda row: IMPL_LABELS[row["impl"]]  # noqa: E731
    panels = [plots.Panel(title, "num_steps (truncation length k1 = k2)", plots.series(rows, "num_steps", key, label))
              for key, title in PANELS.items()]
    plots.draw_panels(panels, out / "sweep.png", dpi=110)
