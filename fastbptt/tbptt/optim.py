"""Optimizer and LR schedule factories for a :class:`~fastbptt.tbptt.config.TrainConfig`."""
from __future__ import annotations

import torch

from .config import TrainConfig


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
