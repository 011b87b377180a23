"""stabilityai/stable-diffusion-xl-base-1.0 laid out as users download it, with reduced random weights.

``tests/fixtures/sdxl-base-1.0/`` holds the hub folder's config files (tests/fixtures/README.md says
which are exact copies and which are reconstructed). ``build_sdxl_folder`` writes a loadable folder
from them as ``layouts.build_folder`` does for SD 1.x/2.x: the same files and keys, the UNet's block
layout kept (DownBlock2D + two CrossAttnDownBlock2D, 1/2/10 transformer blocks per level, 5/10/20
heads: SDXL's 70 transformer blocks), only widths, the text towers' depths, the time-id embedding
width and the sample size reduced (8: 64 px images, attention at 4² and 2²), and the VAE's
``scaling_factor`` set so that the random VAE's latents have unit variance, as the hub's 0.13025
does for the trained one (models.tiny_components does the same).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from layouts import FIXTURES, TOKENIZER_FILES, _copy_config_files, _replace_values, _save, hub_config, random_unet

SDXL_LAYOUT = "sdxl-base-1.0"
TEXT_WIDTHS = (16, 32)  # text_encoder (CLIP ViT-L, 768 on the hub), text_encoder_2 (bigG, 1280)
TIME_EMBED = 8  # addition_time_embed_dim (256 on the hub)


def reduced_sdxl_configs() -> dict[str, dict]:
    unet = hub_config(SDXL_LAYOUT, "unet", "config.json")
    pooled = TEXT_WIDTHS[1]
    small_text = dict(intermediate_size=0, num_hidden_layers=2, num_attention_heads=4)
    return {
        "unet": _replace_values(unet, {
            "block_out_channels": [40, 80, 160], "norm_num_groups": 8, "cross_attention_dim": sum(TEXT_WIDTHS),
            "addition_time_embed_dim": TIME_EMBED, "projection_class_embeddings_input_dim": pooled + 6 * TIME_EMBED,
            "sample_size": unet["sample_size"] // 16}),
        "vae": _replace_values(hub_config(SDXL_LAYOUT, "vae", "config.json"), {"block_out_channels": [32, 32, 32, 32]}),
        "text_encoder": _replace_values(hub_config(SDXL_LAYOUT, "text_encoder", "config.json"),
                                        {**small_text, "hidden_size": TEXT_WIDTHS[0],
                                         "intermediate_size": 2 * TEXT_WIDTHS[0]}),
        "text_encoder_2": _replace_values(hub_config(SDXL_LAYOUT, "text_encoder_2", "config.json"),
                                          {**small_text, "hidden_size": TEXT_WIDTHS[1],
                                           "intermediate_size": 2 * TEXT_WIDTHS[1], "projection_dim": pooled}),
    }


def build_sdxl_folder(dest: Path, weights: str = "plain", seed: int = 0) -> Path:
    """An SDXL base 1.0 folder as on the hub, with reduced random weights (see the module docstring)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dest = Path(dest)
    _copy_config_files(FIXTURES / SDXL_LAYOUT, dest)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER_FILES / name, dest / sub / name)
    configs = reduced_sdxl_configs()
    torch.manual_seed(seed)
    _save(random_unet(configs["unet"]), dest / "unet", configs["unet"], weights)
    vae = AutoencoderKL.from_config(configs["vae"])
    with torch.no_grad():  # as in models.tiny_components: a random VAE's latents to unit variance (what the
        # hub's 0.13025 does for the trained VAE), so DDIM meets latents of the size it does on real images
        probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        configs["vae"]["scaling_factor"] = round(float(1.0 / vae.encode(probe).latent_dist.mean.std()), 5)
    vae.register_to_config(scaling_factor=configs["vae"]["scaling_factor"])
    _save(vae, dest / "vae", configs["vae"], weights)
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        cfg = {k: v for k, v in configs[name].items() if not k.startswith("_")}
        _save(cls(CLIPTextConfig(**cfg)), dest / name, configs[name], weights)
    return dest
