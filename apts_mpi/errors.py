"""The one error class for input that cannot run.

A config, a data file, a checkpoint, the world size, the device or an output folder that the
user can fix raises :class:`InputError` (or a subclass: ``ConfigError``, ``DataError``,
``OptionError``); the command line prints its message on one line and exits with status 2.  Any
other exception is a fault of the program and keeps its traceback (exit status 1).
"""


class InputError(ValueError):
    """Input that cannot run; the message says what and where, on one line."""


class ConfigError(InputError):
    """A config that cannot run; the message names the key (``data.context``, ``optimizer.radius``)."""
