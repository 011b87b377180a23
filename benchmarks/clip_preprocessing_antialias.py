"""What antialiasing (and clamping) in the CLIP image preprocessing changes (docs/method.md).

Ours: bicubic resize with antialias, clamp to [0, 1]. The released code: torchvision Resize on a
tensor (no antialias before torchvision 0.17), no clamp. Compares the preprocessed tensors of the
bundled photographs at SD size (512 -> 224) and the image features of the tiny and test-bed models.

    HF_HUB_OFFLINE=1 python benchmarks/clip_preprocessing_antialias.py
"""
from pathlib import Path

import torch

from stylediffusion.clip_preprocess import clip_pixel_values
from stylediffusion.image_io import load_image
from stylediffusion.models import load_models

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["chelsea.jpg", "astronaut.jpg", "coffee.jpg", "grace_hopper.jpg"]


def features(bundle, pixels):
    enc = bundle.image_encoder
    with torch.no_grad():
        hidden = enc(pixel_values=pixels).last_hidden_state
        norm = getattr(enc, "post_layernorm", None) or enc.vision_model.post_layernorm
        return norm(hidden)


def main():
    torch.set_num_threads(1)
    print("preprocessed tensor, SD input 512 -> CLIP 224 (CLIP-normalised units; x0.27 for [0, 1] pixels)")
    for name in PHOTOS:
        image, _ = load_image(ROOT / "data" / "images" / name, 512)
        image = (image + 1) / 2  # SD input [-1, 1] -> [0, 1]
        ours = clip_pixel_values(image, 224)
        released = clip_pixel_values(image, 224, antialias=False, clamp=False)
        no_aa = clip_pixel_values(image, 224, antialias=False)
        d, dc = (ours - released).abs(), (no_aa - released).abs()
        print(f"  {name:18s} antialias+clamp vs released: max {d.max():.3f} mean {d.mean():.4f};"
              f" clamp alone: max {dc.max():.3f} mean {dc.mean():.5f}")
    for model in ("tiny", "testbed"):
        bundle = load_models(model)
        size = int(bundle.image_encoder.config.image_size)
        image, _ = load_image(ROOT / "data" / "images" / "chelsea.jpg", bundle.image_size)
        image = (image + 1) / 2
        fa = features(bundle, clip_pixel_values(image, size))
        fb = features(bundle, clip_pixel_values(image, size, antialias=False, clamp=False))
        rel = ((fa - fb).norm() / fb.norm()).item()
        print(f"{model}: image {bundle.image_size} -> encoder {size}: features max abs diff "
              f"{(fa - fb).abs().max():.4f}, mean {(fa - fb).abs().mean():.5f}, relative L2 {rel:.4f}")


if __name__ == "__main__":
    main()
