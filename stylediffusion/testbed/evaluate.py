"""Measure what the test-bed model learnt.

    python -m stylediffusion.testbed.evaluate --model-dir stylediffusion/assets/testbed_model \
        --n 60 --out checkpoints/testbed

Two checks:

* **VAE reconstruction**: PSNR (dB) of decode(encode(x).mode()) against ``x`` for
  fresh held-out scenes (one and two objects, all backgrounds).
* **Generation**: single-object captions, drawn from the held-out (colour,
  shape) combinations (and, for reference, from training combinations), are
  sampled with DDIM (30 steps, guidance 7.5).  A generated image has no layout,
  so it is scored with :func:`analyser.analyse_free`: the foreground is what
  differs clearly from the exact rendering of the background named in the
  caption; the largest foreground component must have the caption's colour
  (nearest palette colour of its median) *and* shape (best template IoU).  An
  image with no foreground counts as wrong.

Results go to ``<out>/eval.json`` (and a sample grid ``<out>/eval_samples.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from . import analyser as A
from . import model as M
from . import world as W


def load_components(model_dir: str):
    """The model through the project's own loader (the same path as ``--model``)."""
    from ..models import load_models

    return load_models(model_dir)


@torch.no_grad()
def generate(bundle, captions: Sequence[str], seed: int = 0, steps: int = 30, guidance: float = 7.5,
             batch: int = 32) -> np.ndarray:
    """Guided DDIM sampling (the core's ``guided_sampling``) from seeded noise; returns uint8 (N,H,W,3)."""
    from ..ddim import DDIMSchedule
    from ..encoders import decode_latent, encode_prompts
    from ..sampling import guided_sampling

    schedule = DDIMSchedule(bundle.scheduler, steps)
    side, channels = bundle.unet.config.sample_size, bundle.unet.config.in_channels
    uncond = encode_prompts(bundle, [""])
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(captions), batch):
        caps = list(captions[i: i + batch])
        z = torch.randn((len(caps), channels, side, side), generator=g)
        latents = guided_sampling(bundle, schedule, z, encode_prompts(bundle, caps), uncond, guidance)
        out.append(M.tensor_to_images(decode_latent(bundle, latents)))
    return np.concatenate(out)


@torch.no_grad()
def vae_psnr(bundle, n: int = 256, seed: int = 1, split: str = "heldout") -> Dict[str, float]:
    rng = np.random.default_rng(seed)
    imgs, _ = W.sample_batch(rng, n, split)
    vae = bundle.vae
    recs = []
    for i in range(0, n, 64):
        x = M.images_to_tensor(imgs[i: i + 64])
        recs.append(M.tensor_to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    rec = np.concatenate(recs).astype(np.float64)
    per = [A.psnr(r, x) for r, x in zip(rec, imgs)]
    mse = float(np.mean((rec - imgs.astype(np.float64)) ** 2))
    return {"psnr_db": 10 * math.log10(255 ** 2 / max(mse, 1e-12)),
            "median_image_psnr_db": float(np.median(per)), "n": n}


def single_object_captions(rng: np.random.Generator, n: int, split: str,
                           backgrounds: Optional[Sequence[str]] = None):
    """``n`` (caption, colour, shape, background) of single-object scenes."""
    bgs = tuple(backgrounds) if backgrounds else W.BACKGROUND_NAMES
    combos = W.HELDOUT_COMBO_LIST if split == "heldout" else W.TRAIN_COMBOS
    items = []
    for i in range(n):
        colour, shape = combos[i % len(combos)] if split == "heldout" else combos[int(rng.integers(len(combos)))]
        size = W.SIZE_WORDS[int(rng.integers(len(W.SIZE_WORDS)))]
        bg = bgs[int(rng.integers(len(bgs)))]
        words = ["a"] + ([size] if size else []) + [colour, shape]
        items.append((" ".join(words) + f" on a {bg} background", colour, shape, bg))
    return items


def score(images: np.ndarray, items) -> Dict[str, object]:
    rows = []
    for img, (cap, colour, shape, bg) in zip(images, items):
        an = A.analyse_free(img, bg)
        if an.regions:
            r = an.regions[0]
            rows.append(dict(caption=cap, colour=r.colour, shape=r.shape, iou=round(r.shape_iou, 3),
                             colour_ok=r.colour == colour, shape_ok=r.shape == shape,
                             n_regions=len(an.regions), bg_psnr=round(an.background_psnr, 2)))
        else:
            rows.append(dict(caption=cap, colour=None, shape=None, iou=0.0, colour_ok=False,
                             shape_ok=False, n_regions=0, bg_psnr=round(an.background_psnr, 2)))
    n = max(1, len(rows))
    res = {
        "n": len(rows),
        "colour_and_shape_acc": sum(r["colour_ok"] and r["shape_ok"] for r in rows) / n,
        "colour_acc": sum(r["colour_ok"] for r in rows) / n,
        "shape_acc": sum(r["shape_ok"] for r in rows) / n,
        "no_object": sum(r["n_regions"] == 0 for r in rows) / n,
    }
    by_bg = {}
    for r, it in zip(rows, items):
        kind = W.BACKGROUNDS[it[3]][0]
        d = by_bg.setdefault(kind, [0, 0, 0])
        d[0] += 1
        d[1] += r["colour_ok"]
        d[2] += r["colour_ok"] and r["shape_ok"]
    res["by_background_kind"] = {k: {"n": v[0], "colour_acc": v[1] / v[0], "colour_and_shape_acc": v[2] / v[0]}
                                 for k, v in by_bg.items()}
    res["rows"] = rows
    return res


def save_grid(path: str, images: np.ndarray, cols: int = 10, scale: int = 4) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def evaluate(model_dir: str, n: int = 60, seed: int = 0, steps: int = 30, guidance: float = 7.5,
             out: Optional[str] = None, train_reference: bool = True) -> Dict[str, object]:
    t0 = time.time()
    bundle = load_components(model_dir)
    res: Dict[str, object] = {"model_dir": model_dir, "ddim_steps": steps, "guidance": guidance, "seed": seed}
    res["vae_heldout"] = vae_psnr(bundle)
    rng = np.random.default_rng(seed)
    held = single_object_captions(rng, n, "heldout")
    imgs = generate(bundle, [c for c, *_ in held], seed=seed, steps=steps, guidance=guidance)
    res["generation_heldout"] = score(imgs, held)
    grids = [imgs[:30]]
    if train_reference:
        tr = single_object_captions(rng, n, "train")
        timgs = generate(bundle, [c for c, *_ in tr], seed=seed + 1, steps=steps, guidance=guidance)
        res["generation_train_combos"] = score(timgs, tr)
        grids.append(timgs[:30])
    res["seconds"] = round(time.time() - t0, 1)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
        save_grid(os.path.join(out, "eval_samples.png"), np.concatenate(grids))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=M.DEFAULT_MODEL_DIR)
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-train-reference", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = evaluate(args.model_dir, args.n, args.seed, args.steps, args.guidance, args.out,
                   not args.no_train_reference)
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if isinstance(v, dict) else v)
               for k, v in res.items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
