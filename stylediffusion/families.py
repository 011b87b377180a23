"""Model families, described once: how each turns prompts into UNet conditioning, and its default size.

| family | text encoding                                        | added conditioning                | default size |
|--------|------------------------------------------------------|-----------------------------------|--------------|
| SD 1.x | CLIP ViT-L/14 text tower, last hidden (77x768)       | none                              | 512²         |
| SD 2.x | OpenCLIP ViT-H text tower, last hidden (77x1024)     | none                              | 512² / 768²  |
| SDXL   | CLIP ViT-L (77x768) and OpenCLIP bigG (77x1280),     | pooled bigG projection (1280) and | 1024²        |
|        | penultimate hidden states, concatenated (77x2048)    | six time ids (original size,      |              |
|        |                                                      | crop, target)                     |              |

The default size is always the UNet's sample size times the VAE factor (``ModelBundle.default_image_size``);
``--image_size`` / ``image_size=`` runs at another (``check_image_size``), recorded in the model identity.

**The pooled row.** Everything in the toolkit passes one text tensor per prompt (concatenated for
guidance batches, optimised by Null-text, modulated by StyleDiffusion's mapping networks). On SDXL the
pooled embedding belongs to the prompt as much as the token states do, so it travels with them: an
SDXL prompt embedding is (n, 77 + 1, 2048), whose last row holds the pooled embedding (1280 values,
zero-padded to 2048). :func:`unet_conditioning` splits it off in the one place the UNet is called
(``sampling.predict``) into diffusers' ``added_cond_kwargs``; cross-attention only ever sees the 77
token rows. Consequences, each intended: Null-text optimises the pooled null embedding together with
the token embedding (docs/method.md); NPI's "source prompt as the negative" takes the source's pooled
embedding too; StyleDiffusion's mapping networks modulate the 77 token rows and pass the pooled row
through (``mapping.MappingNetwork``), so keys and pooled conditioning come from the plain prompt and
only the values are learned. SD 1.x/2.x embeddings have no extra row: nothing changes for them.

The time ids are the pipeline's defaults for a square crop of the whole image: original size = target
size = the pixel size of the latent being denoised, crop top-left (0, 0), computed from the latent
shape at every call, so other sizes than 1024² get their own ids.

SDXL's empty prompt: its ``model_index.json`` sets ``force_zeros_for_empty_prompt`` (the unconditional
branch was trained on zeros), so "" encodes to zeros, token rows and pooled row alike, as
``StableDiffusionXLPipeline`` does for an absent negative prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from .errors import UserError

# The attention level whose cross-attention maps StyleDiffusion's loss, LocalBlend and the attention
# pictures read: latent/4 (SD at 512²: 16², SDXL at 1024²: 32²; attention_control.AttentionPlace.is_mid_low).
MID_LOW_DOWNSCALE = 4


@dataclass(frozen=True)
class ModelFamily:
    """What one family of SD-shaped models needs from the toolkit (see the module docstring)."""

    name: str
    text_encoding: str
    added_conditioning: str
    pooled_row: bool = False  # the prompt embedding carries the pooled embedding as a last row

    def describe(self, bundle) -> str:
        size = f"size {bundle.image_size}² (default {bundle.default_image_size}²)" \
            if bundle.image_size != bundle.default_image_size else f"default size {bundle.image_size}²"
        return (f"{self.name}: {self.text_encoding}; added conditioning: {self.added_conditioning}; {size}; "
                f"{vae_note(bundle)}")

    # ---------------------------------------------------------------- prompts
    def encode_prompts(self, bundle, prompts: list[str]) -> torch.Tensor:
        """(n, 77, width) float32: the one text encoder's last hidden state of the padded prompts."""
        tok = bundle.tokenizer(prompts, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
        return bundle.text_encoder(tok.input_ids.to(bundle.device))[0].float()

    def text_tokens(self, text: torch.Tensor) -> int:
        """How many rows of a prompt embedding are token states (the keys and values of cross-attention)."""
        return text.shape[1] - (1 if self.pooled_row else 0)

    # ---------------------------------------------------------------- the UNet call
    def unet_conditioning(self, bundle, text: torch.Tensor, latent_hw) -> tuple[torch.Tensor, dict | None]:
        """(encoder_hidden_states, added_cond_kwargs) for a UNet call on latents of size ``latent_hw``."""
        return text, None

    def token_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The token rows of a prompt-shaped tensor (learned values or keys)."""
        return x


class SDXLFamily(ModelFamily):
    def encode_prompts(self, bundle, prompts: list[str]) -> torch.Tensor:
        """(n, 78, 2048) float32: both encoders' penultimate hidden states, then the pooled row."""
        states, pooled = [], None
        for tokenizer, encoder in (
            (bundle.tokenizer, bundle.text_encoder),
            (bundle.tokenizer_2, bundle.text_encoder_2),
        ):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(bundle.device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled = out[0].float()  # CLIPTextModelWithProjection: text_embeds, the pooled projection
        hidden = torch.cat(states, dim=-1)
        if pooled.shape[-1] > hidden.shape[-1]:
            raise UserError(f"the second text encoder's projection ({pooled.shape[-1]}) is wider than the "
                            f"cross-attention input ({hidden.shape[-1]}): not an SDXL-shaped model.")
        row = torch.zeros(hidden.shape[0], 1, hidden.shape[-1], device=hidden.device)
        row[:, 0, :pooled.shape[-1]] = pooled
        text = torch.cat([hidden, row], dim=1)
        if bundle.zero_empty_prompt:
            empty = torch.tensor([not p.strip() for p in prompts], device=text.device)
            text = torch.where(empty[:, None, None], torch.zeros_like(text), text)
        return text

    def unet_conditioning(self, bundle, text, latent_hw):
        hidden, row = text[:, :-1], text[:, -1]
        pooled = row[:, :pooled_width(bundle)]
        scale = bundle.vae_scale
        h, w = int(latent_hw[0]) * scale, int(latent_hw[1]) * scale
        dt = bundle.dtype
        # (original H, W, crop top, left, target H, W), filled on the device: no host->device copy per UNet call
        time_ids = torch.zeros(text.shape[0], 6, dtype=dt, device=text.device)
        time_ids[:, 0::4], time_ids[:, 1::4] = h, w
        return hidden, {"text_embeds": pooled.to(dt), "time_ids": time_ids}

    def token_rows(self, x):
        return x[:, :-1]


SD1 = ModelFamily("SD 1.x", "one CLIP text encoder, last hidden state", "none")
SD2 = ModelFamily("SD 2.x", "one OpenCLIP text encoder, last hidden state", "none")
SDXL = SDXLFamily("SDXL", "two text encoders (CLIP ViT-L + OpenCLIP bigG), penultimate hidden states concatenated",
                  "pooled text embedding + time ids (original size, crop, target size)", pooled_row=True)


def family_of(unet_config) -> ModelFamily:
    """The family of a UNet, from its config: SDXL's UNet takes ``text_time`` added conditioning; SD 2.x's
    reads 1024-wide text; every other SD-shaped UNet (SD 1.x, the test bed, tiny) conditions like SD 1.x."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    if unet_config.get("cross_attention_dim") == 1024:
        return SD2
    return SD1


def check_image_size(bundle, size) -> int:
    """A pixel size the model can run at: a multiple of the VAE factor times the UNet's total downsampling
    (64 for SD 1.x/2.x, 32 for SDXL), up to 4096."""
    step = bundle.vae_scale * 2 ** (len(bundle.unet.config.block_out_channels) - 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < step or size > 4096 or size % step:
        raise UserError(f"image size {size!r} does not fit this model: use a multiple of {step} from {step} to 4096 "
                        f"(its default is {bundle.default_image_size}).")
    return size


def pooled_width(bundle) -> int:
    return int(bundle.text_encoder_2.config.projection_dim)


def vae_note(bundle) -> str:
    """Which VAE runs and in which dtype (SDXL's own VAE overflows in float16, so it stays float32)."""
    where = f"VAE {bundle.vae_id}" if getattr(bundle, "vae_id", None) else "the model's VAE"
    return f"{where} in {str(bundle.vae.dtype).removeprefix('torch.')}"


# ---------------------------------------------------------------- loading
def folder_components(model: str) -> set[str]:
    """Component names a local folder's ``model_index.json`` lists (empty for a hub id or a folder without one)."""
    index = Path(model) / "model_index.json"
    if not index.is_file():
        return set()
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return set()
    return {k for k, v in data.items() if isinstance(v, list) and not k.startswith("_")}


def force_zeros_for_empty_prompt(model: str) -> bool:
    """The model's ``force_zeros_for_empty_prompt`` (StableDiffusionXLPipeline's default, True, when absent)."""
    try:
        if Path(model).is_dir():
            config = json.loads((Path(model) / "model_index.json").read_text())
        else:
            config = DiffusionPipeline.load_config(model)
    except (OSError, ValueError):
        return True
    return bool(config.get("force_zeros_for_empty_prompt", True))


def load_second_text_encoder(model: str, load_component, prefer_half: bool, unet_config) -> dict:
    """``text_encoder_2`` and ``tokenizer_2`` of an SDXL folder or hub id, or {} for SD 1.x/2.x.

    ``load_component`` is models._load_component (safetensors only, fp16 variant where that is all);
    ``unet_config`` the config of the UNet already loaded from ``model`` (SDXL's adds text and time ids).
    """
    local = Path(model)
    if local.is_dir() and "text_encoder_2" not in folder_components(model) and not (local / "text_encoder_2").is_dir():
        return {}
    if not local.is_dir() and unet_config.get("addition_embed_type") != "text_time":
        return {}
    return dict(text_encoder_2=load_component(CLIPTextModelWithProjection, model, "text_encoder_2", prefer_half),
                tokenizer_2=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"),
                zero_empty_prompt=force_zeros_for_empty_prompt(model))


