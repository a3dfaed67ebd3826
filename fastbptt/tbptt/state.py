"""A recurrent state: None (zeros), a tensor, or a tuple of tensors (LSTM's ``(h, c)``)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor


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
