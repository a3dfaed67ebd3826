"""Why a run cannot go on. The ``fastbptt`` command prints these as ``fastbptt: error: ...``."""


class TrainingError(RuntimeError):
    """A run stopped for a reason its message explains, with what to do about it."""


class RunDirectoryBusy(TrainingError):
    """Another run holds the output directory."""


class NonFiniteError(TrainingError):
    """A loss or gradient norm is NaN or infinite."""


class CheckpointError(TrainingError, ValueError):
    """A checkpoint is unreadable, corrupt, or does not fit this run."""
