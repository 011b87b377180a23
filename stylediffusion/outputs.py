"""What the Python API returns, in diffusers' shape: ``BaseOutput`` dataclasses (attribute, key and
index access, ``to_tuple()``) whose pictures are in the call's ``output_type``.

``output_type``, as in diffusers pipelines:
- ``"pil"``: PIL images (``images`` a list);
- ``"np"``: float32 arrays in [0, 1], HWC (``images`` batched: (N, H, W, 3));
- ``"pt"``: float32 tensors in [0, 1], CHW (``images`` batched: (N, 3, H, W)), on the editor's device;
- ``"latent"``: nothing decoded: ``images`` the final edit latents (N, C, h, w), ``reconstruction``
  the source row's (C, h, w), on the editor's device; no picture fields (``attention_maps``, ``input_image``).
One image (``reconstruction``, ``images[i]``, ``input_image``, ``attention_maps``) always has the same form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils import BaseOutput
from PIL import Image

from .errors import UserError
from .image_io import image_grid, tensor_to_pil

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type={output_type!r} is not one of {', '.join(map(repr, OUTPUT_TYPES))}.")
    return output_type


def pictures(pixels: torch.Tensor, output_type: str):
    """(N, 3, H, W) decoded pixels in [-1, 1] -> N pictures in ``output_type``'s form (batched for np / pt)."""
    if output_type == "pil":
        return [tensor_to_pil(p) for p in pixels]
    unit = ((pixels.detach().float() + 1) / 2).clamp(0, 1)  # diffusers' denormalisation (VaeImageProcessor)
    return unit.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else unit


def picture(pixels: torch.Tensor, output_type: str):
    """One (3, H, W) or (1, 3, H, W) decoded image in [-1, 1] -> one picture in ``output_type``'s form."""
    return pictures(pixels.reshape(1, *pixels.shape[-3:]), output_type)[0]


def pil_picture(image: Image.Image, output_type: str, device: torch.device | None = None):
    """A picture made as PIL (the attention figure) -> ``output_type``'s form (RGB, [0, 1])."""
    if output_type == "pil":
        return image
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return array if output_type == "np" else torch.from_numpy(array).permute(2, 0, 1).to(device)


def to_pil(picture_) -> Image.Image:
    """One picture in any decoded form (PIL, HWC array in [0, 1], CHW tensor in [0, 1]) -> PIL."""
    if isinstance(picture_, Image.Image):
        return picture_
    if isinstance(picture_, torch.Tensor):
        picture_ = picture_.detach().float().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((np.clip(picture_, 0, 1) * 255).round().astype(np.uint8))


@dataclass
class EditOutput(BaseOutput):
    """What ``StyleDiffusionEditor.edit`` returns: one edited picture per target prompt.

    ``images``, ``reconstruction``, ``attention_maps``, ``input_image`` are in the call's ``output_type``
    (module docstring); ``latents`` and ``cross_attention`` are always CPU tensors. With
    ``return_dict=False`` an edit returns ``(images, reconstruction, attention_maps)`` instead."""

    images: list[Image.Image] | np.ndarray | torch.Tensor  # the edits, in the order of the targets
    reconstruction: Image.Image | np.ndarray | torch.Tensor | None  # the source branch: the inverted image regenerated
    attention_maps: Image.Image | np.ndarray | torch.Tensor | None  # the source prompt's cross-attention per word
    input_image: Image.Image | np.ndarray | torch.Tensor | None  # what was inverted (a generation: its sample)
    latents: list[torch.Tensor] = field(default_factory=list)  # (2, C, h, w) per target: [reconstruction, edit]
    # per target: the averaged mid-low cross-attention maps (prompts, queries, tokens), None where not recorded
    cross_attention: list[torch.Tensor | None] = field(default_factory=list)
    specs: list = field(default_factory=list)  # the editing.EditSpec of each target
    seconds: float = 0.0

    def grid(self) -> Image.Image:
        """input | reconstruction | edit 1 | edit 2 ..., labelled (a PIL image whatever the output_type)."""
        if self.input_image is None:
            raise UserError("grid() needs decoded pictures: this output holds latents (output_type='latent').")
        labels = ["input", "reconstruction"] + [spec.target for spec in self.specs]
        return image_grid([to_pil(p) for p in (self.input_image, self.reconstruction, *self.images)], labels)


__all__ = ["EditOutput", "OUTPUT_TYPES", "check_output_type", "pictures", "picture", "pil_picture", "to_pil"]
