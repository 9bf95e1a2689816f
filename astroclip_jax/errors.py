"""The project's own errors: mistakes in what a user gave, as opposed to bugs.

`main.py` prints a `UserError` as one line, `error: <message>`, and exits 1; anything else is a
bug and keeps its traceback. Each message names the file, field or directory at fault and what
was expected. The subclasses also derive from the built-in error a caller would expect, so
`except FileNotFoundError` still catches a missing input.
"""


class UserError(Exception):
    """A bad input, setting or work directory; its message is the whole story."""


class ConfigError(UserError, ValueError):
    """A config field is missing, unknown, or has a value that cannot work."""


class MissingInput(UserError, FileNotFoundError):
    """A file, dataset or checkpoint that the mode needs is not there."""


class WouldOverwrite(UserError, FileExistsError):
    """A result exists and the settings do not allow replacing it."""


class DataError(UserError, ValueError):
    """A data file is not what the reader expects (names the file, group, row and field)."""


class Busy(UserError):
    """Another process holds the lock of a directory this one would write."""


class DamagedCheckpoint(UserError):
    """A checkpoint step failed verification (and no intact step could take its place)."""


class TrainingDiverged(UserError):
    """A loss or gradient became non-finite; nothing was saved after the last good step."""
