"""The errors ouro_jax raises for bad input: each names the problem in one line, so a CLI can print it."""


class OuroError(Exception):
    """Base class of the expected, user-facing errors (a CLI prints the message, not a traceback)."""


class ConfigError(OuroError, ValueError):
    """An unknown, inconsistent, mistyped or unsupported setting."""


class CheckpointError(OuroError, ValueError):
    """A missing, corrupt or mismatched checkpoint (ours or HF)."""
