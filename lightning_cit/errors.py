"""The one exception type for bad input: its message names what to fix (file, line, task, field, choices)."""


class ConfigError(ValueError):
    """A configuration, task definition or data file is invalid. The CLI prints the message and exits 2."""
