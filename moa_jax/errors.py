"""The error a training run stops with: its message says why and what to do (the CLI prints it as one line)."""


class TrainingError(RuntimeError):
  """A run that cannot start or cannot go on; the message says why and what to do."""


class Diverged(TrainingError):
  """The loss or the parameters blew up: the run stopped without saving the bad state."""
