"""Train the test-bed model on freshly generated scenes (CPU friendly); run from the repository root:

    python -m benchmarks.testbed_training.train --stage clip --out checkpoints/testbed --steps 300
    python -m benchmarks.testbed_training.train --stage vae  --out checkpoints/testbed --steps 600
    python -m benchmarks.testbed_training.train --stage unet --out checkpoints/testbed --steps 3000
    python -m benchmarks.testbed_training.train --stage export --out checkpoints/testbed \
        --model-dir stylediffusion/assets/testbed_model

``--stage all`` runs clip, vae, unet, vae_decoder and export in turn.  ``--resume`` continues a
stage from its checkpoint (``<out>/<stage>.safetensors`` + ``<out>/<stage>.json``,
written atomically every ``--save-every`` steps and at the end); the JSON holds
the step, the numpy generator state, the loss history and the wall time used.
``--minutes`` stops a stage early (checkpointed) after that much wall time.

Stages:

* ``clip``: CLIP text + vision towers trained contrastively on (image, caption)
  pairs (identical captions in a batch count as positives of each other);
* ``vae``: AutoencoderKL, L1 + MSE reconstruction + 1e-6 KL; afterwards the
  latent ``scaling_factor`` = 1 / std of scene latents is stored;
* ``unet``: frozen text tower, epsilon-prediction DDPM loss on scaled VAE
  latents, 10% of captions dropped to "" (classifier-free guidance); with
  ``--attn-weight`` > 0 an auxiliary loss pulls each object's colour and shape
  words' cross-attention (layers at latent/1, /2, /4) inside the object's disc
  dilated by 2 px (the world's exact geometry), and with ``--attn-background`` each
  background word's onto the pixels outside the objects; ``--attn-share-weight`` > 0 asks
  the other way round, that each pixel's attention fall on the words describing it
  (``losses.attention_share_loss``); ``--texture-phase random`` shifts striped and checkered
  backgrounds by a random latent cell; ``--init-from`` takes the frozen
  text encoder and VAE (and the UNet's starting weights) from an exported
  diffusers folder instead of the clip/vae checkpoints;
* ``export``: writes the diffusers folder (vae, text_encoder, tokenizer, unet,
  scheduler, image_encoder, model_index.json, testbed.json).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from stylediffusion.testbed import model as M

from .export import export
from .loop import STAGES
from .stages import train_clip, train_unet, train_vae, train_vae_decoder

# (steps, batch, probability of a two-object scene) of a stage when the flags leave them out
STAGE_DEFAULTS = {
    "clip": (500, 128, 0.5),
    "vae": (1100, 32, 0.5),
    "unet": (2500, 32, 0.3),
    "vae_decoder": (600, 32, 0.5),
}
STAGE_TRAINERS = {"clip": train_clip, "vae": train_vae, "unet": train_unet, "vae_decoder": train_vae_decoder}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES + ("export", "all"), required=True)
    p.add_argument("--out", default="checkpoints/testbed")
    p.add_argument("--model-dir", default=M.DEFAULT_MODEL_DIR)
    p.add_argument("--steps", type=int, default=None, help="total steps of the stage")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--p-two", type=float, default=None, help="probability of a two-object scene")
    p.add_argument("--uncond-p", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--minutes", type=float, default=None, help="wall-time cap per stage")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest when the 2 cores are shared)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", default=None,
                   help="unet / vae_decoder / export: diffusers folder whose text encoder and VAE are used "
                        "(frozen) and whose UNet (or VAE decoder) is the starting point")
    p.add_argument("--attn-weight", type=float, default=0.0,
                   help="unet stage: weight of the cross-attention-inside-the-object loss (0 = off)")
    p.add_argument("--attn-background", action="store_true",
                   help="unet stage with --attn-weight: also pull each background word's attention onto the "
                        "pixels outside the objects")
    p.add_argument("--attn-share-weight", type=float, default=0.0,
                   help="unet stage: weight of the query-side attention loss: each pixel's share of "
                        "cross-attention on the words that describe it (its object's colour and shape, or "
                        "the background's words); 0 = off")
    p.add_argument("--texture-phase", choices=("fixed", "random"), default="fixed",
                   help="unet / vae_decoder: 'random' shifts each striped or checkered training background by a "
                        "random whole latent cell, so the caption names the texture and not its phase (a "
                        "convolutional UNet cannot tell absolute position well enough to draw a fixed one)")
    p.add_argument("--texture-weight", type=int, default=1,
                   help="unet stage: draw striped and checkered backgrounds this many times as often as each "
                        "other background (1 = all six alike)")
    p.add_argument("--object-weight", type=float, default=1.0,
                   help="unet / vae_decoder: weight of the loss on latent cells (pixels) covered by an object "
                        "(mask dilated by 1 px); 1 = unweighted")
    p.add_argument("--text-layers", type=int, default=None,
                   help="unet stage with --init-from: keep only this many transformer layers of the frozen "
                        "text encoder (0: context-free word encodings); export writes that text encoder")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.texture_weight < 1:
        p.error("--texture-weight must be a whole number >= 1")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    stages = STAGES if args.stage == "all" else ((args.stage,) if args.stage != "export" else ())
    user_steps, user_batch, user_p = args.steps, args.batch, args.p_two
    for s in stages:
        d = STAGE_DEFAULTS[s]
        args.steps = user_steps or d[0]
        args.batch = user_batch or d[1]
        args.p_two = d[2] if user_p is None else user_p
        STAGE_TRAINERS[s](args)
    if args.stage in ("export", "all"):
        export(args.out, args.model_dir, args.init_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
