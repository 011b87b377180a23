"""Model folders laid out as users download them, built from the hub's own config files.

``tests/fixtures/<name>/`` holds the exact config files of CompVis/stable-diffusion-v1-4,
stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base, stabilityai/stable-diffusion-2-1 and
openai/clip-vit-base-patch16 (see tests/fixtures/README.md). ``build_folder`` turns one into a
loadable folder: the same files, the same keys, the same block layout, random weights written with
``save_pretrained(safe_serialization=True)``, and only the widths (channels, hidden sizes, layer
counts of the text towers) and the UNet's sample size reduced so that the CPU runs it in seconds.
After saving, each component's ``config.json`` is replaced by the hub file with just those values
changed, so diffusers and transformers read a file with exactly the hub's keys (a v1-4 UNet config
has 19), as they do on a user's machine.

Weight layouts users meet: ``plain`` (``*.safetensors``), ``fp16_only`` (only the hub's fp16
variant files, ``*.fp16.safetensors``), ``both`` (plain and fp16 side by side) and ``bin`` (pickled
``*.bin`` files only, which the toolkit must refuse).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZER_FILES = ROOT / "stylediffusion" / "assets" / "clip_tokenizer"
SD_LAYOUTS = ("sd-v1-4", "sd-v1-5", "sd-2-1-base", "sd-2-1")
IMAGE_ENCODER = "clip-vit-base-patch16"
WEIGHT_LAYOUTS = ("plain", "fp16_only", "both", "bin")


def hub_config(*parts: str) -> dict:
    return json.loads(FIXTURES.joinpath(*parts).read_text())


def _replace_values(config: dict, values: dict) -> dict:
    """``config`` with the given values changed; a key the hub file lacks is an error, not an addition."""
    missing = set(values) - set(config)
    if missing:
        raise KeyError(f"not in the hub config: {sorted(missing)}")
    return {**config, **values}


def text_width(layout: str) -> int:
    """Reduced text width: SD 2.x's text tower (1024) is wider than ViT-B/16 (768), SD 1.x's is not."""
    return 48 if hub_config(layout, "text_encoder", "config.json")["hidden_size"] != 768 else 32


def reduced_configs(layout: str) -> dict[str, dict]:
    unet = hub_config(layout, "unet", "config.json")
    heads_per_block = isinstance(unet["attention_head_dim"], list)  # SD 2.x: 5, 10, 20, 20 heads
    width = text_width(layout)
    text = hub_config(layout, "text_encoder", "config.json")
    vae = hub_config(layout, "vae", "config.json")
    return {
        "unet": _replace_values(unet, {
            "block_out_channels": [40, 40, 80, 80] if heads_per_block else [32, 32, 64, 64],
            "norm_num_groups": 8, "cross_attention_dim": width, "sample_size": unet["sample_size"] // 4}),
        # the hub's VAE configs leave norm_num_groups at its default (32): widths stay multiples of it
        "vae": _replace_values(vae, {"block_out_channels": [32, 32, 32, 32]}),
        "text_encoder": _replace_values(text, {"hidden_size": width, "intermediate_size": 2 * width,
                                               "num_hidden_layers": 2, "num_attention_heads": 4}),
    }


def reduced_image_encoder_config() -> dict:
    config = hub_config(IMAGE_ENCODER, "config.json")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config["text_config"] = _replace_values(config["text_config"], small)
    config["vision_config"] = _replace_values(config["vision_config"], small)
    return _replace_values(config, {"projection_dim": 16})


def _save(model, folder: Path, config: dict, weights: str, config_name: str = "config.json") -> None:
    if weights in ("plain", "both"):
        model.save_pretrained(folder, safe_serialization=True)
    if weights in ("fp16_only", "both"):
        model.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
        model.to(torch.float32)
    if weights == "bin":  # what older hub folders hold; written by hand (transformers 5 writes only safetensors)
        from safetensors.torch import load_file

        model.save_pretrained(folder, safe_serialization=True)
        for path in folder.glob("*.safetensors"):
            name = (
                "pytorch_model.bin" if path.name == "model.safetensors" else path.name.replace(".safetensors", ".bin")
            )
            torch.save(load_file(str(path)), path.with_name(name))
            path.unlink()
    (folder / config_name).write_text(json.dumps(config, indent=2) + "\n")


def _copy_config_files(src: Path, dest: Path) -> None:
    for path in src.rglob("*"):
        if path.is_file():
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def random_unet(config: dict):
    """A UNet with random weights from ``config``, its output scaled down as in ``models.tiny_components``
    (so that a random UNet's inversion stays self-consistent)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    return unet


def build_folder(layout: str, dest: Path, weights: str = "plain", seed: int = 0) -> Path:
    """A diffusers folder laid out as ``layout`` on the hub, with reduced random weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    dest = Path(dest)
    _copy_config_files(FIXTURES / layout, dest)  # model_index, scheduler, tokenizer, feature extractor, safety checker
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_FILES / name, dest / "tokenizer" / name)
    configs = reduced_configs(layout)
    torch.manual_seed(seed)
    _save(random_unet(configs["unet"]), dest / "unet", configs["unet"], weights)
    _save(AutoencoderKL.from_config(configs["vae"]), dest / "vae", configs["vae"], weights)
    text_cfg = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    _save(CLIPTextModel(CLIPTextConfig(**text_cfg)), dest / "text_encoder", configs["text_encoder"], weights)
    return dest


def build_image_encoder(dest: Path, weights: str = "plain", seed: int = 0) -> Path:
    """openai/clip-vit-base-patch16 as on the hub (a whole CLIPModel), reduced in width, 224 px, 16 px patches."""
    from transformers import CLIPConfig, CLIPModel

    dest = Path(dest)
    _copy_config_files(FIXTURES / IMAGE_ENCODER, dest)
    config = reduced_image_encoder_config()
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=config["text_config"], vision_config=config["vision_config"],
                                 projection_dim=config["projection_dim"]))
    _save(model, dest, config, weights)
    return dest
