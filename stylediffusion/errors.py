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


_startup = {"active": False}


def _interrupt_at_startup(signum, frame):
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.write("interrupted during start-up: nothing was written.\n")
    sys.stderr.flush()
    os._exit(130)


def started() -> None:
    """Start-up (imports, model loading, checks) is over and work that writes files begins: from
    here on a Ctrl-C is a KeyboardInterrupt again, which the command turns into its own one line
    after cleaning up (e.g. keeping the partial inversion)."""
    import signal

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
    import signal
    import sys
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _interrupt_at_startup)
        _startup["active"] = True
    try:
        return action() or 0
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        from .files import FILESYSTEM_ERRNOS, filesystem_error

        if err.errno not in FILESYSTEM_ERRNOS:
            raise
        print(f"error: {one_line(filesystem_error(err, action='use'))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(one_line(interrupted_message), file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            _startup["active"] = False


def quiet_libraries() -> None:
    """Silence the progress bars ("Loading weights") and warnings of diffusers, transformers and
    huggingface_hub through their own logging settings, so that an ``error:`` line is the only line a
    failed run writes to stderr. The project's own progress bars (``--progress``) are unaffected."""
    import warnings

    import huggingface_hub.utils as hub_utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    hub_utils.disable_progress_bars()
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    # Python warnings raised from inside these libraries (deprecations of their own API).
    warnings.filterwarnings("ignore", module=r"(diffusers|transformers|huggingface_hub|accelerate)(\.|$)")
