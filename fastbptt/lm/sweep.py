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

from ..tbptt import Trainer, seed_everything
from .cli import (_add_data_arguments, _add_model_arguments, _add_training_arguments, _describe, _fail,
                  _lm_config, _positive_float, _positive_int, _read_corpus, _resolve_device, _train_config)
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
    from ..bench.memory import saved_activation_bytes

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
    meta = (f"{_describe(dataclasses.replace(_lm_config(args, len(vocab)), impl='fastbptt'), device)}; batch "
            f"{args.batch_size}; lr {args.lr:g} (schedule {args.schedule}); {args.budget_seconds:g} s of training "
            f"per setting; {len(train_ids):,} training characters; torch {torch.__version__}; {_machine(device)}")
    _write_sweep(rows, out, meta)
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return 0


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    from ..bench.environment import cpu_capability, cpu_model

    return (f"CPU {cpu_model()} ({cpu_capability()}), {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch thread(s)")


def _write_sweep(rows: list[dict], out: Path, meta: str) -> None:
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Setup: {meta}.", "",
             "| num_steps | implementation | updates | tokens | tokens/s | validation ppl "
             "| saved activations / window (MiB) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['num_steps']} | {r['impl']} | {r['updates']:,} | {r['tokens']:,} | {r['tokens_per_s']:,} "
                     f"| {r['val_ppl']:.3f} | {r['saved_mib']:.2f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        sel = [r for r in rows if r["impl"] == impl]
        ks = [r["num_steps"] for r in sel]
        label = "torch.nn" if impl == "torch" else "fastbptt"
        axes[0].plot(ks, [r["val_ppl"] for r in sel], "o-", label=label)
        axes[1].plot(ks, [r["tokens_per_s"] for r in sel], "o-", label=label)
        axes[2].plot(ks, [r["saved_mib"] for r in sel], "o-", label=label)
    titles = ("validation perplexity (same time budget)", "training tokens/s", "saved activations per window (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("num_steps (truncation length k1 = k2)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
