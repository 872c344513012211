"""The error a bad setting raises, in a module that imports nothing, so that every module can raise it."""


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key or file and what was expected."""
