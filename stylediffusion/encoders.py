"""Everything that depends only on the image or the prompt, computed once per run."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import ModelBundle

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def encode_prompts(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (n, max_tokens, width) of the padded prompts, in float32 (``predict`` casts them)."""
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


@torch.no_grad()
def clip_image_features(bundle: ModelBundle, image: torch.Tensor) -> torch.Tensor:
    """E(x): the final layer norm over ALL tokens of the vision tower's last hidden state, no projection.

    SD input in [-1, 1] -> [0, 1] -> bicubic resize to the encoder's size -> centre crop -> CLIP
    normalisation. Shape (1, patches + 1, vision width), fp32.
    """
    size = int(bundle.image_encoder.config.image_size)
    x = (image.to(bundle.device, torch.float32) + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    enc = bundle.image_encoder
    hidden = enc(pixel_values=((x - mean) / std).to(enc.dtype)).last_hidden_state
    # transformers 5 flattened CLIPVisionModel; 4.x keeps the layers under .vision_model
    post_layernorm = getattr(enc, "post_layernorm", None) or enc.vision_model.post_layernorm
    return post_layernorm(hidden).float()
