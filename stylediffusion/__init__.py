"""StyleDiffusion: prompt-embedding inversion and P2Plus editing of real images on current diffusers.

    from stylediffusion import StyleDiffusionEditor, Inversion
    editor = StyleDiffusionEditor.from_pretrained("CompVis/stable-diffusion-v1-4")  # or from_pipe(pipe)
    inv = editor.invert("cat.jpg", "a cat sitting on a chair")
    out = editor.edit(inv, "a tiger sitting on a chair", blend_words=("cat", "tiger"))
"""

__version__ = "0.1.0"

import importlib

from .errors import UserError

__all__ = ["EditOutput", "Inversion", "StyleDiffusionEditor", "UserError"]
_LAZY = {"EditOutput": ".outputs", "StyleDiffusionEditor": ".api", "Inversion": ".results"}


def __getattr__(name: str):
    # The API (torch, diffusers) is imported on first use, not by ``import stylediffusion``: an entry point
    # imports ``stylediffusion.runner`` first and installs its Ctrl-C guard (``guard_start_up``) before
    # torch loads, so a Ctrl-C while it loads is one line, exit 130, instead of a traceback.
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
