"""Configurations and builders of the test-bed model's components.

All components are the real diffusers / transformers classes used by Stable
Diffusion v1, only tiny:

* VAE: ``AutoencoderKL`` with two resolution levels (x2 downsampling), so a
  32x32 image becomes a 16x16x4 latent;
* UNet: ``UNet2DConditionModel`` with SD's block layout (CrossAttnDownBlock2D x3
  + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3) on
  16x16 latents: cross-attention at 16x16, 8x8, 4x4 (the "mid-low" latent/4
  resolution) and in the 2x2 mid block;
* text encoder: ``CLIPTextModel`` driven by the real SD v1 tokenizer (77 tokens);
* image encoder: ``CLIPVisionModel`` on 32x32 images, 4x4 patches;
* scheduler: SD v1's ``DDIMScheduler`` configuration.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TOKENIZER_DIR = os.path.join(ASSETS, "clip_tokenizer")
DEFAULT_MODEL_DIR = os.path.join(ASSETS, "testbed_model")

IMAGE_SIZE = 32
LATENT_SIZE = 16
TEXT_WIDTH = 64
MAX_LENGTH = 77

VAE_CONFIG: Dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    mid_block_add_attention=False,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # replaced by 1/std of the latents after training
)

UNET_CONFIG: Dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=4,  # SD naming quirk: number of heads
    norm_num_groups=16,
)

TEXT_CONFIG: Dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=TEXT_WIDTH,
)

VISION_CONFIG: Dict[str, Any] = dict(
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=4,
    num_channels=3,
    hidden_act="quick_gelu",
    projection_dim=TEXT_WIDTH,
)

SCHEDULER_CONFIG: Dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_vae():
    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder():
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def truncate_text_encoder(text_encoder, n_layers: int):
    """The same CLIP text tower keeping only its first ``n_layers`` transformer layers (its token and
    position embeddings and final layer norm unchanged).  With 0 layers a word's encoding is its own
    embedding plus its position's, whatever words come before it: colour and shape words stay apart,
    so a (colour, shape) pair never seen in training is made of encodings that were."""
    config = CLIPTextConfig.from_dict({**text_encoder.config.to_dict(), "num_hidden_layers": n_layers})
    if n_layers > text_encoder.config.num_hidden_layers or n_layers < 0:
        raise ValueError(f"cannot keep {n_layers} of {text_encoder.config.num_hidden_layers} layers")
    out = CLIPTextModel(config)

    layer = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")
    keep = {k: v for k, v in text_encoder.state_dict().items()
            if not layer.search(k) or int(layer.search(k).group(1)) < n_layers}
    out.load_state_dict(keep)
    return out.to(text_encoder.dtype).eval()


def build_vision_encoder():
    return CLIPVisionModel(CLIPVisionConfig(**VISION_CONFIG))


def build_tokenizer():
    return CLIPTokenizer(
        os.path.join(TOKENIZER_DIR, "vocab.json"),
        os.path.join(TOKENIZER_DIR, "merges.txt"),
        model_max_length=MAX_LENGTH,
    )


def build_scheduler():
    return DDIMScheduler(**SCHEDULER_CONFIG)


def images_to_tensor(images):
    """uint8 (N,H,W,3) numpy -> float tensor (N,3,H,W) in [-1, 1]."""
    arr = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))
    return torch.from_numpy(arr).float().div_(127.5).sub_(1.0)


def tensor_to_images(x):
    """float tensor (N,3,H,W) in [-1, 1] -> uint8 (N,H,W,3) numpy."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().byte().cpu().numpy()
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
