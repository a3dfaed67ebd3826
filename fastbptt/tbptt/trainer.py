"""The TBPTT training loop (:class:`Trainer`); see :mod:`fastbptt.tbptt` for the method."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batching import StreamBatcher, Window
from .checkpoint import load_checkpoint, nonfinite_entries, save_checkpoint_file
from .config import AMP_DTYPES, RESUME_FIXED, TrainConfig
from .distributed import (any_over_processes, gather_batch, mean_over_processes, process_place, shard_batch,
                          sum_over_processes)
from .errors import CheckpointError, NonFiniteError, RunDirectoryBusy
from .metrics import append_metrics, plot_metrics, read_metrics, write_metrics
from .optim import build_optimizer, build_scheduler
from .rng import rng_state, set_rng_state
from .rundir import RunDirectoryLock, remove_leftovers
from .state import detach_state, map_state

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


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
    loss_fn: ``loss_fn(output [B, T, ...], target [B, T, ...])``, the mean loss per target.
    out_dir: where ``checkpoint.pt``, ``metrics.jsonl`` and ``curves.png`` go (None: nowhere).
    curve_label: the y axis of the perplexity curve in ``curves.png``.
    extra: saved in every checkpoint under ``"extra"`` (model configuration, vocabulary).
    """

    def __init__(self, model: nn.Module, train_data, config: TrainConfig, *,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], val_data=None,
                 out_dir: Optional[str | os.PathLike] = None, device: Optional[torch.device | str] = None,
                 extra: Optional[dict] = None, log=None, curve_label: str = "perplexity (exp of the mean loss)"):
        self.cfg = config.validate()
        self.rank, self.world_size = process_place()
        self.is_main = self.rank == 0
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.curve_label = curve_label
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
        if self.val_data is not None:
            if self.cfg.eval_batch_size % self.world_size:
                raise ValueError(f"eval_batch_size ({self.cfg.eval_batch_size}) must be divisible by the number of "
                                 f"processes ({self.world_size})")
            self._validation_batcher()  # a validation text too short for its streams fails here, not mid-run

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
        self.skipped_updates = 0   # updates skipped as non-finite (nonfinite="skip")
        self._metrics_path = self.out_dir / METRICS_FILE if self.out_dir else None
        self._last_saved: Optional[tuple[Path, int]] = None  # (path, update) of this run's last checkpoint

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

    def _optimizer_step(self, loss: float) -> Optional[float]:
        """Clips and applies the accumulated gradient of windows whose mean loss is ``loss``.
        Returns the gradient norm, or None when the update was skipped as non-finite."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.clip == "norm":
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_value))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
            if self.cfg.clip == "value":
                torch.nn.utils.clip_grad_value_(params, self.cfg.clip_value)
        # fp16's gradient scaler skips overflowing steps by design; there only the loss tells a divergence
        nonfinite = not math.isfinite(loss) or (not math.isfinite(grad_norm) and not self.scaler.is_enabled())
        if any_over_processes(nonfinite, self.device):
            self._handle_nonfinite_update(loss, grad_norm)
            self.scaler.update()  # closes this step's unscale_
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        return grad_norm

    def _handle_nonfinite_update(self, loss: float, grad_norm: float) -> None:
        """Stops the run (``nonfinite="stop"``) or skips the update and restarts the carried state."""
        update = self.step + 1
        self._record(kind="nonfinite", step=update, epoch=self.batcher.epoch, tokens=self.tokens, train_loss=loss,
                     grad_norm=grad_norm, action=self.cfg.nonfinite)
        what = f"update {update}: the training loss is {loss:g} and the gradient norm {grad_norm:g}"
        if self.cfg.nonfinite == "stop":
            raise NonFiniteError(f"{what}; the run stops without applying it. {self._last_good_checkpoint()} Lower the "
                                 "learning rate (--lr), clip gradients (--clip norm), or skip such updates "
                                 "(--on-nonfinite skip).")
        self.skipped_updates += 1
        self.state, self.history = None, None
        self.log(f"{what}: skipped, and the carried state starts afresh ({self.skipped_updates} skipped so far)")

    def _last_good_checkpoint(self) -> str:
        if self._last_saved is None:
            return "No checkpoint was written by this run."
        path, step = self._last_saved
        return f"The last checkpoint, {str(path)!r} (update {step}), holds the last finite model."

    # ------------------------------------------------------------------ evaluation
    def _validation_batcher(self, data=None) -> StreamBatcher:
        inputs, targets = data if data is not None else self.val_data
        return StreamBatcher(inputs, self.cfg.eval_batch_size, self.cfg.eval_num_steps, targets=targets,
                             rank=self.rank, world_size=self.world_size, names=("validation", "eval_batch_size"))

    @torch.no_grad()
    def evaluate(self, data=None) -> float:
        """Mean loss per target over the validation sequence, read as ``eval_batch_size``
        streams with the state carried across windows (so the truncation length does not limit
        the context at evaluation). All processes together read the whole sequence."""
        batcher = self._validation_batcher(data)
        was_training = self.model.training
        self.model.eval()
        loss_sum, count = 0.0, 0
        state = None
        for window in batcher:
            x, y = window.input.to(self.device), window.target.to(self.device)
            with self._autocast():
                out, state = self.model(x, None if window.reset else state)
            loss_sum += float(self.loss_fn(out, y)) * y.numel()
            count += y.numel()
        self.model.train(was_training)
        loss_sum, count = sum_over_processes([loss_sum, count], self.device)
        return loss_sum / count

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state_dim = self.cfg.state_batch_dim
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "batcher": self.batcher.state_dict(),
            "carry": {
                "state": map_state(lambda t: gather_batch(t, state_dim).cpu(), self.state),
                "history": gather_batch(self.history, 0).cpu() if self.history is not None else None,
            },
            "progress": {"step": self.step, "tokens": self.tokens, "train_time": self.train_time,
                         "best_val": self.best_val, "last_val": self.last_val,
                         "evaluated_at": self.evaluated_at, "skipped_updates": self.skipped_updates},
            "config": dataclasses.asdict(self.cfg),
            "extra": self.extra,
        }

    def save_checkpoint(self, path: Optional[str | os.PathLike] = None) -> Optional[Path]:
        """Writes the checkpoint atomically (process 0); returns its path. A model with NaN/Inf
        weights is never written: the last checkpoint stays the last finite one."""
        nonfinite = nonfinite_entries(self.model.state_dict())
        if nonfinite:  # the same weights on every process, so every process stops here
            raise NonFiniteError(f"after update {self.step} the model holds NaN/Inf values ({nonfinite[0]}"
                                 f"{' and more' if len(nonfinite) > 1 else ''}) and is not saved. "
                                 + self._last_good_checkpoint())
        state = self.state_dict()  # every process takes part in gathering the carried state
        path = Path(path) if path is not None else (self.out_dir / CHECKPOINT_FILE if self.out_dir else None)
        if path is not None and self.is_main:
            save_checkpoint_file(state, path)
        if path is not None:
            self._last_saved = (path, self.step)
        if self.world_size > 1:
            dist.barrier()
        return path

    def load_state_dict(self, ckpt: dict) -> None:
        for field in RESUME_FIXED:  # they shape the optimizer's and scheduler's saved state
            saved, mine = ckpt["config"].get(field), getattr(self.cfg, field)
            if saved != mine:
                raise CheckpointError(f"the checkpoint was trained with {field}={saved!r} but this run has "
                                      f"{field}={mine!r}; resume with the same {field} (--{field.replace('_', '-')})")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError("the checkpoint holds a different model (parameter names or shapes differ): "
                                  + str(exc).splitlines()[0]) from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt["scaler"]:  # amp may change on resume: fp16 then starts a new scale
            self.scaler.load_state_dict(ckpt["scaler"])
        self.batcher.load_state_dict(ckpt["batcher"])
        carry = ckpt["carry"]
        state_dim = self.cfg.state_batch_dim
        self.state = map_state(lambda t: shard_batch(t, state_dim).to(self.device), carry["state"])
        self.history = shard_batch(carry["history"], 0).to(self.device) if carry["history"] is not None else None
        progress = ckpt["progress"]
        self.step, self.tokens = int(progress["step"]), int(progress["tokens"])
        self.train_time, self.best_val = float(progress["train_time"]), float(progress["best_val"])
        self.last_val, self.evaluated_at = progress["last_val"], int(progress["evaluated_at"])
        self.skipped_updates = int(progress.get("skipped_updates", 0))
        set_rng_state(ckpt["rng"])

    def resume(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_checkpoint(path, argument="--resume"))

    # ------------------------------------------------------------------ metrics
    def _prepare_metrics(self) -> None:
        """A new run starts a new log; a resumed one drops the records written after its
        checkpoint (they will be written again) and rewrites the log atomically."""
        if not (self.is_main and self._metrics_path and self._metrics_path.is_file()):
            return
        if self.step == 0 and self.evaluated_at != 0:
            self._metrics_path.unlink()
            return
        path = self._metrics_path
        records = read_metrics(path, on_torn_tail=lambda number, text: self.log(
            f"{str(path)!r}: dropped line {number}, a record cut short ({text[:40]!r})"))
        # a validation after the checkpoint's last one runs again, even at the same step
        kept = [r for r in records if r["step"] <= (self.evaluated_at if r["kind"] == "val" else self.step)]
        write_metrics(path, kept)

    def _record(self, **fields) -> None:
        if self.is_main and self._metrics_path:
            append_metrics(self._metrics_path, fields)

    def plot(self) -> Optional[Path]:
        """curves.png: training and validation perplexity against tokens, and the LR."""
        if not (self.is_main and self._metrics_path and self._metrics_path.is_file()):
            return None
        return plot_metrics(self._metrics_path, self.out_dir / "curves.png", ylabel=self.curve_label)

    # ------------------------------------------------------------------ the loop
    def _evaluate_and_record(self, pbar) -> None:
        if self.val_data is None:
            return
        self.evaluated_at = self.step
        loss = self.evaluate()
        if not math.isfinite(loss):
            raise NonFiniteError(f"after update {self.step} the validation loss is {loss:g}; the run stops. "
                                 + self._last_good_checkpoint())
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
        Holds ``out_dir``'s lock meanwhile (:class:`RunDirectoryBusy` if another run does).
        Raises :class:`NonFiniteError` on a NaN/Inf loss or gradient norm (``nonfinite="stop"``).
        Returns a summary dict."""
        with self._run_directory():
            return self._fit(until)

    @contextlib.contextmanager
    def _run_directory(self):
        """Process 0 locks ``out_dir`` and clears an interrupted run's temporary files; every
        process learns whether that worked, so none waits in a collective for a process that left."""
        lock, busy = None, None
        if self.is_main and self.out_dir is not None:
            try:
                lock = RunDirectoryLock(self.out_dir).acquire()
            except RunDirectoryBusy as exc:
                busy = exc
        if any_over_processes(busy is not None, self.device):
            raise busy or RunDirectoryBusy(f"process 0 could not lock {str(self.out_dir)!r}")
        try:
            if lock is not None:
                remove_leftovers(self.out_dir, (CHECKPOINT_FILE, METRICS_FILE), self.log)
            yield
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, until: Optional[int]) -> dict:
        cfg = self.cfg
        last = self.total_steps if until is None else min(until, self.total_steps)
        self.model.train()
        pbar = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm
            pbar = tqdm(total=self.total_steps, initial=min(self.step, self.total_steps), unit="upd",
                        dynamic_ncols=True, file=sys.stderr)
        try:
            self._prepare_metrics()
            if self.step == 0 and self.evaluated_at != 0:
                self._evaluate_and_record(pbar)  # the starting point of the validation curve
            log_loss, log_tokens, log_time = 0.0, 0, 0.0
            update_loss, update_tokens = 0.0, 0   # over the windows of the update being accumulated
            micro = 0
            stop = self.step >= last or self._out_of_time()
            while not stop and self.batcher.epoch < cfg.epochs:
                t0 = time.perf_counter()
                for window in self.batcher:
                    micro += 1
                    update = micro == cfg.accum_steps or self.batcher.position == len(self.batcher)
                    loss = self._forward_backward(window, sync=update)
                    n = window.target.shape[0] * window.target.shape[1] * self.world_size
                    update_loss, update_tokens = update_loss + loss * n, update_tokens + n
                    self.tokens += n
                    if not update:
                        continue
                    grad_norm = self._optimizer_step(update_loss / update_tokens)
                    micro = 0
                    elapsed = time.perf_counter() - t0
                    log_time += elapsed
                    self.train_time += elapsed
                    if grad_norm is None:  # skipped as non-finite
                        update_loss, update_tokens = 0.0, 0
                        t0 = time.perf_counter()
                        continue
                    log_loss, log_tokens = log_loss + update_loss, log_tokens + update_tokens
                    update_loss, update_tokens = 0.0, 0
                    self.step += 1
                    if pbar is not None:
                        pbar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        mean = mean_over_processes(log_loss / log_tokens, self.device)
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
        finally:
            if pbar is not None:
                pbar.close()
        if self.evaluated_at != self.step:
            self._evaluate_and_record(None)
        self.save_checkpoint()
        self.plot()
        return {"step": self.step, "tokens": self.tokens, "train_time": self.train_time,
                "skipped_updates": self.skipped_updates, "val_loss": self.last_val,
                "val_ppl": math.exp(min(self.last_val, 50.0)) if self.last_val is not None else None}

    def _out_of_time(self) -> bool:
        if self.cfg.time_budget is None:
            return False
        return any_over_processes(self.train_time >= self.cfg.time_budget, self.device)
