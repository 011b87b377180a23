"""The demo page's helpers, shared by its sections (``app``, ``app_style_transfer``): reading a form's
fields (text, a dropdown's name, the image field) with one-line errors, writing a result file atomically,
and what a handler hands back to Gradio (a ``UserError`` as the page's line, pictures enlarged and tagged).
"""
from __future__ import annotations

import functools
import json
import os
import uuid
import warnings
from pathlib import Path

from PIL import Image

from . import optional
from .demo_limits import ServiceLimits
from .errors import UserError, one_line
from .files import atomic_write_text
from .image_io import _to_8bit, save_atomic
from .validate import _short  # the one shortened repr of a bad value in messages

# Modes a PNG stores as they are; an upload in another mode (CMYK, YCbCr, LAB, HSV, F...) is converted
# once, before it is hashed, so the picture kept for a page reload is the picture that was inverted.
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_ALPHA_MODES = {"PA": "RGBA", "RGBa": "RGBA", "La": "LA"}  # the others (CMYK, YCbCr, LAB, HSV, RGBX) -> RGB
# No text field is read beyond this many characters (the limits on prompts and targets then apply).
MAX_FIELD_CHARS = 1_000_000


def _field_text(value, what: str, max_chars: int) -> str:
    """A text field's value: text (None = empty) of at most ``max_chars`` characters, refused unread beyond."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{what} must be text, not {type(value).__name__}.")
    if len(value) > max_chars:
        raise UserError(f"{what} is {len(value)} characters long; this page takes at most {max_chars}.")
    return value


def _choice(value, what: str) -> str:
    """A dropdown's value: a short name (the registry or the list then says whether it is one of theirs)."""
    if not isinstance(value, str) or len(value) > 100:
        raise UserError(f"{what} {_short(value)} is not one of the names this page offers.")
    return value


def page_image(value, limits: ServiceLimits) -> Image.Image | None:
    """The picture of the image field: a PIL image, a file path, or Gradio's file record (``{"path": ...}``,
    when the page passes its inputs unprocessed). Its size is checked from the header, before any pixel is
    decoded; what cannot be read is one line; a mode a PNG cannot keep is converted to RGB(A) or 8-bit gray."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, Image.Image):
        image = value
        limits.check_pixels(*image.size)
    elif isinstance(value, (str, os.PathLike)):
        try:
            with warnings.catch_warnings():
                # Pillow only warns between MAX_IMAGE_PIXELS and twice that; the limit below decides.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(value)
                limits.check_pixels(*image.size)
                image.load()
        except UserError:
            raise
        except Image.DecompressionBombError:
            raise limits.over("the image", "larger than Pillow decodes (a decompression bomb)",
                              f"{limits.max_image_pixels} pixels", "--max_image_pixels") from None
        except (OSError, ValueError, SyntaxError, TypeError, Image.UnidentifiedImageError) as err:
            raise UserError(f"the uploaded file cannot be read as a picture ({type(err).__name__}): "
                            "upload a PNG or JPEG image.") from None
    else:
        raise UserError(f"the image field holds {type(value).__name__}, not a picture: upload a PNG or JPEG image.")
    if image.width < 1 or image.height < 1:
        raise UserError("the image is empty (no pixels): upload a picture.")
    if image.mode not in _PNG_MODES:
        try:
            image = _to_8bit(image) if image.mode in ("F", "I;16B", "I;16L", "I;16N") else \
                image.convert(_ALPHA_MODES.get(image.mode, "RGB"))
        except (OSError, ValueError) as err:
            raise UserError(f"an image of mode {image.mode} cannot be converted ({err}): upload a PNG or JPEG "
                            "image.") from None
    return image


def _write_json_atomic(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    save_atomic(image, path)


def page_errors(fn):
    """A UserError becomes the page's one-line message (no traceback), and the server keeps serving."""
    gr = optional.load("gradio")

    @functools.wraps(fn)  # keeps the signature: Gradio finds the gr.Progress argument through it
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise gr.Error(one_line(err), print_exception=False) from None
    return wrapper


def for_display(image: Image.Image | None, side: int = 256) -> Image.Image | None:
    """Small model outputs (the test bed's 32x32) enlarged with nearest pixels, so they are seen as they are."""
    if image is None or image.width >= side:
        return image
    factor = -(-side // image.width)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def own_copy(image: Image.Image | None) -> Image.Image | None:
    """The picture tagged with a text chunk unique to this response. Gradio stores a picture it sends under
    the hash of its bytes and rewrites that file in place each time, so two sessions sent the same
    picture at once (a cached inversion) could read it while it is rewritten (an empty download)."""
    if image is None:
        return None
    tagged = image.copy()
    tagged.info["stylediffusion-response"] = uuid.uuid4().hex
    return tagged


def _session(request) -> str | None:
    """Whose request this is: Gradio's session hash (one per browser tab or client)."""
    return getattr(request, "session_hash", None) if request is not None else None
