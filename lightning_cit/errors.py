"""The exception types the CLI turns into one ``error:`` line: bad input (exit 2) and a run that went wrong (exit 1)."""


class ConfigError(ValueError):
    """A configuration, task definition or data file is invalid. The CLI prints the message and exits 2."""


class RunError(RuntimeError):
    """A run that went wrong (a non-finite loss, a checkpoint that cannot be written): never reported as a success.

    The CLI prints the message as one ``error:`` line and exits 1; no ``complete: true`` is written.
    """
