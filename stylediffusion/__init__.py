"""StyleDiffusion: prompt-embedding inversion and P2Plus editing of real images on current diffusers.

    from stylediffusion import StyleDiffusionEditor, Inversion
    editor = StyleDiffusionEditor.from_pretrained("CompVis/stable-diffusion-v1-4")  # or from_pipe(pipe)
    inv = editor.invert("cat.jpg", "a cat sitting on a chair")
    out = editor.edit(inv, "a tiger sitting on a chair", blend_words=("cat", "tiger"))
"""

__version__ = "0.1.0"

from .api import EditOutput, StyleDiffusionEditor  # noqa: E402
from .errors import UserError  # noqa: E402
from .results import Inversion  # noqa: E402

__all__ = ["EditOutput", "Inversion", "StyleDiffusionEditor", "UserError"]
