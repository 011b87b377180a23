"""What one request to the shared web demo may ask for, and how a running request is stopped.

The demo serves every visitor from one model, one request at a time, so a single request must not be
able to hold it for hours. ``ServiceLimits`` holds the operator's limits (``python -m stylediffusion.app
--max_steps ...``; the defaults below are the one place they are set); every page request is checked
against them before any work, and refused with one line that names the limit and the flag that raises
it. ``RequestGuard`` stops a request that runs past its time budget or that its visitor cancelled: it
checks before every UNet call (a forward pre-hook, the standard PyTorch observer), so any inversion or
edit method stops within one model call, its exception releases the model, and nothing is written.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import UserError

# The defaults keep a request on the test-bed model (CPU) under a minute: the page's own defaults
# (T = 30, K = 100, StyleDiffusion's ~1 000 training iterations) are the largest request admitted,
# 37 s on a 2-core machine; Null-text at T = 30 takes 14 s; an edit ~1.3 s per target at T = 30
# (docs/reliability.md, "The web demo as a shared service"). On a busier machine the time budget
# stops what would take longer.
DEFAULT_MAX_STEPS = 30
DEFAULT_MAX_INNER_STEPS = 100
DEFAULT_MAX_TARGETS = 8
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_PROMPT_CHARS = 300  # the text encoder reads 77 tokens; a longer text is refused unread
DEFAULT_MAX_SECONDS = 60.0
DEFAULT_MAX_QUEUE = 16  # requests waiting for the model; one more is refused by Gradio's queue
DEFAULT_CACHE_MAX_MB = 512.0
DEFAULT_MAX_UPLOAD_MB = 20  # Gradio refuses a larger upload before it is stored


class RequestStopped(UserError):
    """A running request was stopped: past its time budget, or cancelled by its visitor."""


@dataclass(frozen=True)
class ServiceLimits:
    max_steps: int = DEFAULT_MAX_STEPS
    max_inner_steps: int = DEFAULT_MAX_INNER_STEPS
    max_targets: int = DEFAULT_MAX_TARGETS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_seconds: float = DEFAULT_MAX_SECONDS

    @staticmethod
    def over(what: str, value, limit, flag: str) -> UserError:
        """The one line for a request beyond a limit: what, the limit, and the flag that raises it."""
        return UserError(f"{what} is {value}, above this server's limit of {limit}: ask for less, "
                         f"or the operator can raise it with {flag}.")

    def check_steps(self, num_inference_steps: int, num_inner_steps: int) -> None:
        if num_inference_steps > self.max_steps:
            raise self.over("T (DDIM steps)", num_inference_steps, self.max_steps, "--max_steps")
        if num_inner_steps > self.max_inner_steps:
            raise self.over("K (training iterations)", num_inner_steps, self.max_inner_steps, "--max_inner_steps")

    def check_targets(self, count: int) -> None:
        if count > self.max_targets:
            raise self.over("the number of target prompts", count, self.max_targets, "--max_targets")

    def check_text(self, text: str, what: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise self.over(what, f"{len(text)} characters long", f"{self.max_prompt_chars} characters",
                            "--max_prompt_chars")

    def check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_image_pixels:
            raise self.over("the image", f"{width}x{height} ({width * height} pixels)",
                            f"{self.max_image_pixels} pixels", "--max_image_pixels")


class RequestGuard:
    """One request's deadline and cancel flag; ``watching(unet)`` makes every model call check both."""

    def __init__(self, max_seconds: float):
        self.max_seconds = float(max_seconds)
        self.deadline: float | None = None  # set when the request gets the model (time in the queue is not work)
        self.cancelled = threading.Event()

    def start(self) -> None:
        self.deadline = time.monotonic() + self.max_seconds
        self.check()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise RequestStopped("cancelled: the request was stopped and the model is free; nothing was kept.")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RequestStopped(f"stopped: the request ran past this server's time budget of {self.max_seconds:g} s "
                                 "per request; ask for fewer steps (T, K) or targets, or the operator can raise "
                                 "--max_seconds.")

    @contextmanager
    def watching(self, module):
        """Check before every forward call of ``module`` (and once now) while the block runs."""
        handle = module.register_forward_pre_hook(lambda _module, _args: self.check())
        try:
            self.start()
            yield self
        finally:
            handle.remove()
