"""The one exception type users are meant to see."""


class UserError(Exception):
    """A problem with the user's input, explained in one line that names the fix.

    The CLI prints it as ``hftextgen: error: <message>`` with exit code 2 and no traceback
    (``--debug`` shows one). Anything else that escapes is a bug and keeps its traceback.
    """


class RunStopped(Exception):
    """A run that stopped before its end on request (SIGTERM, Ctrl-C) and can be continued.

    The message says where it stopped and the command that continues it; the CLI prints it and
    exits with ``exit_code``, 128 + the signal's number as shells report it (130 for Ctrl-C,
    143 for SIGTERM). Under several processes only the first one carries a message.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
