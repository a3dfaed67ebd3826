"""The training run's settings (:class:`TrainConfig`, saved in every checkpoint) and their choices."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "step", "exponential", "cosine", "plateau")
CLIPS = ("norm", "value", "none")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLING = ("stream", "random")
NONFINITE = ("stop", "skip")  # what a NaN/Inf loss or gradient norm does to the run
# settings a resumed run must share with its checkpoint (the rest may change between resumes)
RESUME_FIXED = ("optimizer", "schedule", "warmup_steps")


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_choice(name: str, value, choices) -> None:
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
    nonfinite: str = "stop"             # a NaN/Inf loss or gradient norm: "stop" the run, or "skip" the update
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
            check_positive_int(name, getattr(self, name))
        for name in ("k2", "max_steps", "eval_every", "checkpoint_every"):
            check_positive_int(name, getattr(self, name), allow_none=True)
        if self.k2 is not None and self.k2 < self.k1:
            raise ValueError(f"k2 (steps backpropagated, {self.k2}) must be >= k1 (steps per update, {self.k1})")
        if self.sampling == "random" and self.k2 not in (None, self.k1):
            raise ValueError("k2 > k1 needs consecutive windows (sampling='stream'); random windows reset the state")
        check_choice("sampling", self.sampling, SAMPLING)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("clip", self.clip, CLIPS)
        check_choice("amp", self.amp, tuple(AMP_DTYPES))
        check_choice("nonfinite", self.nonfinite, NONFINITE)
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
