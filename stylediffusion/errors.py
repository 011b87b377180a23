"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and exit code 2; library callers can catch it like
any ``ValueError``. A file-system fault (disk full, read-only folder...) is answered the same way:
it is the machine's state, not a bug. Everything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input or missing resources, with a message that says what to do about it."""


def one_line(text: str) -> str:
    """The message on one line: the promise is exactly one ``error:`` line on stderr."""
    return " ".join(str(text).split())
