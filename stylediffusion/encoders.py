"""Everything that depends only on the image or the prompt, computed once per run."""
from __future__ import annotations

import torch

from .clip_preprocess import clip_pixel_values
from .errors import UserError
from .models import ModelBundle


@torch.no_grad()
def check_prompt_length(tokenizer, prompt: str) -> None:
    """Refuse a prompt longer than the text encoder reads: truncating it would drop words silently,
    and a blend or re-weight word past the cut would have no map to edit."""
    limit = int(tokenizer.model_max_length)
    count = len(tokenizer.tokenize(prompt)) + 2  # with the start and end tokens
    if count > limit:
        raise UserError(f"the prompt {prompt[:40] + '...'!r} is {count} tokens long; the text encoder reads at most "
                        f"{limit} (start and end tokens included): shorten it.")


def encode_prompts(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (n, max_tokens, width) of the padded prompts, in float32 (``predict`` casts them)."""
    for prompt in prompts:
        check_prompt_length(bundle.tokenizer, prompt)
    tok = bundle.tokenizer(prompts, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
    return bundle.text_encoder(tok.input_ids.to(bundle.device))[0].float()


@torch.no_grad()
def encode_latent(bundle: ModelBundle, image: torch.Tensor) -> torch.Tensor:
    """z0 = VAE posterior mean times the scaling factor, in float32 (in the VAE's own dtype inside: a VAE
    borrowed from a half-precision pipeline stays as it is)."""
    dist = bundle.vae.encode(image.to(bundle.device, bundle.vae.dtype)).latent_dist
    return dist.mean.float() * bundle.scaling_factor


@torch.no_grad()
def decode_latent(bundle: ModelBundle, z: torch.Tensor) -> torch.Tensor:
    return bundle.vae.decode((z.to(torch.float32) / bundle.scaling_factor).to(bundle.vae.dtype)).sample.float()


def clip_pixel_values(image: torch.Tensor, size: int, antialias: bool = True, clamp: bool = True) -> torch.Tensor:
    """SD input in [-1, 1] -> the CLIP vision tower's input: [0, 1], bicubic resize of the shorter side to
    ``size``, centre crop, CLIP mean/std.

    ``antialias=True`` (default) low-pass filters while shrinking, as PIL's bicubic resize in CLIP's
    own preprocessing does; the released code ran torchvision's ``Resize`` on a tensor, which (before
    torchvision 0.17) does not antialias, and did not clamp the bicubic overshoot. Both differences
    are measured in docs/method.md (``benchmarks/clip_preprocessing_antialias.py``).
    """
    x = (image.to(torch.float32) + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      align_corners=False, antialias=antialias)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    if clamp:
        x = x.clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def clip_image_features(bundle: ModelBundle, image: torch.Tensor) -> torch.Tensor:
    """E(x): the final layer norm over ALL tokens of the vision tower's last hidden state, no projection.

    Input preprocessing: :func:`clip_pixel_values` (antialiased bicubic resize, centre crop, CLIP
    normalisation). Shape (1, patches + 1, vision width), fp32.
    """
    enc = bundle.image_encoder
    pixels = clip_pixel_values(image.to(bundle.device), int(enc.config.image_size))
    hidden = enc(pixel_values=pixels.to(enc.dtype)).last_hidden_state
    # transformers 5 flattened CLIPVisionModel; 4.x keeps the layers under .vision_model
    post_layernorm = getattr(enc, "post_layernorm", None) or enc.vision_model.post_layernorm
    return post_layernorm(hidden).float()
