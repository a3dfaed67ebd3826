"""Prediction from a prefix: the next-character distribution and K-step continuations.

The prefix is run through the model from a zero state ("warm-up"); its final state and last
logits seed the prediction, and each generated character is fed back one step at a time.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .data import Vocabulary
from .model import CharLM

STRATEGIES = ("greedy", "sample")


def _check_prefix(prefix: str, vocab: Vocabulary) -> Tensor:
    if not isinstance(prefix, str) or not prefix:
        raise ValueError("--prefix must be a non-empty string (the text the prediction continues)")
    try:
        return vocab.encode(prefix, strict=True)
    except ValueError as exc:
        raise ValueError(f"--prefix {prefix!r}: {exc}") from None


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def warm_up(model: CharLM, vocab: Vocabulary, prefix: str):
    """Runs the prefix. Returns (logits of the next character [V], state after the prefix)."""
    ids = _check_prefix(prefix, vocab)
    device = next(model.parameters()).device
    logits, state = model(ids.to(device)[None], None)
    return logits[0, -1].float(), state


def _distribution(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.clone()
    logits[0] = -float("inf")  # never predict the unknown token
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.numel() - 1)).values[-1]
        logits[logits < kth] = -float("inf")
    return torch.softmax(logits / temperature, -1)


@torch.no_grad()
def next_char_distribution(model: CharLM, vocab: Vocabulary, prefix: str, top_k: int = 5) -> list[tuple[str, float]]:
    """The ``top_k`` most likely next characters after ``prefix`` with their probabilities."""
    with _eval_mode(model):
        logits, _ = warm_up(model, vocab, prefix)
    probs = _distribution(logits)
    values, ids = torch.topk(probs, min(top_k, len(vocab) - 1))
    return [(vocab.itos[int(i)], float(v)) for v, i in zip(values, ids)]


@torch.no_grad()
def generate(model: CharLM, vocab: Vocabulary, prefix: str, steps: int, *, strategy: str = "greedy",
             temperature: float = 1.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> str:
    """Continues ``prefix`` by ``steps`` characters; returns only the continuation.

    strategy "greedy": the most likely character each step; "sample": a draw from the
    distribution at ``temperature``, restricted to the ``top_k`` most likely when given."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be an integer >= 1 (characters to predict), got {steps!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    with _eval_mode(model):
        logits, state = warm_up(model, vocab, prefix)
        device = logits.device
        out = []
        for _ in range(steps):
            if strategy == "greedy":
                probs = _distribution(logits, top_k=top_k)
                nxt = int(torch.argmax(probs))
            else:
                probs = _distribution(logits, temperature, top_k)
                nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            out.append(nxt)
            step_logits, state = model(torch.tensor([[nxt]], device=device), state)
            logits = step_logits[0, -1].float()
    return vocab.decode(out)
