"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and exit code 2; library callers can catch it like
any ``ValueError``. Everything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input or missing resources, with a message that says what to do about it."""


def exit_code(action, interrupted_message: str) -> int:
    """Run a command's body: 0 on success, 2 with one ``error:`` line for a UserError, 130 on Ctrl-C."""
    import sys

    try:
        return action() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message, file=sys.stderr)
        return 130
