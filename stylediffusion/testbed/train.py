"""Train the test-bed model on freshly generated scenes (CPU friendly).

    python -m stylediffusion.testbed.train --stage clip --out checkpoints/testbed --steps 300
    python -m stylediffusion.testbed.train --stage vae  --out checkpoints/testbed --steps 600
    python -m stylediffusion.testbed.train --stage unet --out checkpoints/testbed --steps 3000
    python -m stylediffusion.testbed.train --stage export --out checkpoints/testbed \
        --model-dir stylediffusion/assets/testbed_model

``--stage all`` runs clip, vae, unet and export in turn.  ``--resume`` continues a
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
  (:func:`attention_share_loss`); ``--texture-phase random`` shifts striped and checkered
  backgrounds by a random latent cell; ``--init-from`` takes the frozen
  text encoder and VAE (and the UNet's starting weights) from an exported
  diffusers folder instead of the clip/vae checkpoints;
* ``export``: writes the diffusers folder (vae, text_encoder, tokenizer, unet,
  scheduler, image_encoder, model_index.json, testbed.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..attention_control import AttentionController

from ..files import atomic_write, atomic_write_text
from . import model as M
from . import world as W

STAGES = ("clip", "vae", "unet", "vae_decoder")


# ----------------------------------------------------------------- checkpoints


def _atomic_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _atomic_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    blob = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(blob, str(tmp)))


def _optim_tensors(opt: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optim(opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(out: str, stage: str, modules: Dict[str, torch.nn.Module], opt, meta: dict) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"model.{name}.{k}"] = v
    tensors.update(_optim_tensors(opt))
    tensors["rng.torch"] = torch.get_rng_state()
    _atomic_safetensors(os.path.join(out, f"{stage}.safetensors"), tensors)
    _atomic_json(os.path.join(out, f"{stage}.json"), meta)


def load_checkpoint(out: str, stage: str, modules: Dict[str, torch.nn.Module], opt=None,
                    restore_rng: bool = True) -> Optional[dict]:
    from safetensors.torch import load_file

    st_path = os.path.join(out, f"{stage}.safetensors")
    js_path = os.path.join(out, f"{stage}.json")
    if not (os.path.exists(st_path) and os.path.exists(js_path)):
        return None
    tensors = load_file(st_path)
    for name, mod in modules.items():
        pre = f"model.{name}."
        sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        mod.load_state_dict(sd)
    if opt is not None:
        _load_optim(opt, tensors)
    if restore_rng and "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    with open(js_path) as f:
        return json.load(f)


def plot_losses(out: str, stage: str, losses: List[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not losses:
        return
    y = np.asarray(losses, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(y, lw=0.6, alpha=0.4, label="step")
    k = max(1, len(y) // 50)
    if len(y) >= k:
        sm = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(sm)) + k - 1, sm, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"testbed {stage}")
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out, f"{stage}_loss.png"), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# --------------------------------------------------------------------- helpers


def tokenize(tok, captions: List[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=M.MAX_LENGTH, truncation=True,
               return_tensors="pt").input_ids


class _Stage:
    """Common loop: resume, lr schedule, tqdm, periodic checkpoint + plot."""

    def __init__(self, args, stage: str, modules: Dict[str, torch.nn.Module], params, lr: float):
        self.args, self.stage, self.modules = args, stage, modules
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if stage == "vae" else 1e-2)
        self.base_lr = lr
        self.meta = dict(stage=stage, step=0, total_steps=args.steps, losses=[], seconds=0.0,
                         batch=args.batch, seed=args.seed, extra={})
        self.rng = np.random.default_rng([args.seed, STAGES.index(stage)])
        torch.manual_seed(args.seed * 10 + STAGES.index(stage))
        if args.resume:
            meta = load_checkpoint(args.out, stage, modules, self.opt)
            if meta is not None:
                self.meta = meta
                self.meta["total_steps"] = args.steps
                self.rng.bit_generator.state = meta["np_rng"]
                print(f"[{stage}] resumed at step {meta['step']}", file=sys.stderr)

    def update(self, loss: torch.Tensor) -> float:
        """One optimiser step on the stage's parameters (gradients clipped at norm 1)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        return loss.item()

    def save(self):
        self.meta["np_rng"] = self.rng.bit_generator.state
        save_checkpoint(self.args.out, self.stage, self.modules, self.opt, self.meta)
        plot_losses(self.args.out, self.stage, self.meta["losses"])

    def run(self, step_fn):
        from tqdm import tqdm

        args = self.args
        start = self.meta["step"]
        t_start = time.time()
        t_prev = t_start
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=self.stage,
                   mininterval=5.0)
        for step in bar:
            for g in self.opt.param_groups:
                g["lr"] = lr_at(step, args.steps, self.base_lr)
            loss = step_fn(step)
            self.meta["losses"].append(float(loss))
            self.meta["step"] = step + 1
            now = time.time()
            self.meta["seconds"] += now - t_prev
            t_prev = now
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if (step + 1) % args.save_every == 0:
                self.save()
            if args.minutes and now - t_start > 60 * args.minutes:
                print(f"[{self.stage}] time limit reached at step {step + 1}", file=sys.stderr)
                break
        self.save()
        return self.meta


# ---------------------------------------------------------------------- stages


def clip_modules():
    te, ve = M.build_text_encoder(), M.build_vision_encoder()
    proj_t = torch.nn.Linear(M.TEXT_WIDTH, M.TEXT_WIDTH, bias=False)
    proj_v = torch.nn.Linear(M.TEXT_WIDTH, M.TEXT_WIDTH, bias=False)
    scale = torch.nn.Module()
    scale.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return {"text": te, "vision": ve, "proj_t": proj_t, "proj_v": proj_v, "scale": scale}


def train_clip(args):
    tok = M.build_tokenizer()
    mods = clip_modules()
    params = [p for m in mods.values() for p in m.parameters()]
    st = _Stage(args, "clip", mods, params, args.lr or 1e-3)

    def step_fn(step):
        imgs, caps = W.sample_batch(st.rng, args.batch, "train", p_two=args.p_two)
        x = M.images_to_tensor(imgs)
        ids = tokenize(tok, caps)
        t = F.normalize(mods["proj_t"](mods["text"](input_ids=ids).pooler_output), dim=-1)
        v = F.normalize(mods["proj_v"](mods["vision"](pixel_values=x).pooler_output), dim=-1)
        logits = mods["scale"].logit_scale.exp().clamp(max=100) * t @ v.T
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean()
                      - (target * logits.log_softmax(0).T).sum(1).mean())
        return st.update(loss)

    return st.run(step_fn)


def train_vae(args):
    vae = M.build_vae()
    st = _Stage(args, "vae", {"vae": vae}, list(vae.parameters()), args.lr or 1e-3)

    def step_fn(step):
        imgs, _ = W.sample_batch(st.rng, args.batch, "train", p_two=args.p_two)
        x = M.images_to_tensor(imgs)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        return st.update(loss)

    meta = st.run(step_fn)
    # latent scale: 1 / std of sampled latents of fresh scenes
    vae.eval()
    rng = np.random.default_rng(12345)
    with torch.no_grad():
        imgs, _ = W.sample_batch(rng, 512, "train")
        z = vae.encode(M.images_to_tensor(imgs)).latent_dist.sample()
        rec = vae.decode(vae.encode(M.images_to_tensor(imgs)).latent_dist.mode()).sample
    mse = ((M.tensor_to_images(rec).astype(np.float64) - imgs.astype(np.float64)) ** 2).mean()
    meta["extra"]["scaling_factor"] = float(1.0 / z.std().item())
    meta["extra"]["latent_mean"] = float(z.mean().item())
    meta["extra"]["train_psnr_db"] = float(10 * math.log10(255 ** 2 / max(mse, 1e-12)))
    st.meta = meta
    st.save()
    print(f"[vae] scaling_factor={meta['extra']['scaling_factor']:.4f} "
          f"psnr={meta['extra']['train_psnr_db']:.2f} dB", file=sys.stderr)
    return meta


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def train_vae_decoder(args):
    """Sharpen the decoder with the encoder frozen (the latent space, hence the
    UNet, is unaffected): L1 + MSE + L1 of image gradients on decode(sample).

    With ``--init-from`` the VAE comes from that exported folder; with ``--object-weight``
    the pixel losses count that much more on the objects' masks dilated by 1 px, where a
    blurred star point or cross arm is lost."""
    if args.init_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(os.path.join(args.init_from, "vae"), use_safetensors=True)
    else:
        vae, _ = load_trained_vae(args.out, with_decoder_finetune=False)
    vae.requires_grad_(False)
    encoder_hash = vae_encoder_sha256(vae)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    st = _Stage(args, "vae_decoder", {"vae": vae}, params, args.lr or 5e-4)
    extra = st.meta["extra"]
    if extra.get("encoder_sha256") not in (None, encoder_hash):
        raise SystemExit(f"error: the VAE encoder in {args.init_from or args.out} differs from the one the run "
                         f"in {args.out} started with; resume with the same VAE")
    extra["encoder_sha256"] = encoder_hash
    extra["object_weight"] = args.object_weight
    _record_setting(st, "texture_phase", args.texture_phase)
    if args.init_from:
        extra["init_from"] = os.path.abspath(args.init_from)

    def step_fn(step):
        scenes = [W.sample_scene(st.rng, "train", p_two=args.p_two, texture_phase=args.texture_phase)
                  for _ in range(args.batch)]
        x = M.images_to_tensor(np.stack([s.image for s in scenes]))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        w = (object_loss_weights(scenes, tuple(x.shape[-2:]), args.object_weight)
             if args.object_weight != 1.0 else None)
        err = rec - x
        loss = weighted_mean(err.abs(), w) + weighted_mean(err ** 2, w) + _grad_l1(rec, x)
        return st.update(loss)

    return st.run(step_fn)


def training_backgrounds(texture_weight: int) -> Tuple[str, ...]:
    """The background names ``sample_scene`` draws from uniformly, with every striped or checkered
    one listed ``texture_weight`` times: textures drawn that many times as often as each other one."""
    if texture_weight < 1:
        raise ValueError("texture_weight must be >= 1")
    return tuple(name for name in W.BACKGROUND_NAMES
                 for _ in range(texture_weight if W.texture_period(name) != (1, 1) else 1))


def _record_setting(st, key: str, value) -> None:
    """``extra[key] = value``, and ``extra[key + "_from_step"]`` lists [step, value] whenever it changes:
    a run may change a setting on resume, and the steps each value covered stay on record."""
    extra = st.meta["extra"]
    if extra.get(key) != value:
        extra.setdefault(f"{key}_from_step", []).append([st.meta["step"], value])
    extra[key] = value


def vae_encoder_sha256(vae) -> str:
    """sha256 of the encoder's weights (encoder + quant_conv): what fixes the latent space."""
    import hashlib

    h = hashlib.sha256()
    sd = vae.state_dict()
    for k in sorted(sd):
        if k.startswith(("encoder.", "quant_conv.")):
            h.update(k.encode())
            h.update(sd[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_trained_text_encoder(out: str):
    mods = clip_modules()
    meta = load_checkpoint(out, "clip", mods, restore_rng=False)
    if meta is None:
        print("[warn] no clip checkpoint: using an untrained text encoder", file=sys.stderr)
    return mods, meta


def load_trained_vae(out: str, with_decoder_finetune: bool = True):
    vae = M.build_vae()
    meta = load_checkpoint(out, "vae", {"vae": vae}, restore_rng=False)
    if meta is None:
        raise SystemExit("train the vae stage first")
    if with_decoder_finetune:
        # encoder weights are identical; the decoder is the sharpened one
        load_checkpoint(out, "vae_decoder", {"vae": vae}, restore_rng=False)
    sf = meta["extra"].get("scaling_factor", 1.0)
    vae.register_to_config(scaling_factor=sf)
    return vae, meta



def _file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def frozen_parts_from_folder(model_dir: str):
    """(text encoder, VAE, UNet, sha256 of their weight files) of an exported diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"), use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae"), use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"), use_safetensors=True)
    # the UNet depends on the text space and the latent space only: a decoder fine-tuned
    # afterwards (stage vae_decoder) keeps both
    hashes = {"text_encoder": _file_sha256(os.path.join(model_dir, "text_encoder/model.safetensors")),
              "vae_encoder": vae_encoder_sha256(vae)}
    return te, vae, unet, hashes


class AttentionMapKeeper(AttentionController):
    """Attention controller (ptp_utils API) that keeps, with gradients, the cross-attention
    softmax maps of every layer whose query grid is the latent's or up to 4x coarser
    (latent/1, /2, /4 = 16, 8, 4 cells a side here); the 2x2 mid block is left out."""

    def __init__(self, max_downscale: float = 4.0):
        self.max_downscale = max_downscale
        self.maps: List[torch.Tensor] = []  # (batch, heads, queries, tokens), forward order

    def needs_maps(self, place, state) -> bool:
        return place.is_cross and place.downscale <= self.max_downscale + 1e-6

    def __call__(self, probs, place, state):
        self.maps.append(probs)
        return probs


def object_word_targets(scene, caption_tokens: Dict[str, List[List[int]]], tok, dilate: float = 2.0,
                        background: bool = False):
    """[(token indices, mask HxW)] for the colour and the shape word of every object (mask: its disc
    dilated by ``dilate`` px) and, with ``background``, for each background word (mask: every pixel
    outside the objects).

    The words are found by position (``a [size] colour shape [and ...] on a <bg> background``),
    so a background word equal to an object's colour ("blue") is never confused with it."""
    from .. import seq_aligner

    from .evaluate import background_word_positions, object_disc, object_word_positions

    def token_indices(word_index):
        key = f"{scene.caption}\t{word_index}"
        if key not in caption_tokens:
            caption_tokens[key] = seq_aligner.word_token_indices(scene.caption, word_index, tok)
        return caption_tokens[key]

    out = []
    for k, obj in enumerate(scene.objects):
        disc = object_disc(obj, scene.size, dilate)
        for word_index in object_word_positions(scene, k):
            out.append((token_indices(word_index), disc))
    if background:
        outside = ~np.any([obj.mask for obj in scene.objects], axis=0)
        for word_index in background_word_positions(scene):
            out.append((token_indices(word_index), outside))
    return out


def attention_inside_loss(maps: List[torch.Tensor], rows: List[int], tokens: List[List[int]],
                          discs: List[np.ndarray], weights: torch.Tensor) -> torch.Tensor:
    """Mean over (layer, word) of weight * (1 - fraction of the word's attention mass inside its disc).

    ``maps``: per layer (batch, heads, queries, tokens) softmax maps on a square query grid;
    ``rows[i]``, ``tokens[i]``, ``discs[i]``: batch row, token positions and pixel mask of word i.
    Each cell's mass counts inside in proportion to the fraction of its pixels in the mask."""
    from .evaluate import cell_fractions

    if not rows:
        return maps[0].new_zeros(())
    n_tok = maps[0].shape[-1]
    select = torch.zeros(len(rows), n_tok)
    for i, idx in enumerate(tokens):
        select[i, idx] = 1.0
    row_index = torch.as_tensor(rows)
    total = maps[0].new_zeros(())
    for probs in maps:
        grid = int(round(math.sqrt(probs.shape[2])))
        word_maps = torch.einsum("nqk,nk->nq", probs.mean(1)[row_index], select)  # (words, queries)
        word_maps = word_maps / word_maps.sum(-1, keepdim=True).clamp_min(1e-12)
        frac = torch.from_numpy(np.stack([cell_fractions(d, (grid, grid)) for d in discs]).reshape(len(rows), -1))
        inside = (word_maps * frac.to(word_maps.dtype)).sum(-1)
        total = total + (weights * (1.0 - inside)).mean()
    return total / len(maps)


def pixel_word_targets(scene, targets, grid: int, n_tokens: int,
                       purity: float = 0.99) -> Tuple[np.ndarray, np.ndarray]:
    """Which tokens each cell of a ``grid`` x ``grid`` query map should read, for the query-side loss.

    ``targets``: :func:`object_word_targets` of ``scene`` (with the background).  A cell at least
    ``purity`` inside one object's mask reads that object's colour and shape words; a cell at least
    ``purity`` outside every object reads the background's words; mixed cells are left out.
    Returns (cells x ``n_tokens`` bool selection, cells bool valid)."""
    from .evaluate import cell_fractions

    n_obj = len(scene.objects)
    select = np.zeros((grid * grid, n_tokens), dtype=bool)
    valid = np.zeros(grid * grid, dtype=bool)
    object_tokens = [sorted({i for idx, _ in targets[2 * k: 2 * k + 2] for i in idx}) for k in range(n_obj)]
    background_tokens = sorted({i for idx, _ in targets[2 * n_obj:] for i in idx})
    regions = [(obj.mask, object_tokens[k]) for k, obj in enumerate(scene.objects)]
    regions.append((targets[-1][1], background_tokens))
    for mask, tokens in regions:
        pure = cell_fractions(mask, (grid, grid)).reshape(-1) >= purity
        select[np.ix_(pure, tokens)] = True
        valid |= pure
    return select, valid


def attention_share_loss(maps: List[torch.Tensor], scenes, rows: List[int], targets: List[list],
                         weights: torch.Tensor) -> torch.Tensor:
    """Mean over (layer, scene, pure cell) of weight * (1 - share of the cell's attention on its words).

    :func:`attention_inside_loss` says where a word's attention goes; this says what a pixel reads:
    a pixel that gives its attention to padding tokens gets little of its own words' values, so the
    caption's background (a few percent of a background pixel's attention otherwise) barely reaches it."""
    if not rows:
        return maps[0].new_zeros(())
    total = maps[0].new_zeros(())
    cells: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}  # layers share a few grids
    for probs in maps:
        grid = int(round(math.sqrt(probs.shape[2])))
        per_scene = []
        for i, (r, scene, tg) in enumerate(zip(rows, scenes, targets)):
            if (i, grid) not in cells:
                cells[i, grid] = pixel_word_targets(scene, tg, grid, probs.shape[-1])
            select, valid = cells[i, grid]
            if not valid.any():
                per_scene.append(probs.new_zeros(()))
                continue
            p = probs[r].mean(0)[torch.from_numpy(valid)]  # (pure cells, tokens)
            share = (p * torch.from_numpy(select[valid]).to(p.dtype)).sum(-1)
            per_scene.append((1.0 - share).mean())
        total = total + (weights * torch.stack(per_scene)).mean()
    return total / len(maps)


def object_loss_weights(scenes, latent_hw, weight: float, dilate: int = 1) -> torch.Tensor:
    """(batch, 1, h, w) weights of the epsilon loss: ``weight`` on latent cells that hold any pixel of
    an object's mask dilated by ``dilate`` px, 1 elsewhere.

    Most of a scene is background, so an unweighted loss spends little of its signal on the few cells
    where one shape differs from another; this puts it back there."""
    masks = np.zeros((len(scenes), 1, scenes[0].size, scenes[0].size), dtype=np.float32)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            masks[i, 0][obj.mask] = 1.0
    m = torch.from_numpy(masks)
    if dilate:
        m = F.max_pool2d(m, 2 * dilate + 1, 1, dilate)
    m = F.adaptive_max_pool2d(m, latent_hw)
    return 1.0 + (weight - 1.0) * m


def weighted_mean(values: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` with per-cell weights (broadcast), normalised by their mean so a loss keeps
    its scale; ``None`` is the plain mean."""
    if weights is None:
        return values.mean()
    return (values * weights).mean() / weights.mean()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return weighted_mean((pred - target) ** 2, weights)


def _hashes_differ(a: Optional[dict], b: dict) -> bool:
    """True when two hash records disagree on a component both name."""
    return bool(a) and any(a[k] != b[k] for k in a.keys() & b.keys())


def train_unet(args):
    tok = M.build_tokenizer()
    unet = M.build_unet()
    init_hashes = None
    if args.init_from:
        te, vae, init_unet, init_hashes = frozen_parts_from_folder(args.init_from)
        unet.load_state_dict(init_unet.state_dict())  # starting point; a resumed checkpoint overrides it
        del init_unet
        if args.text_layers is not None:
            te = M.truncate_text_encoder(te, args.text_layers)
    else:
        clip_mods, _ = load_trained_text_encoder(args.out)
        te = clip_mods["text"]
        vae, _ = load_trained_vae(args.out)
    te.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    sf = vae.config.scaling_factor
    st = _Stage(args, "unet", {"unet": unet}, list(unet.parameters()), args.lr or 1e-3)
    extra = st.meta["extra"]
    if init_hashes is not None:
        # a resumed run must keep the frozen parts it started with (the latent space and text space)
        if _hashes_differ(extra.get("init_hashes"), init_hashes):
            raise SystemExit(f"error: --init-from {args.init_from} holds a different text encoder / VAE than "
                             f"the run in {args.out} started from; resume with the same components")
        if extra.get("text_layers", args.text_layers) != args.text_layers:
            raise SystemExit(f"error: the run in {args.out} uses --text-layers {extra['text_layers']}; "
                             f"resume with the same value")
        extra["text_layers"] = args.text_layers
        extra.setdefault("init_from", os.path.abspath(args.init_from))
        extra["init_hashes"] = init_hashes
        extra["scaling_factor"] = sf
    extra["attn_weight"] = args.attn_weight
    extra["attn_background"] = args.attn_background
    extra["attn_share_weight"] = args.attn_share_weight
    extra["object_weight"] = args.object_weight
    _record_setting(st, "texture_phase", args.texture_phase)
    _record_setting(st, "texture_weight", args.texture_weight)
    backgrounds = training_backgrounds(args.texture_weight)
    st.meta.setdefault("attn_losses", [])
    sched = M.build_scheduler()
    acp = sched.alphas_cumprod.float()
    cache: Dict[str, torch.Tensor] = {}
    caption_tokens: Dict[str, List[List[int]]] = {}
    use_attn = args.attn_weight > 0 or args.attn_share_weight > 0
    if use_attn:
        from ..attention_control import COND, BatchLayout, controlled, install_attention_control

        state = install_attention_control(unet)

    def embed(caps: List[str]) -> torch.Tensor:
        missing = sorted({c for c in caps if c not in cache})
        if missing:
            with torch.no_grad():
                e = te(input_ids=tokenize(tok, missing)).last_hidden_state
            for c, v in zip(missing, e):
                cache[c] = v
            if len(cache) > 50000:
                cache.clear()
        return torch.stack([cache[c] for c in caps])

    def step_fn(step):
        scenes = [W.sample_scene(st.rng, "train", p_two=args.p_two, backgrounds=backgrounds,
                                 texture_phase=args.texture_phase) for _ in range(args.batch)]
        imgs = np.stack([s.image for s in scenes])
        dropped = [st.rng.random() < args.uncond_p for _ in scenes]
        caps = ["" if d else s.caption for s, d in zip(scenes, dropped)]
        with torch.no_grad():
            z = vae.encode(M.images_to_tensor(imgs)).latent_dist.sample() * sf
            emb = embed(caps)
        t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],))
        noise = torch.randn_like(z)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        obj_w = (object_loss_weights(scenes, tuple(z.shape[-2:]), args.object_weight)
                 if args.object_weight != 1.0 else None)
        if not use_attn:
            pred = unet(zt, t, encoder_hidden_states=emb).sample
            return st.update(weighted_mse(pred, noise, obj_w))
        keeper = AttentionMapKeeper()
        state.set(step=0, layout=BatchLayout.single(COND, len(caps)), latent_hw=tuple(zt.shape[-2:]))
        with controlled(state, keeper):
            pred = unet(zt, t, encoder_hidden_states=emb).sample
        eps_loss = weighted_mse(pred, noise, obj_w)
        rows, tokens, discs = [], [], []
        scene_rows, scene_targets = [], []
        for b, (scene, d) in enumerate(zip(scenes, dropped)):
            if d:
                continue
            targets = object_word_targets(scene, caption_tokens, tok,
                                          background=args.attn_background or args.attn_share_weight > 0)
            scene_rows.append(b)
            scene_targets.append(targets)
            if not args.attn_background:
                targets = targets[:2 * len(scene.objects)]
            for idx, disc in targets:
                rows.append(b)
                tokens.append(idx)
                discs.append(disc)
        # weight by the signal's share of the noisy latent: at t near T the object's place is not
        # in z_t yet, so asking the maps to find it there would be noise in the loss
        signal = a.view(-1).sqrt()
        loss = eps_loss
        if args.attn_weight > 0:
            weights = signal[torch.as_tensor(rows, dtype=torch.long)] if rows else None
            attn_loss = attention_inside_loss(keeper.maps, rows, tokens, discs, weights)
            st.meta["attn_losses"].append(attn_loss.item())
            loss = loss + args.attn_weight * attn_loss
        if args.attn_share_weight > 0:
            share_loss = attention_share_loss(keeper.maps, [scenes[b] for b in scene_rows], scene_rows,
                                              scene_targets, signal[torch.as_tensor(scene_rows, dtype=torch.long)])
            st.meta.setdefault("attn_share_losses", []).append(share_loss.item())
            loss = loss + args.attn_share_weight * share_loss
        st.update(loss)
        return float(eps_loss.detach())

    return st.run(step_fn)


# ---------------------------------------------------------------------- export


def export(out: str, model_dir: str, init_from: Optional[str] = None) -> None:
    import diffusers
    from transformers import CLIPVisionModel

    os.makedirs(model_dir, exist_ok=True)
    if init_from is None:
        for stage in ("unet", "vae_decoder"):
            path = os.path.join(out, f"{stage}.json")
            if os.path.exists(path):
                with open(path) as f:
                    init_from = init_from or json.load(f).get("extra", {}).get("init_from")
    if init_from:
        return export_from_init(out, model_dir, init_from)
    clip_mods, clip_meta = load_trained_text_encoder(out)
    vae, vae_meta = load_trained_vae(out)
    dec_meta = None
    if os.path.exists(os.path.join(out, "vae_decoder.json")):
        with open(os.path.join(out, "vae_decoder.json")) as f:
            dec_meta = json.load(f)
    unet = M.build_unet()
    unet_meta = load_checkpoint(out, "unet", {"unet": unet}, restore_rng=False)
    if unet_meta is None:
        print("[warn] no unet checkpoint: exporting an untrained unet", file=sys.stderr)
    vae.save_pretrained(os.path.join(model_dir, "vae"))
    clip_mods["text"].save_pretrained(os.path.join(model_dir, "text_encoder"))
    vision: CLIPVisionModel = clip_mods["vision"]
    vision.save_pretrained(os.path.join(model_dir, "image_encoder"))
    M.build_tokenizer().save_pretrained(os.path.join(model_dir, "tokenizer"))
    # the slow-tokenizer files too, for transformers versions that want them
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(M.TOKENIZER_DIR, name), os.path.join(model_dir, "tokenizer", name))
    unet.save_pretrained(os.path.join(model_dir, "unet"))
    M.build_scheduler().save_pretrained(os.path.join(model_dir, "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "image_encoder": ["transformers", "CLIPVisionModel"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    _atomic_json(os.path.join(model_dir, "model_index.json"), index)

    def summary(meta):
        if not meta:
            return None
        losses = meta.get("losses", [])
        tail = losses[-50:]
        return dict(steps=meta["step"], batch=meta.get("batch"), seconds=round(meta["seconds"], 1),
                    final_loss=float(np.mean(tail)) if tail else None, extra=meta.get("extra", {}))

    info = {
        "description": "StyleDiffusion test bed: tiny SD-shaped model trained on the synthetic "
                       "shapes world (stylediffusion.testbed.world); see docs/testbed.md",
        "world": {
            "image_size": M.IMAGE_SIZE,
            "latent_size": M.LATENT_SIZE,
            "colours": W.OBJECT_COLOURS,
            "shapes": list(W.SHAPES),
            "sizes": {str(k): v for k, v in W.SIZES.items()},
            "backgrounds": {k: list(v) for k, v in W.BACKGROUNDS.items()},
            "heldout_combos": [list(c) for c in W.HELDOUT_COMBO_LIST],
            "caption_examples": ["a red circle on a striped gray background",
                                 "a small green square and a yellow star on a blue background"],
        },
        "training": {"clip": summary(clip_meta), "vae": summary(vae_meta),
                     "vae_decoder_finetune": summary(dec_meta), "unet": summary(unet_meta),
                     "hardware": "2-core CPU (shared), torch %s" % torch.__version__},
    }
    _write_model_info(out, model_dir, info)


def _write_model_info(out: str, model_dir: str, info: dict) -> None:
    """testbed.json of an exported model, with the run's evaluation when there is one."""
    ev = os.path.join(out, "eval.json")
    if os.path.exists(ev):
        with open(ev) as f:
            info["evaluation"] = json.load(f)
    _atomic_json(os.path.join(model_dir, "testbed.json"), info)
    print(f"exported to {model_dir}", file=sys.stderr)


def _drop_local_path(cfg_path: str) -> None:
    """from_pretrained records where a component was read from; a shipped config names no local path."""
    if not os.path.exists(cfg_path):
        return
    with open(cfg_path) as f:
        cfg = json.load(f)
    if "_name_or_path" in cfg:
        cfg.pop("_name_or_path")
        _atomic_json(cfg_path, cfg)


def export_from_init(out: str, model_dir: str, init_from: str) -> None:
    """Export what a run started from an exported folder trained: the UNet and/or the VAE decoder
    come from ``out`` (``unet``, ``vae_decoder`` checkpoints), every other component (text and image
    encoders, VAE encoder, tokenizer, scheduler) is copied unchanged from ``init_from``.  The text
    encoder and the VAE encoder must be the ones the run trained against (hash-checked)."""
    import shutil

    from diffusers import AutoencoderKL

    unet = M.build_unet()
    meta = load_checkpoint(out, "unet", {"unet": unet}, restore_rng=False)
    vae = AutoencoderKL.from_pretrained(os.path.join(init_from, "vae"), use_safetensors=True)
    start_hashes = {"text_encoder": _file_sha256(os.path.join(init_from, "text_encoder/model.safetensors")),
                    "vae_encoder": vae_encoder_sha256(vae)}
    dec_meta = load_checkpoint(out, "vae_decoder", {"vae": vae}, restore_rng=False)
    if meta is None and dec_meta is None:
        raise SystemExit(f"error: no unet or vae_decoder checkpoint in {out}")
    if meta is not None and _hashes_differ(meta["extra"].get("init_hashes"), start_hashes):
        raise SystemExit(f"error: the text encoder or VAE encoder in {init_from} is not the one the UNet "
                         f"in {out} was trained with")
    if dec_meta is not None and dec_meta["extra"].get("encoder_sha256") not in (None, start_hashes["vae_encoder"]):
        raise SystemExit(f"error: the VAE encoder in {init_from} is not the one the decoder in {out} was "
                         f"trained with")
    same = os.path.abspath(init_from) == os.path.abspath(model_dir)
    if not same:
        os.makedirs(model_dir, exist_ok=True)
        for sub in ("text_encoder", "vae", "image_encoder", "tokenizer", "scheduler", "unet"):
            dst = os.path.join(model_dir, sub)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            shutil.copytree(os.path.join(init_from, sub), dst)
            _drop_local_path(os.path.join(dst, "config.json"))
        shutil.copyfile(os.path.join(init_from, "model_index.json"), os.path.join(model_dir, "model_index.json"))
    if meta is not None:
        unet.save_pretrained(os.path.join(model_dir, "unet"))
        if meta["extra"].get("text_layers") is not None:
            from transformers import CLIPTextModel

            te = CLIPTextModel.from_pretrained(os.path.join(init_from, "text_encoder"), use_safetensors=True)
            te = M.truncate_text_encoder(te, meta["extra"]["text_layers"])
            te.save_pretrained(os.path.join(model_dir, "text_encoder"))
    if dec_meta is not None:
        vae.save_pretrained(os.path.join(model_dir, "vae"))
        _drop_local_path(os.path.join(model_dir, "vae", "config.json"))
    info_path = os.path.join(init_from, "testbed.json")
    info = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    info.pop("evaluation", None)  # the starting model's numbers do not describe this one
    training = info.setdefault("training", {})
    if meta is not None:
        losses, attn = meta.get("losses", []), meta.get("attn_losses", [])
        if training.get("unet") and "unet_start" not in training:
            training["unet_start"] = training["unet"]  # what the starting UNet had been trained with
        training["unet"] = dict(
            steps=meta["step"], batch=meta.get("batch"), seconds=round(meta["seconds"], 1),
            final_loss=float(np.mean(losses[-50:])) if losses else None,
            final_attn_loss=float(np.mean(attn[-50:])) if attn else None,
            init_from="the previous test-bed model (same text encoder and VAE encoder)", extra={
                k: v for k, v in meta["extra"].items() if k not in ("init_from", "init_hashes")})
    if dec_meta is not None:
        losses = dec_meta.get("losses", [])
        training.setdefault("vae_decoder_finetunes", []).append(dict(
            steps=dec_meta["step"], batch=dec_meta.get("batch"), seconds=round(dec_meta["seconds"], 1),
            final_loss=float(np.mean(losses[-50:])) if losses else None,
            object_weight=dec_meta["extra"].get("object_weight"),
            texture_phase=dec_meta["extra"].get("texture_phase", "fixed")))
    _write_model_info(out, model_dir, info)


# ------------------------------------------------------------------------ main


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    if args.texture_weight < 1:
        p.error("--texture-weight must be a whole number >= 1")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    defaults = {"clip": (500, 128, 0.5), "vae": (1100, 32, 0.5), "unet": (2500, 32, 0.3),
                "vae_decoder": (600, 32, 0.5)}
    stages = STAGES if args.stage == "all" else ((args.stage,) if args.stage != "export" else ())
    user_steps, user_batch, user_p = args.steps, args.batch, args.p_two
    for s in stages:
        d = defaults[s]
        args.steps = user_steps or d[0]
        args.batch = user_batch or d[1]
        args.p_two = d[2] if user_p is None else user_p
        {"clip": train_clip, "vae": train_vae, "unet": train_unet, "vae_decoder": train_vae_decoder}[s](args)
    if args.stage in ("export", "all"):
        export(args.out, args.model_dir, args.init_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
