"""How problems reach the user: errors that end a command, stops that can be continued, warnings.

Every problem a user can fix is one of the exceptions below, caught by the command line
(cli.py) and printed as one line; anything else that escapes is a bug and keeps its traceback.
Warnings (`warn`) go to stderr with the same prefix, so that logs can be searched for them.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem with the user's input, explained in one line that names the fix.

    The CLI prints it as ``hftextgen: error: <message>`` with exit code 2 and no traceback
    (``--debug`` shows one).
    """


class ConfigError(UserError, ValueError):
    """An impossible recipe value, found while the recipe is parsed; the message names the key
    and what to set instead. A ValueError too, because jsonargparse turns the ValueErrors of a
    dataclass's __post_init__ into its own parse errors."""


def require(condition: bool, message: str) -> None:
    """A recipe section's check: ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


class RunStopped(Exception):
    """A run that stopped before its end on request (SIGTERM, Ctrl-C) and can be continued.

    The message says where it stopped and the command that continues it; the CLI prints it and
    exits with ``exit_code``, 128 + the signal's number as shells report it (130 for Ctrl-C,
    143 for SIGTERM). Under several processes only the first one carries a message.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def warn(message: str) -> None:
    """Something the user should know that does not stop the command."""
    print(f"hftextgen: warning: {message}", file=sys.stderr, flush=True)
