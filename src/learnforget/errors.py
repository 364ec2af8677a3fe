"""The one exception type for bad input: the CLI prints its message on one line."""


class ConfigError(ValueError):
    """A bad value in the config or on the command line (names the value and what was expected)."""
