"""CLIP's image preprocessing on tensors: one function for the image encoder E(x) and the metrics.

It follows ``CLIPImageProcessor`` (openai/clip-vit-*): bicubic resize of the shorter side to the
model's size (antialiased, as PIL's resize is), centre crop to a square, then CLIP's mean/std
normalisation. Working on tensors keeps images on the device and in the pipeline's own pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixel_values(x: torch.Tensor, size: int, antialias: bool = True, clamp: bool = True) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, size, size) CLIP ``pixel_values``.

    ``antialias=False, clamp=False`` is the released StyleDiffusion code's preprocessing (torchvision
    ``Resize`` on a tensor, which did not antialias before torchvision 0.17, and no clamp of the
    bicubic overshoot); kept for the measurement in ``benchmarks/clip_preprocessing_antialias.py``.
    """
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)
    if clamp:
        x = x.clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
