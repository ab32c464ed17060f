"""The errors a user can fix. The entry points print each as one line (no traceback) and exit
non-zero; every message names the field, file or flag and the fix. Anything else is a bug."""


class UserError(Exception):
  """Bad input from the user: config, command line, data, model or checkpoint."""


class ConfigError(UserError, ValueError):
  """A config field (or a model's config.json) kat_jax cannot use; the message names the field."""


class CheckpointError(UserError, ValueError):
  """A model or checkpoint directory kat_jax cannot use; the message names the file or tensor."""


class TrainingStopped(UserError, RuntimeError):
  """Training stopped on purpose (e.g. too many consecutive non-finite updates); the message
  names the last good checkpoint and what to change."""
