"""Reading the user's image into the model's pixel space, and writing pictures back out."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .errors import UserError
from .files import atomic_write


def load_image(path: str | Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """Image file -> (1, 3, size, size) tensor in [-1, 1], plus notes on every conversion made.

    The EXIF orientation of a camera photo is applied (the picture is edited the way it is shown);
    16-bit images are scaled to 8 bits; grayscale/palette/RGBA images are converted to RGB (alpha
    composited on white) and non-square images are centre-cropped: the method needs a square RGB
    input, and silently changing the picture would surprise the user, so each change is reported.
    A decompression bomb (more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS``) is refused unread.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"image '{path}' {what}: pass an existing file with --image_path (or fix the index row).")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"image '{path}' is refused as a decompression bomb: {err}") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f"image '{path}' cannot be read as a picture ({err}): pass a PNG or JPEG file.") from err
    return prepare_image(img, size, path.name)


def check_image_readable(path: str | Path) -> None:
    """A missing or unreadable file raises its UserError cheaply (an 8-pixel load), before any model loads."""
    load_image(path, 8)


def prepare_image(img: Image.Image, size: int, name: str = "image") -> tuple[torch.Tensor, list[str]]:
    """A PIL image -> (1, 3, size, size) tensor in [-1, 1] and notes, converted as ``load_image`` says."""
    notes = []
    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation: 1 = as stored
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        notes.append(f"{name}: turned upright as its EXIF orientation ({orientation}) says")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notes.append(f"{name}: {img.mode} image (more than 8 bits per pixel) scaled to 8 bits")
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
        notes.append(f"{name}: had an alpha channel; composited on white")
    elif img.mode != "RGB":
        notes.append(f"{name}: mode {img.mode} converted to RGB")
        img = img.convert("RGB")
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        notes.append(f"{name}: {w}x{h} is not square; centre-cropped to {side}x{side}")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return pil_to_tensor(img), notes


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer / float) single-channel image as 8-bit grayscale.

    Pillow's own ``convert("RGB")`` clips such values at 255, turning a 16-bit PNG all white; the
    full range is scaled instead: 16-bit and integer images by 255/65535, float images from [0, 1].
    """
    arr = np.asarray(img, dtype=np.float64)
    scale = 255.0 if img.mode == "F" and np.nanmax(arr, initial=0.0) <= 1.0 else (
        1.0 if img.mode == "F" else 255.0 / 65535.0)
    return Image.fromarray(np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8), mode="L")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(1|3, H, W) or (1, 3, H, W) tensor in [-1, 1] -> PIL image."""
    if x.ndim == 4:
        x = x[0]
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def image_sha256(x: torch.Tensor) -> str:
    """Hash of the preprocessed pixels: the same picture gives the same hash whatever its file format."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return hashlib.sha256(arr.tobytes()).hexdigest()


def image_grid(images: list[Image.Image], labels: list[str] | None = None, pad: int = 4) -> Image.Image:
    """Side-by-side strip of equally sized images with optional captions under each."""
    w, h = images[0].size
    if w < 128:  # small models' outputs: enlarge (nearest) so that a person can see them and read the labels
        factor = -(-128 // w)
        images = [im.resize((im.width * factor, im.height * factor), Image.NEAREST) for im in images]
        w, h = images[0].size
    text_h = 14 if labels else 0
    grid = Image.new("RGB", (len(images) * (w + pad) + pad, h + 2 * pad + text_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        x = pad + k * (w + pad)
        grid.paste(im.resize((w, h)), (x, pad))
        if labels:
            draw.text((x, pad + h + 1), labels[k], fill="black")
    return grid


def save_atomic(img: Image.Image, path: Path) -> None:
    """Write a picture so that a crash never leaves a half-written file under the final name."""
    fmt = path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt))
