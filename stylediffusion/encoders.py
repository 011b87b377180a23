"""Everything that depends only on the image or the prompt, computed once per run."""
from __future__ import annotations

import torch

from .clip_preprocess import clip_pixel_values
from .errors import UserError
from .models import ModelBundle


def check_prompt_length(tokenizer, prompt: str) -> None:
    """Refuse a prompt longer than the text encoder reads: truncating it would drop words silently,
    and a blend or re-weight word past the cut would have no map to edit."""
    limit = int(tokenizer.model_max_length)
    # with the start and end tokens; verbose=False: the too-long warning transformers would print is this
    # function's own message (a long prompt on the web demo must not write to the server's console)
    count = len(tokenizer(prompt, verbose=False).input_ids)
    if count > limit:
        raise UserError(f"the prompt {prompt[:40] + '...'!r} is {count} tokens long; the text encoder reads at most "
                        f"{limit} (start and end tokens included): shorten it.")


@torch.no_grad()
def encode_prompts(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (n, max_tokens, width) of the padded prompts, in float32 (``predict`` casts them);
    on SDXL (n, max_tokens + 1, width) with the pooled embedding as the last row (families.py)."""
    for prompt in prompts:
        check_prompt_length(bundle.tokenizer, prompt)
    return bundle.family.encode_prompts(bundle, prompts)


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

    SD input in [-1, 1] -> [0, 1] -> :func:`clip_preprocess.clip_pixel_values` (antialiased bicubic
    resize, clamp, centre crop, CLIP normalisation). The released code did not antialias or clamp
    (torchvision ``Resize`` on a tensor); what that changes is measured in docs/method.md
    (``benchmarks/clip_preprocessing_antialias.py``). Shape (1, patches + 1, vision width), fp32.
    """
    enc = bundle.image_encoder
    x = (image.to(bundle.device, torch.float32) + 1) / 2
    pixels = clip_pixel_values(x, int(enc.config.image_size))
    hidden = enc(pixel_values=pixels.to(enc.dtype)).last_hidden_state
    # transformers 5 flattened CLIPVisionModel; 4.x keeps the layers under .vision_model
    post_layernorm = getattr(enc, "post_layernorm", None) or enc.vision_model.post_layernorm
    return post_layernorm(hidden).float()
