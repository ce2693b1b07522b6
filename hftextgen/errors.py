"""The one exception type users are meant to see."""


class UserError(Exception):
    """A problem with the user's input, explained in one line that names the fix.

    The CLI prints it as ``hftextgen: error: <message>`` with exit code 2 and no traceback
    (``--debug`` shows one). Anything else that escapes is a bug and keeps its traceback.
    """
