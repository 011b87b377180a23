"""What an edit returns: ``EditOutput``, one edited picture per target prompt.

Below ``api`` (which returns it) and ``style_transfer`` (whose ``TransferOutput`` extends it), so neither
imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from .editing import EditSpec
from .image_io import image_grid


@dataclass
class EditOutput:
    """What ``StyleDiffusionEditor.edit`` returns: one edited picture per target prompt."""

    images: list[Image.Image]  # the edits, in the order of the targets
    reconstruction: Image.Image  # the source branch: the inverted image regenerated
    attention_maps: Image.Image | None  # the source prompt's cross-attention per word (edits that record it)
    input_image: Image.Image  # what was inverted (for a generation: the source prompt's sample)
    latents: list[torch.Tensor] = field(default_factory=list)  # (2, C, h, w) per target: [reconstruction, edit]
    # per target: the averaged mid-low cross-attention maps (prompts, queries, tokens), None where not recorded
    cross_attention: list[torch.Tensor | None] = field(default_factory=list)
    specs: list[EditSpec] = field(default_factory=list)
    seconds: float = 0.0

    def grid(self) -> Image.Image:
        """input | reconstruction | edit 1 | edit 2 ..., labelled."""
        labels = ["input", "reconstruction"] + [spec.target for spec in self.specs]
        return image_grid([self.input_image, self.reconstruction, *self.images], labels)
