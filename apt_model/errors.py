"""User-facing errors.

Every error a user can cause by bad input is an ``AptError`` whose message is one line that names the
problem (and the file / field where there is one). The CLI prints it as ``error: <message>`` and exits 2;
Prefect tasks treat it as "do not retry".
"""


class AptError(Exception):
    """Bad input or state the user can fix. The message is a single line."""

    def __init__(self, message: str) -> None:
        # A newline would break the one-line promise (and log parsers); fold it.
        super().__init__(" ".join(str(message).split()))


class ConfigError(AptError, ValueError):
    """Invalid configuration, flag or parameter."""


class DataError(AptError, ValueError):
    """A dataset file that cannot be used."""


class CheckpointError(AptError):
    """A checkpoint or exported model that cannot be loaded or does not fit."""
