"""The optional dependencies (``pyproject.toml``'s extras), imported in this one guarded place.

Everything else imports at the top of its module. ``load`` imports an optional package (or one of its
modules) when a feature first needs it; a missing package is one ``UserError`` line naming the extra
to install. An ImportError from inside an installed package (a dependency of its own) is not hidden.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from .errors import UserError

# package -> the line that says how to install it (the extra of pyproject.toml that holds it)
MISSING = {
    "gradio": "the web demo needs Gradio: pip install -e '.[demo]'",
    "torchmetrics": "torchmetrics is not installed: pip install 'stylediffusion[metrics]'",
}


def load(module: str) -> ModuleType:
    """``import module`` for an optional package named in ``MISSING``."""
    package = module.partition(".")[0]
    if package not in MISSING:
        raise ValueError(f"{package!r} is not an optional dependency: import it at the top of the module.")
    if package == "gradio":  # Gradio would otherwise report usage to its servers
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name != package:
            raise
        raise UserError(MISSING[package]) from err
