"""Running a command (the CLIs, the bench, the demo server): exit codes, Ctrl-C, quiet libraries.

``exit_code`` is the one runner: a ``UserError`` or a file-system fault becomes one ``error:`` line on stderr
and exit code 2, Ctrl-C one line and 130. It lives above ``errors`` (the leaf every module imports) and
``files`` (whose file-system errors it names), so neither imports the other's caller. It imports nothing
heavy: an entry point calls ``guard_start_up`` before it imports its command (torch, diffusers).
"""
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager

from .errors import UserError, one_line
from .files import FILESYSTEM_ERRNOS, filesystem_error

_startup = {"active": False}


def _interrupt_at_startup(signum, frame):
    sys.stdout.flush()
    sys.stderr.write("interrupted during start-up: nothing was written.\n")
    sys.stderr.flush()
    os._exit(130)


def guard_start_up() -> None:
    """Called by a command's entry point before it imports the command (and so torch and diffusers):
    until ``started()``, a Ctrl-C ends the process with one line, as it does inside ``exit_code``."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt_at_startup)
        _startup["active"] = True


def started() -> None:
    """Start-up (imports, model loading, checks) is over and work that writes files begins: from
    here on a Ctrl-C is a KeyboardInterrupt again, which the command turns into its own one line
    after cleaning up (e.g. keeping the partial inversion)."""
    if _startup["active"]:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _startup["active"] = False


def exit_code(action, interrupted_message: str) -> int:
    """Run a command's body: 0 on success, 2 with one ``error:`` line for a UserError or a
    file-system fault, 130 with one line on Ctrl-C.

    Until the body calls ``started()``, Ctrl-C ends the process at once with one line: a
    KeyboardInterrupt raised while torch/diffusers are being imported can be swallowed by the import
    machinery of those libraries (the run then went on as if nothing happened), and nothing has been
    written yet that would need cleaning up."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _interrupt_at_startup)
        if previous is _interrupt_at_startup:  # the entry point guarded its imports (guard_start_up)
            previous = signal.default_int_handler
        _startup["active"] = True
    try:
        return action() or 0
    except UserError as err:
        _final_line(f"error: {one_line(err)}")
        return 2
    except OSError as err:
        if err.errno not in FILESYSTEM_ERRNOS:
            raise
        _final_line(f"error: {one_line(filesystem_error(err, action='use'))}")
        return 2
    except KeyboardInterrupt:
        _final_line(one_line(interrupted_message))
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            _startup["active"] = False


def _final_line(text: str) -> None:
    """The command's last word on stderr (the one place the package writes to it itself)."""
    sys.stderr.write(text + "\n")


class _PlainLines(logging.Handler):
    """Each message as a plain line on ``sys.<stream>``, looked up at each message, so a replaced
    ``sys.stdout`` (tests) is honoured."""

    def __init__(self, stream: str, level: int):
        super().__init__(level)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        getattr(sys, self.stream).write(self.format(record) + "\n")


@contextmanager
def package_notes_on_stdout(stream: str = "stdout", level: int = logging.INFO):
    """The command's lines: every message of the package's loggers (``stylediffusion.*``: the command's own
    lines, resuming or setting aside a partial inversion...) as plain lines on stdout; stderr stays for the
    one ``error:`` line. The demo's server passes ``stream="stderr", level=logging.WARNING``."""
    package = logging.getLogger("stylediffusion")
    handler, saved = _PlainLines(stream, level), package.level
    package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(saved)
