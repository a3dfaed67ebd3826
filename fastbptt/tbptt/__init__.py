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
from .batching import StreamBatcher, Window
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_write, load_checkpoint, save_atomic
from .config import AMP_DTYPES, CLIPS, NONFINITE, OPTIMIZERS, SAMPLING, SCHEDULES, TrainConfig
from .errors import CheckpointError, NonFiniteError, RunDirectoryBusy, TrainingError
from .metrics import plot_metrics, read_metrics
from .optim import build_optimizer, build_scheduler
from .rng import rng_state, seed_everything, set_rng_state
from .state import detach_state, map_state
from .trainer import Trainer

__all__ = ["AMP_DTYPES", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CLIPS", "NONFINITE", "OPTIMIZERS", "SAMPLING",
           "SCHEDULES", "CheckpointError", "NonFiniteError", "RunDirectoryBusy", "TrainingError", "StreamBatcher",
           "TrainConfig", "Trainer", "Window", "atomic_write", "build_optimizer", "build_scheduler",
           "detach_state", "load_checkpoint", "map_state", "plot_metrics", "read_metrics", "rng_state", "save_atomic",
           "seed_everything", "set_rng_state"]
