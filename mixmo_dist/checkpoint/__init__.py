"""Everything about saving and resuming a run, and reading it back.

- `store`: how a checkpoint reaches the disk (atomic `step_<N>` directories, sha256 markers, keep-last, corrupt ones
  moved aside); knows nothing about training.
- `lock`: one run per output directory (a kernel lock).
- `state`: what a run saves and restores (`CheckpointManager`: model, optimizer, EMA, scaler, counters and every
  rank's RNG streams and data position; the compatibility check; the replica fingerprint).
- `reader`: reading a run back for evaluate, export and `model.init_from`.

The errors of the package live here so that every module can raise them without importing the others.
"""


class CheckpointError(ValueError):
    """A checkpoint, checkpoint directory or run lock cannot be used as asked; the message names it."""


class CheckpointWarning(UserWarning):
    """Something was moved aside, replaced or taken over; training can go on, but a person may want to look."""
