"""What a stage trains or trains against: the CLIP pair of the clip stage, the trained text encoder and
VAE of a run's checkpoints, or the frozen parts of an exported folder, with the hashes that say a
resumed run still uses the same latent and text spaces."""

from __future__ import annotations

import hashlib
import math
import os
import sys
from typing import Optional

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from stylediffusion.testbed import model as M

from .stage_files import load_training_stage


def clip_modules():
    te, ve = M.build_text_encoder(), M.build_vision_encoder()
    proj_t = torch.nn.Linear(M.TEXT_WIDTH, M.TEXT_WIDTH, bias=False)
    proj_v = torch.nn.Linear(M.TEXT_WIDTH, M.TEXT_WIDTH, bias=False)
    scale = torch.nn.Module()
    scale.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return {"text": te, "vision": ve, "proj_t": proj_t, "proj_v": proj_v, "scale": scale}


def vae_encoder_sha256(vae) -> str:
    """sha256 of the encoder's weights (encoder + quant_conv): what fixes the latent space."""
    h = hashlib.sha256()
    sd = vae.state_dict()
    for k in sorted(sd):
        if k.startswith(("encoder.", "quant_conv.")):
            h.update(k.encode())
            h.update(sd[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hashes_differ(a: Optional[dict], b: dict) -> bool:
    """True when two hash records disagree on a component both name."""
    return bool(a) and any(a[k] != b[k] for k in a.keys() & b.keys())


def load_trained_text_encoder(out: str):
    mods = clip_modules()
    meta = load_training_stage(out, "clip", mods, restore_rng=False)
    if meta is None:
        print("[warn] no clip checkpoint: using an untrained text encoder", file=sys.stderr)
    return mods, meta


def load_trained_vae(out: str, with_decoder_finetune: bool = True):
    vae = M.build_vae()
    meta = load_training_stage(out, "vae", {"vae": vae}, restore_rng=False)
    if meta is None:
        raise SystemExit("train the vae stage first")
    if with_decoder_finetune:
        # encoder weights are identical; the decoder is the sharpened one
        load_training_stage(out, "vae_decoder", {"vae": vae}, restore_rng=False)
    sf = meta["extra"].get("scaling_factor", 1.0)
    vae.register_to_config(scaling_factor=sf)
    return vae, meta


def frozen_parts_from_folder(model_dir: str):
    """(text encoder, VAE, UNet, sha256 of their weight files) of an exported diffusers folder."""
    te = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"), use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae"), use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"), use_safetensors=True)
    # the UNet depends on the text space and the latent space only: a decoder fine-tuned
    # afterwards (stage vae_decoder) keeps both
    hashes = {"text_encoder": file_sha256(os.path.join(model_dir, "text_encoder/model.safetensors")),
              "vae_encoder": vae_encoder_sha256(vae)}
    return te, vae, unet, hashes
