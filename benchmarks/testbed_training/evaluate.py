"""Measure what the test-bed model learnt.

    python -m benchmarks.testbed_training.evaluate --model-dir stylediffusion/assets/testbed_model \
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

With ``--attention-n N`` also the attention check (:func:`attention_localisation`): for
N single-object scenes, the share of the colour and shape words' mid-low cross-attention
mass (DDIM inversion of the rendered scene, averaged over heads and steps) inside the
object's disc dilated by 2 px, per layer and per word.

Results go to ``<out>/eval.json`` (and a sample grid ``<out>/eval_samples.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from stylediffusion import seq_aligner
from stylediffusion.attention_control import AttentionController, BatchLayout, controlled, install_attention_control
from stylediffusion.ddim import DDIMSchedule
from stylediffusion.encoders import decode_latent, encode_latent, encode_prompts
from stylediffusion.files import atomic_write_text
from stylediffusion.image_io import save_atomic
from stylediffusion.models import load_models
from stylediffusion.sampling import guided_sampling, predict
from stylediffusion.testbed import analyser as A
from stylediffusion.testbed import model as M
from stylediffusion.testbed import world as W


def load_components(model_dir: str):
    """The model through the project's own loader (the same path as ``--model``)."""
    return load_models(model_dir)


@torch.no_grad()
def generate(bundle, captions: Sequence[str], seed: int = 0, steps: int = 30, guidance: float = 7.5,
             batch: int = 32) -> np.ndarray:
    """Guided DDIM sampling (the core's ``guided_sampling``) from seeded noise; returns uint8 (N,H,W,3)."""
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


# ------------------------------------------------------------ attention localisation


def object_disc(obj: W.SceneObject, image_size: int = M.IMAGE_SIZE, dilate: float = 2.0) -> np.ndarray:
    """Bool (H, W): pixel centres within ``radius + dilate`` of the object's centre (every shape of the
    world fits in its radius-``radius`` disc)."""
    cx, cy = obj.center
    return W.shape_mask("circle", cx, cy, obj.radius + dilate, image_size, image_size)


def object_word_positions(scene: W.Scene, k: int) -> Tuple[int, int]:
    """Word indices (into ``caption.split()``) of object ``k``'s colour and shape words.

    Captions are ``"<phrase> [and <phrase>] on a <bg> background"`` with phrase ``a [size] colour
    shape``, so the words are found by position, not by name (a "blue" background is not a blue object)."""
    start = 0
    for obj in scene.objects[:k]:
        start += len(obj.phrase().split()) + 1  # + "and"
    n = len(scene.objects[k].phrase().split())
    words = scene.caption.split()
    colour_at, shape_at = start + n - 2, start + n - 1
    if words[colour_at] != scene.objects[k].colour or words[shape_at] != scene.objects[k].shape:
        raise ValueError(f"caption {scene.caption!r} does not name object {k} where expected")
    return colour_at, shape_at


def background_word_positions(scene: W.Scene) -> List[int]:
    """Word indices (into ``caption.split()``) of the background's words: "black", or "striped gray"
    in ``... on a striped gray background`` (found by position, like the objects' words)."""
    words = scene.caption.split()
    on_at = sum(len(obj.phrase().split()) for obj in scene.objects) + len(scene.objects) - 1
    if words[on_at:on_at + 2] != ["on", "a"] or words[-1] != "background":
        raise ValueError(f"caption {scene.caption!r} does not name its background where expected")
    return list(range(on_at + 2, len(words) - 1))


def cell_fractions(mask: np.ndarray, grid_hw: Tuple[int, int]) -> np.ndarray:
    """Fraction of each attention cell's pixels that lie in ``mask`` (H, W divisible by the grid)."""
    h, w = mask.shape
    gh, gw = grid_hw
    if h % gh or w % gw:
        raise ValueError(f"a {h}x{w} mask does not tile into a {gh}x{gw} grid")
    return mask.reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3))


def attention_mass_inside(word_map, mask: np.ndarray) -> float:
    """Fraction of a word's attention mass that falls inside ``mask``.

    ``word_map``: non-negative (gh, gw) map of one word (cells of the query grid).  Each cell's
    mass is spread evenly over the pixels it covers (nearest upsampling, which keeps the mass), so
    a cell half inside the mask contributes half its mass."""
    m = np.asarray(word_map, dtype=np.float64)
    total = m.sum()
    if total <= 0:
        return 0.0
    return float((m * cell_fractions(mask, m.shape)).sum() / total)


class _NamedCrossRecorder(AttentionController):
    """Mid-low cross-attention maps of the conditional rows, per layer name, summed over steps."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def needs_maps(self, place, state):
        return place.is_cross and place.is_mid_low

    def __call__(self, probs, place, state):
        m = probs.detach().float().mean(1)  # (batch, queries, tokens), heads averaged
        self.sums[place.name] = self.sums.get(place.name, 0) + m
        self.counts[place.name] = self.counts.get(place.name, 0) + 1
        return probs


@torch.no_grad()
def attention_localisation(bundle, n: int = 50, seed: int = 0, steps: int = 30, split: str = "heldout",
                           dilate: float = 2.0, batch: int = 25) -> Dict[str, object]:
    """How much of the object's colour and shape words' mid-low cross-attention lands on the object.

    For ``n`` single-object scenes of ``split`` the rendered image is DDIM-inverted with its caption
    (``steps`` steps, conditional branch, as StyleDiffusion records its reference maps A* and as
    ``attention_maps.png`` shows them); each mid-low (latent/4) layer's map, averaged over heads and
    steps, is scored with :func:`attention_mass_inside` against the object's disc dilated by ``dilate``
    px.  Reported per layer and per word, and for the layers' mean map (the figure's view)."""
    rng = np.random.default_rng(seed)
    scenes = [W.sample_scene(rng, split, n_objects=1) for _ in range(n)]
    schedule = DDIMSchedule(bundle.scheduler, steps)
    state = install_attention_control(bundle.unet)
    scores: Dict[str, Dict[str, list]] = {}
    grid = None
    for i in range(0, n, batch):
        chunk = scenes[i: i + batch]
        x = M.images_to_tensor(np.stack([s.image for s in chunk]))
        z = encode_latent(bundle, x)
        cond = encode_prompts(bundle, [s.caption for s in chunk])
        rec = _NamedCrossRecorder()
        with controlled(state, rec):
            for step in range(steps - 1, -1, -1):
                eps = predict(bundle, schedule, z, step, cond, BatchLayout.single(num_prompts=len(chunk)))
                z = schedule.invert_step(eps, z, step)
        layer_maps = {name: rec.sums[name] / rec.counts[name] for name in rec.sums}
        layer_maps["mean of mid-low layers"] = sum(layer_maps.values()) / len(layer_maps)
        for b, scene in enumerate(chunk):
            disc = object_disc(scene.objects[0], scene.size, dilate)
            for word, pos in zip(("colour", "shape"), object_word_positions(scene, 0)):
                idx = seq_aligner.word_token_indices(scene.caption, pos, bundle.tokenizer)
                for name, maps in layer_maps.items():
                    q = maps.shape[1]
                    grid = int(round(math.sqrt(q)))
                    wm = maps[b][:, idx].sum(-1).reshape(grid, grid).cpu().numpy()
                    scores.setdefault(name.removesuffix(".processor"), {}).setdefault(word, []).append(
                        attention_mass_inside(wm, disc))
    discs = [object_disc(s.objects[0], s.size, dilate) for s in scenes]
    # reference points: a map spread evenly over the image scores the disc's share of the image;
    # the best a (grid x grid) map can score is all its mass on the cell most inside the disc
    out: Dict[str, object] = {"n": n, "split": split, "ddim_steps": steps, "dilate_px": dilate, "grid": grid,
                              "disc_share_of_image": float(np.mean([d.mean() for d in discs])),
                              "best_possible": float(np.mean([cell_fractions(d, (grid, grid)).max() for d in discs])),
                              "layers": {}}
    for name, per_word in scores.items():
        row = {w: float(np.mean(v)) for w, v in per_word.items()}
        row["both"] = float(np.mean([x for v in per_word.values() for x in v]))
        out["layers"][name] = row
    return out


def save_grid(path: str, images: np.ndarray, cols: int = 10, scale: int = 4) -> None:
    n, h, w, _ = images.shape
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = im
    big = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    save_atomic(big, Path(path))


def evaluate(model_dir: str, n: int = 60, seed: int = 0, steps: int = 30, guidance: float = 7.5,
             out: Optional[str] = None, train_reference: bool = True, attention_n: int = 0,
             generation: bool = True) -> Dict[str, object]:
    t0 = time.time()
    bundle = load_components(model_dir)
    res: Dict[str, object] = {"model_dir": model_dir, "ddim_steps": steps, "guidance": guidance, "seed": seed}
    if attention_n:
        res["attention_heldout"] = attention_localisation(bundle, attention_n, seed, steps, "heldout")
        if train_reference:
            res["attention_train_combos"] = attention_localisation(bundle, attention_n, seed + 1, steps, "train")
    if not generation:
        res["seconds"] = round(time.time() - t0, 1)
        _write_eval(out, res, None)
        return res
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
    _write_eval(out, res, np.concatenate(grids))
    return res


def _write_eval(out: Optional[str], res: Dict[str, object], grid_images: Optional[np.ndarray]) -> None:
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "eval.json"), json.dumps(res, indent=1))
    if grid_images is not None:
        save_grid(os.path.join(out, "eval_samples.png"), grid_images)


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
    p.add_argument("--attention-n", type=int, default=0,
                   help="also measure where the colour/shape words attend, on this many single-object scenes")
    p.add_argument("--no-generation", action="store_true", help="skip the VAE and generation checks")
    args = p.parse_args(argv)
    if args.n < 1 or args.attention_n < 0 or args.steps < 1:
        print("error: --n and --steps must be >= 1 and --attention-n >= 0", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.join(args.model_dir, "unet")):
        print(f"error: {args.model_dir} is not a test-bed model folder (no unet/)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    res = evaluate(args.model_dir, args.n, args.seed, args.steps, args.guidance, args.out,
                   not args.no_train_reference, args.attention_n, not args.no_generation)
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if isinstance(v, dict) else v)
               for k, v in res.items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
