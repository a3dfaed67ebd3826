"""The character-level language model: embedding (or one-hot) input, a stacked
RNN/GRU/LSTM (fastbptt's, or torch.nn's as a baseline), a linear layer over every time step."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastbptt
from fastbptt import dispatch
from fastbptt.ops import check_recompute

CELLS = ("rnn", "gru", "lstm")
IMPLS = ("fastbptt", "torch")
_MODULES = {
    "fastbptt": {"rnn": fastbptt.RNN, "gru": fastbptt.GRU, "lstm": fastbptt.LSTM},
    "torch": {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM},
}
# Fields that fix the parameters; the others (implementation, backend, chunking) are run-time
# choices, so a checkpoint trained with one backend loads into another.
ARCHITECTURE_FIELDS = ("vocab_size", "cell", "hidden_size", "num_layers", "embedding_dim")
CURVE_LABEL = "perplexity (per character)"


def sequence_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over all time steps: output [B, T, V] logits, target [B, T] indices.
    Half-precision logits (autocast) are scored in float32."""
    logits = output.reshape(-1, output.shape[-1])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, target.reshape(-1))


@dataclasses.dataclass
class LMConfig:
    vocab_size: int
    cell: str = "gru"
    hidden_size: int = 256
    num_layers: int = 1
    embedding_dim: int = 32       # 0: one-hot input of width vocab_size
    dropout: float = 0.0          # between recurrent layers
    impl: str = "fastbptt"        # "torch": torch.nn modules (the speed baseline)
    backend: str = "auto"
    chunk_size: int = 32
    recompute: bool | str = "auto"  # the fastbptt layers' memory policy

    def validate(self) -> "LMConfig":
        def positive(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive("vocab_size", 2)
        positive("hidden_size")
        positive("num_layers")
        positive("embedding_dim", 0)
        positive("chunk_size")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        dispatch.check_backend_name(self.backend)
        check_recompute(self.recompute)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        return self

    def architecture(self) -> dict:
        return {k: getattr(self, k) for k in ARCHITECTURE_FIELDS}


class CharLM(nn.Module):
    """tokens [B, T] int64, state -> logits [B, T, V], state.

    ``state`` is None (zeros), ``h`` [L, B, H], or ``(h, c)`` for LSTM; it is returned for the
    caller to carry into the next window (the TBPTT trainer detaches it there)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config.validate()
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embedding_dim) if c.embedding_dim else None
        input_size = c.embedding_dim or c.vocab_size
        cls = _MODULES[c.impl][c.cell]
        kwargs = dict(batch_first=True, dropout=c.dropout if c.num_layers > 1 else 0.0)
        if c.impl == "fastbptt":
            kwargs.update(chunk_size=c.chunk_size, recompute=c.recompute, backend=c.backend)
        self.rnn = cls(input_size, c.hidden_size, c.num_layers, **kwargs)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)

    def forward(self, tokens: Tensor, state=None):
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be an int64 tensor [batch, steps], got {tokens.dtype} "
                             f"of shape {tuple(tokens.shape)}")
        if self.embedding is not None:
            x = self.embedding(tokens)
        else:
            x = F.one_hot(tokens, self.config.vocab_size).to(self.head.weight.dtype)
        out, state = self.rnn(x, state)
        return self.head(out), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_architecture(saved: dict, wanted: LMConfig, *, argument: str = "--resume") -> None:
    """Raises a clear error when a checkpoint's model differs from the one asked for."""
    diffs = [f"{k}={saved.get(k)!r} (asked for {getattr(wanted, k)!r})"
             for k in ARCHITECTURE_FIELDS if saved.get(k) != getattr(wanted, k)]
    if diffs:
        raise ValueError(f"{argument}: the checkpoint holds another model: " + ", ".join(diffs))


def model_from_checkpoint(extra: dict, *, impl: Optional[str] = None, backend: Optional[str] = None,
                          argument: str = "--checkpoint") -> "CharLM":
    """Rebuilds the model described in a checkpoint's ``extra["model"]``."""
    if not isinstance(extra, dict) or "model" not in extra:
        raise ValueError(f"{argument}: the checkpoint has no language-model configuration "
                         "(it was not written by `fastbptt train`)")
    fields = dict(extra["model"])
    if impl is not None:
        fields["impl"] = impl
    if backend is not None:
        fields["backend"] = backend
    return CharLM(LMConfig(**fields))
