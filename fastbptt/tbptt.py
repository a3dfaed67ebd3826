"""Truncated backpropagation through time for any model with ``forward(input, state) -> (output, state)``.

The model is batch-first: ``input: [B, T, ...]``, ``output: [B, T, ...]``; ``state`` is ``None``
(zeros), a tensor or a tuple of tensors (LSTM's ``(h, c)``) whose batch dimension is
``state_batch_dim`` (1 for torch.nn/fastbptt RNNs, whatever the number of layers).

Truncation, TBPTT(k1, k2) (Williams & Peng 1990; Sutskever 2013, section 2.8.6): every ``k1``
new time steps the parameters are updated, backpropagating through the last ``k2 >= k1``
steps. Each update runs the model over the window of the last ``k2`` inputs, starting from the
(detached) state ``k2`` steps back, and takes the loss on the last ``k1`` outputs only, so each
target is scored exactly once per epoch and its error flows back through at least
``k2 - k1 + 1`` steps (``k2`` for the newest). ``k1 == k2`` (the default) is plain truncated
BPTT over consecutive windows. With ``k2 > k1`` the overlapping ``k2 - k1`` steps are recomputed
with the current parameters at every update, so an update costs ``k2 / k1`` times as much.

Data: :class:`StreamBatcher` cuts the token sequence into ``B`` streams read in parallel;
window ``i`` of stream ``b`` continues window ``i - 1``, so the state carries over (detached at
the boundary) and is reset to zeros at each epoch start. ``mode="random"`` samples windows at
random offsets instead and resets the state at each window.

Distributed data parallel: launched with ``torchrun``, each process takes ``B / world_size``
of the streams and ``torch.nn.parallel.DistributedDataParallel`` averages the gradients, which
equals one process with the whole batch (the loss is a mean over equal-sized shards).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

CHECKPOINT_FORMAT = "fastbptt.tbptt"
CHECKPOINT_VERSION = 1
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "step", "exponential", "cosine", "plateau")
CLIPS = ("norm", "value", "none")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLING = ("stream", "random")


# ----------------------------------------------------------------------------- state helpers
def map_state(fn: Callable[[Tensor], Tensor], state):
    """Applies ``fn`` to every tensor of a state (None, a tensor, or nested tuples/lists)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(fn, s) for s in state)
    raise TypeError(f"a recurrent state must be None, a tensor or a tuple of tensors, got {type(state).__name__}")


def detach_state(state):
    """Cuts the graph at a window boundary: the values carry over, the history does not."""
    return map_state(lambda t: t.detach(), state)


# ----------------------------------------------------------------------------- data
class Window(NamedTuple):
    input: Tensor    # [B, T, ...]
    target: Tensor   # [B, T, ...]
    reset: bool      # True: start from a zero state (epoch start, or every window when random)


class StreamBatcher:
    """Batches a long sequence for TBPTT.

    ``mode="stream"``: the first ``B * L`` items (``L = (N - 1) // B`` with next-item targets)
    form ``B`` contiguous streams of length ``L``; stream ``b`` is ``data[b*L : (b+1)*L]``. Window
    ``i`` holds columns ``[i*T, (i+1)*T)`` of every stream (the last window may be shorter), so
    consecutive windows continue each other and one epoch reads every item of the ``B * L``
    exactly once. ``mode="random"``: each window draws ``B`` offsets uniformly from the whole
    sequence (a torch generator seeded by ``seed``, saved in :meth:`state_dict`); an epoch has
    as many windows as would cover the data once.

    data: [N, ...]; targets: [N, ...] aligned with ``data``, or None for ``data`` shifted by one.
    With ``world_size > 1`` this process yields streams ``[rank*B/w, (rank+1)*B/w)`` of the
    global batch ``B`` (random offsets are drawn for the global batch, then sliced), so the
    processes together read exactly what one process with batch ``B`` reads.
    """

    def __init__(self, data: Tensor, batch_size: int, num_steps: int, *, targets: Optional[Tensor] = None,
                 mode: str = "stream", seed: int = 0, rank: int = 0, world_size: int = 1):
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_steps", num_steps)
        if mode not in SAMPLING:
            raise ValueError(f"mode must be one of {SAMPLING}, got {mode!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        if targets is None:
            inputs, targets = data[:-1], data[1:]
        else:
            if targets.shape[0] != data.shape[0]:
                raise ValueError(f"targets must have as many items as data, got {targets.shape[0]} and {data.shape[0]}")
            inputs = data
        n = inputs.shape[0]
        if n < batch_size:
            raise ValueError(f"the sequence has {n} training items, fewer than batch_size={batch_size} streams; "
                             "use a longer text or a smaller --batch-size")
        if mode == "random" and n < num_steps:
            raise ValueError(f"random windows of {num_steps} steps need at least that many items, the sequence has {n}")
        self.batch_size, self.num_steps, self.mode = batch_size, num_steps, mode
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.stream_length = n // batch_size
        used = self.stream_length * batch_size
        # [B, L, ...]: row b is stream b
        self._inputs = inputs[:used].reshape(batch_size, self.stream_length, *inputs.shape[1:])
        self._targets = targets[:used].reshape(batch_size, self.stream_length, *targets.shape[1:])
        self._flat_inputs, self._flat_targets = inputs, targets
        self._generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0  # index of the next window within the epoch

    def __len__(self) -> int:
        """Windows per epoch."""
        if self.mode == "stream":
            return -(-self.stream_length // self.num_steps)
        return max(1, self._flat_inputs.shape[0] // (self.batch_size * self.num_steps))

    @property
    def tokens_per_epoch(self) -> int:
        return self.stream_length * self.batch_size

    def _local(self, t: Tensor) -> Tensor:
        return t[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]

    def _window(self, i: int) -> Window:
        if self.mode == "stream":
            lo, hi = i * self.num_steps, min((i + 1) * self.num_steps, self.stream_length)
            return Window(self._local(self._inputs[:, lo:hi]), self._local(self._targets[:, lo:hi]), reset=i == 0)
        n = self._flat_inputs.shape[0]
        offsets = torch.randint(0, n - self.num_steps + 1, (self.batch_size,), generator=self._generator)
        index = self._local(offsets)[:, None] + torch.arange(self.num_steps)
        return Window(self._flat_inputs[index], self._flat_targets[index], reset=True)

    def __iter__(self) -> Iterator[Window]:
        """Yields the remaining windows of the current epoch, then moves to the next epoch."""
        while self.position < len(self):
            window = self._window(self.position)
            self.position += 1
            yield window
        self.position = 0
        self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "generator": self._generator.get_state(),
                "mode": self.mode, "batch_size": self.batch_size, "num_steps": self.num_steps,
                "stream_length": self.stream_length}

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "batch_size", "num_steps", "stream_length"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's data stream has {key}={state[key]!r} but this run has "
                                 f"{getattr(self, key)!r}; resume with the same data and batching settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- configuration
def _check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclasses.dataclass
class TrainConfig:
    """Everything that shapes a training run (saved in the checkpoint)."""

    batch_size: int = 32            # parallel streams (global, over all processes)
    k1: int = 64                    # new time steps per update (the window length)
    k2: Optional[int] = None        # steps backpropagated per update; None: k1
    sampling: str = "stream"        # "stream" (state carries over) or "random" (state reset per window)
    epochs: int = 1
    max_steps: Optional[int] = None     # optimizer updates in all (across resumes); None: epochs decide
    time_budget: Optional[float] = None  # seconds of training (evaluation excluded); None: no limit
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.9               # SGD only
    schedule: str = "none"
    warmup_steps: int = 0
    decay: float = 0.5                  # step/exponential: the LR is multiplied by `decay` every `decay_steps`
    decay_steps: int = 1000
    min_lr: float = 0.0                 # cosine floor, plateau floor
    plateau_patience: int = 1           # evaluations without improvement before the LR drops
    clip: str = "norm"
    clip_value: float = 1.0             # max global norm (clip="norm") or max |grad| (clip="value")
    amp: str = "none"                   # "bf16" or "fp16" (fp16 uses a GradScaler)
    accum_steps: int = 1                # windows per optimizer update
    eval_every: Optional[int] = None    # updates between evaluations; None: each epoch end only
    eval_batch_size: int = 16
    eval_num_steps: int = 256
    log_every: int = 20
    checkpoint_every: Optional[int] = None  # updates between checkpoints; None: each evaluation
    seed: int = 0
    progress: bool = True
    state_batch_dim: int = 1

    @property
    def backprop_steps(self) -> int:
        return self.k1 if self.k2 is None else self.k2

    def validate(self) -> "TrainConfig":
        for name in ("batch_size", "k1", "epochs", "decay_steps", "accum_steps", "eval_batch_size",
                     "eval_num_steps", "log_every", "plateau_patience"):
            _check_positive_int(name, getattr(self, name))
        for name in ("k2", "max_steps", "eval_every", "checkpoint_every"):
            _check_positive_int(name, getattr(self, name), allow_none=True)
        if self.k2 is not None and self.k2 < self.k1:
            raise ValueError(f"k2 (steps backpropagated, {self.k2}) must be >= k1 (steps per update, {self.k1})")
        if self.sampling == "random" and self.k2 not in (None, self.k1):
            raise ValueError("k2 > k1 needs consecutive windows (sampling='stream'); random windows reset the state")
        _check_choice("sampling", self.sampling, SAMPLING)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("clip", self.clip, CLIPS)
        _check_choice("amp", self.amp, tuple(AMP_DTYPES))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.clip != "none" and not self.clip_value > 0:
            raise ValueError(f"clip_value must be > 0, got {self.clip_value}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {self.decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps and self.schedule == "plateau":
            raise ValueError("warmup_steps cannot be combined with schedule='plateau'")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        return self


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """An LR scheduler stepped once per update (``plateau``: once per evaluation, on the
    validation loss). ``warmup_steps`` prepends a linear warm-up from lr/warmup_steps."""
    from torch.optim import lr_scheduler as S

    if cfg.schedule == "plateau":
        return S.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.decay, patience=cfg.plateau_patience - 1,
                                   min_lr=cfg.min_lr)
    after = max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "step":
        main = S.StepLR(optimizer, step_size=cfg.decay_steps, gamma=cfg.decay)
    elif cfg.schedule == "exponential":
        main = S.ExponentialLR(optimizer, gamma=cfg.decay ** (1.0 / cfg.decay_steps))
    elif cfg.schedule == "cosine":
        main = S.CosineAnnealingLR(optimizer, T_max=after, eta_min=cfg.min_lr)
    else:
        main = None
    if not cfg.warmup_steps:
        return main
    warm = S.LinearLR(optimizer, start_factor=1.0 / cfg.warmup_steps, end_factor=1.0, total_iters=cfg.warmup_steps)
    if main is None:
        return warm
    return S.SequentialLR(optimizer, [warm, main], milestones=[cfg.warmup_steps])


def sequence_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over all time steps: output [B, T, V] logits, target [B, T] indices.
    Half-precision logits (autocast) are scored in float32."""
    logits = output.reshape(-1, output.shape[-1])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, target.reshape(-1))


# ----------------------------------------------------------------------------- distributed helpers
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_batch(t: Tensor, dim: int) -> Tensor:
    """Concatenates every process's shard of ``t`` along the batch dimension ``dim``."""
    rank, world = _world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def _shard_batch(t: Tensor, dim: int) -> Tensor:
    rank, world = _world()
    if world == 1:
        return t
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size).contiguous()


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Every RNG a run may draw from, in a form ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoint files
def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it, then renames it over
    ``path``: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, *, argument: str = "--checkpoint") -> dict:
    """Loads a checkpoint written by :class:`Trainer` (``weights_only=True``); clear errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{argument}: checkpoint not found: {str(p)!r}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unpickling failure means "not our checkpoint")
        raise ValueError(f"{argument}: {str(p)!r} is not a readable fastbptt checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{argument}: {str(p)!r} is not a fastbptt training checkpoint "
                         f"(expected format {CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{argument}: {str(p)!r} has checkpoint version {ckpt.get('version')}, "
                         f"this fastbptt reads version {CHECKPOINT_VERSION}")
    return ckpt


# ----------------------------------------------------------------------------- the trainer
class _Unroll(nn.Module):
    """One TBPTT update's forward: runs ``model`` over ``x`` [B, S, ...] from ``state`` and also
    returns the state after the first ``split`` steps (the next update's start state).

    A module of its own so that DistributedDataParallel sees exactly one forward per backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, state, split: int):
        steps = x.shape[1]
        if split >= steps:
            return self.model(x, state)
        if split == 0:
            out, _ = self.model(x, state)
            return out, state
        out_a, mid = self.model(x[:, :split], state)
        out_b, _ = self.model(x[:, split:], mid)
        return torch.cat([out_a, out_b], 1), mid


class Trainer:
    """TBPTT training loop with evaluation, checkpoints, metrics and progress.

    model: ``forward(input [B, T, ...], state) -> (output [B, T, ...], state)``, batch-first.
    train_data / val_data: [N, ...] sequences (targets: the next item), or ``(inputs, targets)``.
    out_dir: where ``checkpoint.pt``, ``metrics.jsonl`` and ``curves.png`` go (None: nowhere).
    extra: saved in every checkpoint under ``"extra"`` (model configuration, vocabulary).
    """

    def __init__(self, model: nn.Module, train_data, config: TrainConfig, *, val_data=None,
                 out_dir: Optional[str | os.PathLike] = None, loss_fn: Callable = sequence_cross_entropy,
                 device: Optional[torch.device | str] = None, extra: Optional[dict] = None, log=None):
        self.cfg = config.validate()
        self.rank, self.world_size = _world()
        self.is_main = self.rank == 0
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.extra = extra or {}
        self.log = log or (lambda msg: print(msg, file=sys.stderr))

        def split(data):
            if isinstance(data, (tuple, list)):
                return data[0], data[1]
            return data, None

        inputs, targets = split(train_data)
        self.batcher = StreamBatcher(inputs, self.cfg.batch_size, self.cfg.k1, targets=targets,
                                     mode=self.cfg.sampling, seed=self.cfg.seed, rank=self.rank,
                                     world_size=self.world_size)
        self.val_data = split(val_data) if val_data is not None else None
        if self.val_data is not None and self.cfg.eval_batch_size % self.world_size:
            raise ValueError(f"eval_batch_size ({self.cfg.eval_batch_size}) must be divisible by the number of "
                             f"processes ({self.world_size})")

        self.unroll: nn.Module = _Unroll(self.model)
        if self.world_size > 1:
            self.unroll = nn.parallel.DistributedDataParallel(self.unroll)
        self.optimizer = build_optimizer(self.model.parameters(), self.cfg)
        self.total_steps = self._planned_steps()
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.total_steps)
        self.amp_dtype = AMP_DTYPES[self.cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.amp == "fp16")

        self.step = 0              # optimizer updates done
        self.tokens = 0            # training targets seen (all processes)
        self.train_time = 0.0      # seconds spent training (evaluation excluded), across resumes
        self.best_val = math.inf
        self.last_val: Optional[float] = None
        self.evaluated_at = -1     # the update after which validation last ran
        self.state = None          # carried recurrent state (detached), local streams
        self.history: Optional[Tensor] = None  # last k2 - k1 inputs when k2 > k1
        self._metrics_path = self.out_dir / "metrics.jsonl" if self.out_dir else None

    # ------------------------------------------------------------------ plan
    def _planned_steps(self) -> int:
        per_epoch = -(-len(self.batcher) // self.cfg.accum_steps)
        planned = per_epoch * self.cfg.epochs
        return min(planned, self.cfg.max_steps) if self.cfg.max_steps else planned

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ one window
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward_backward(self, window: Window, sync: bool) -> float:
        """Runs one window (TBPTT(k1, k2)) and accumulates its gradient. Returns the loss."""
        x, y = window.input.to(self.device), window.target.to(self.device)
        if window.reset:
            self.state, self.history = None, None
        ctx = x if self.history is None else torch.cat([self.history, x], 1)
        keep = self.cfg.backprop_steps - self.cfg.k1   # inputs the next update revisits
        split = max(0, ctx.shape[1] - keep)
        no_sync = self.unroll.no_sync if (self.world_size > 1 and not sync) else contextlib.nullcontext
        with no_sync():
            with self._autocast():
                out, next_state = self.unroll(ctx, self.state, split)
                loss = self.loss_fn(out[:, ctx.shape[1] - x.shape[1]:], y)
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        self.state = detach_state(next_state)
        self.history = ctx[:, split:] if keep > 0 else None
        return loss.item()

    def _optimizer_step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.clip == "norm":
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_value)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if self.cfg.clip == "value":
                torch.nn.utils.clip_grad_value_(params, self.cfg.clip_value)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        return float(grad_norm)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data=None) -> float:
        """Mean cross-entropy per target over the validation sequence, read as ``eval_batch_size``
        streams with the state carried across windows (so the truncation length does not limit
        the context at evaluation). All processes together read the whole sequence."""
        inputs, targets = data if data is not None else self.val_data
        batcher = StreamBatcher(inputs, self.cfg.eval_batch_size, self.cfg.eval_num_steps, targets=targets,
                                rank=self.rank, world_size=self.world_size)
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        state = None
        for window in batcher:
            x, y = window.input.to(self.device), window.target.to(self.device)
            with self._autocast():
                out, state = self.model(x, None if window.reset else state)
            total[0] += float(self.loss_fn(out, y)) * y.numel()
            total[1] += y.numel()
        self.model.train(was_training)
        if self.world_size > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state_dim = self.cfg.state_batch_dim
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "batcher": self.batcher.state_dict(),
            "carry": {
                "state": map_state(lambda t: _gather_batch(t, state_dim).cpu(), self.state),
                "history": _gather_batch(self.history, 0).cpu() if self.history is not None else None,
            },
            "progress": {"step": self.step, "tokens": self.tokens, "train_time": self.train_time,
                         "best_val": self.best_val, "last_val": self.last_val,
                         "evaluated_at": self.evaluated_at},
            "config": dataclasses.asdict(self.cfg),
            "extra": self.extra,
        }

    def save_checkpoint(self, path: Optional[str | os.PathLike] = None) -> Optional[Path]:
        """Writes the checkpoint atomically (process 0); returns its path."""
        state = self.state_dict()  # every process takes part in gathering the carried state
        path = Path(path) if path is not None else (self.out_dir / "checkpoint.pt" if self.out_dir else None)
        if path is not None and self.is_main:
            save_atomic(state, path)
        if self.world_size > 1:
            dist.barrier()
        return path

    def load_state_dict(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ValueError("the checkpoint holds a different model (parameter names or shapes differ): "
                             + str(exc).splitlines()[0]) from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if (ckpt["scheduler"] is None) != (self.scheduler is None):
            raise ValueError("the checkpoint was trained with a different LR schedule; resume with the same --schedule")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.batcher.load_state_dict(ckpt["batcher"])
        carry = ckpt["carry"]
        state_dim = self.cfg.state_batch_dim
        self.state = map_state(lambda t: _shard_batch(t, state_dim).to(self.device), carry["state"])
        self.history = _shard_batch(carry["history"], 0).to(self.device) if carry["history"] is not None else None
        progress = ckpt["progress"]
        self.step, self.tokens = int(progress["step"]), int(progress["tokens"])
        self.train_time, self.best_val = float(progress["train_time"]), float(progress["best_val"])
        self.last_val, self.evaluated_at = progress["last_val"], int(progress["evaluated_at"])
        set_rng_state(ckpt["rng"])

    def resume(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_checkpoint(path, argument="--resume"))

    # ------------------------------------------------------------------ metrics
    def _prepare_metrics(self) -> None:
        """A new run starts a new log; a resumed one drops the records written after its
        checkpoint (they will be written again)."""
        if not (self.is_main and self._metrics_path and self._metrics_path.is_file()):
            return
        if self.step == 0 and self.evaluated_at != 0:
            self._metrics_path.unlink()
            return
        kept = [line for line in self._metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
        self._metrics_path.write_text("".join(line + "\n" for line in kept))

    def _record(self, **fields) -> None:
        if not (self.is_main and self._metrics_path):
            return
        self._metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._metrics_path, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def plot(self) -> Optional[Path]:
        """curves.png: training and validation perplexity against tokens, and the LR."""
        if not (self.is_main and self._metrics_path and self._metrics_path.is_file()):
            return None
        return plot_metrics(self._metrics_path, self.out_dir / "curves.png")

    # ------------------------------------------------------------------ the loop
    def _evaluate_and_record(self, pbar) -> None:
        if self.val_data is None:
            return
        self.evaluated_at = self.step
        loss = self.evaluate()
        self.last_val = loss
        self.best_val = min(self.best_val, loss)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(loss)
        self._record(kind="val", step=self.step, epoch=self.batcher.epoch, tokens=self.tokens,
                     val_loss=loss, val_ppl=math.exp(min(loss, 50.0)), lr=self.lr)
        if pbar is not None:
            pbar.write(f"step {self.step:>6}  epoch {self.batcher.epoch}  val loss {loss:.4f}  "
                       f"val ppl {math.exp(min(loss, 50.0)):.3f}")
        elif self.is_main:
            self.log(f"step {self.step:>6}  epoch {self.batcher.epoch}  val loss {loss:.4f}  "
                     f"val ppl {math.exp(min(loss, 50.0)):.3f}")

    def fit(self, until: Optional[int] = None) -> dict:
        """Trains until ``max_steps`` updates, ``epochs`` epochs or ``time_budget`` seconds;
        evaluates every ``eval_every`` updates, at each epoch end and at the end; checkpoints
        after each evaluation (or every ``checkpoint_every`` updates) and at the end.

        ``until``: pause after this many updates in all (the plan, e.g. a cosine schedule's
        length, still follows ``max_steps``); a later :meth:`resume` continues the same run.
        Returns a summary dict."""
        cfg = self.cfg
        last = self.total_steps if until is None else min(until, self.total_steps)
        self.model.train()
        pbar = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm
            pbar = tqdm(total=self.total_steps, initial=min(self.step, self.total_steps), unit="upd",
                        dynamic_ncols=True, file=sys.stderr)
        self._prepare_metrics()
        if self.step == 0 and self.evaluated_at != 0:
            self._evaluate_and_record(pbar)  # the starting point of the validation curve
        log_loss, log_tokens, log_time = 0.0, 0, 0.0
        micro = 0
        stop = self.step >= last or self._out_of_time()
        while not stop and self.batcher.epoch < cfg.epochs:
            t0 = time.perf_counter()
            for window in self.batcher:
                micro += 1
                update = micro == cfg.accum_steps or self.batcher.position == len(self.batcher)
                loss = self._forward_backward(window, sync=update)
                n = window.target.shape[0] * window.target.shape[1] * self.world_size
                log_loss, log_tokens = log_loss + loss * n, log_tokens + n
                self.tokens += n
                if not update:
                    continue
                grad_norm = self._optimizer_step()
                micro = 0
                self.step += 1
                elapsed = time.perf_counter() - t0
                log_time += elapsed
                self.train_time += elapsed
                if pbar is not None:
                    pbar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    mean = self._mean_over_processes(log_loss / log_tokens)
                    tps = log_tokens / max(log_time, 1e-9)
                    ppl = math.exp(min(mean, 50.0))
                    self._record(kind="train", step=self.step, epoch=self.batcher.epoch, tokens=self.tokens,
                                 train_loss=mean, train_ppl=ppl, lr=self.lr, tokens_per_s=tps, grad_norm=grad_norm)
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{mean:.3f}", ppl=f"{ppl:.2f}", tok_s=f"{tps:,.0f}",
                                         lr=f"{self.lr:.2e}", refresh=False)
                    log_loss, log_tokens, log_time = 0.0, 0, 0.0
                evaluated = bool(cfg.eval_every and self.step % cfg.eval_every == 0)
                if evaluated:
                    self._evaluate_and_record(pbar)
                stop = self.step >= last or self._out_of_time()
                if stop:
                    break
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or \
                        (evaluated and not cfg.checkpoint_every):
                    self.save_checkpoint()
                t0 = time.perf_counter()
            if not stop and self.evaluated_at != self.step:  # the epoch ended
                self._evaluate_and_record(pbar)
                if not cfg.checkpoint_every:
                    self.save_checkpoint()
        if pbar is not None:
            pbar.close()
        if self.evaluated_at != self.step:
            self._evaluate_and_record(None)
        self.save_checkpoint()
        self.plot()
        return {"step": self.step, "tokens": self.tokens, "train_time": self.train_time,
                "val_loss": self.last_val,
                "val_ppl": math.exp(min(self.last_val, 50.0)) if self.last_val is not None else None}

    def _mean_over_processes(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def _out_of_time(self) -> bool:
        if self.cfg.time_budget is None:
            return False
        out = torch.tensor([float(self.train_time >= self.cfg.time_budget)])
        if self.world_size > 1:  # every process stops at the same update
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return bool(out.item())


# ----------------------------------------------------------------------------- plotting
def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax.plot([r["tokens"] for r in train], [r["train_ppl"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_ppl"] for r in val], "o-", label="validation")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("perplexity (per character)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if train:
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set_xlabel("update")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
