"""The training stages: ``clip`` (text + vision towers, contrastive), ``vae`` (AutoencoderKL),
``vae_decoder`` (decoder fine-tune, encoder frozen) and ``unet`` (epsilon prediction, optionally with
cross-attention losses).  Each draws fresh scenes of the world every step and runs in
:class:`~.loop.TrainingStage`."""

from __future__ import annotations

import math
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from stylediffusion.attention_control import COND, BatchLayout, controlled, install_attention_control
from stylediffusion.testbed import model as M
from stylediffusion.testbed import world as W

from .components import (
    clip_modules,
    frozen_parts_from_folder,
    hashes_differ,
    load_trained_text_encoder,
    load_trained_vae,
    vae_encoder_sha256,
)
from .loop import TrainingStage, tokenize
from .losses import (
    AttentionMapKeeper,
    attention_inside_loss,
    attention_share_loss,
    image_gradient_l1,
    object_loss_weights,
    object_word_targets,
    weighted_mean,
    weighted_mse,
)

# ------------------------------------------------------------------------ clip


def train_clip(args):
    tok = M.build_tokenizer()
    mods = clip_modules()
    params = [p for m in mods.values() for p in m.parameters()]
    st = TrainingStage(args, "clip", mods, params, args.lr or 1e-3)

    def step_fn(step):
        imgs, caps = W.sample_batch(st.rng, args.batch, "train", p_two=args.p_two)
        x = M.images_to_tensor(imgs)
        ids = tokenize(tok, caps)
        t = F.normalize(mods["proj_t"](mods["text"](input_ids=ids).pooler_output), dim=-1)
        v = F.normalize(mods["proj_v"](mods["vision"](pixel_values=x).pooler_output), dim=-1)
        logits = mods["scale"].logit_scale.exp().clamp(max=100) * t @ v.T
        # identical captions in a batch are positives of each other
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean()
                      - (target * logits.log_softmax(0).T).sum(1).mean())
        return st.update(loss)

    return st.run(step_fn)


# ------------------------------------------------------------------------- vae


def train_vae(args):
    vae = M.build_vae()
    st = TrainingStage(args, "vae", {"vae": vae}, list(vae.parameters()), args.lr or 1e-3)

    def step_fn(step):
        imgs, _ = W.sample_batch(st.rng, args.batch, "train", p_two=args.p_two)
        x = M.images_to_tensor(imgs)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        return st.update(loss)

    meta = st.run(step_fn)
    meta["extra"].update(latent_statistics(vae))
    st.meta = meta
    st.save()
    print(f"[vae] scaling_factor={meta['extra']['scaling_factor']:.4f} "
          f"psnr={meta['extra']['train_psnr_db']:.2f} dB", file=sys.stderr)
    return meta


def latent_statistics(vae) -> Dict[str, float]:
    """On 512 fresh scenes: the latent ``scaling_factor`` (1 / std of sampled latents), the latents'
    mean and the reconstruction PSNR of decode(encode(x).mode())."""
    vae.eval()
    rng = np.random.default_rng(12345)
    with torch.no_grad():
        imgs, _ = W.sample_batch(rng, 512, "train")
        z = vae.encode(M.images_to_tensor(imgs)).latent_dist.sample()
        rec = vae.decode(vae.encode(M.images_to_tensor(imgs)).latent_dist.mode()).sample
    mse = ((M.tensor_to_images(rec).astype(np.float64) - imgs.astype(np.float64)) ** 2).mean()
    return {"scaling_factor": float(1.0 / z.std().item()), "latent_mean": float(z.mean().item()),
            "train_psnr_db": float(10 * math.log10(255 ** 2 / max(mse, 1e-12)))}


# ----------------------------------------------------------------- vae_decoder


def train_vae_decoder(args):
    """Sharpen the decoder with the encoder frozen (the latent space, hence the
    UNet, is unaffected): L1 + MSE + L1 of image gradients on decode(sample).

    With ``--init-from`` the VAE comes from that exported folder; with ``--object-weight``
    the pixel losses count that much more on the objects' masks dilated by 1 px, where a
    blurred star point or cross arm is lost."""
    vae = vae_to_sharpen(args)
    vae.requires_grad_(False)
    encoder_hash = vae_encoder_sha256(vae)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    st = TrainingStage(args, "vae_decoder", {"vae": vae}, params, args.lr or 5e-4)
    record_vae_decoder_settings(st, args, encoder_hash)

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
        loss = weighted_mean(err.abs(), w) + weighted_mean(err ** 2, w) + image_gradient_l1(rec, x)
        return st.update(loss)

    return st.run(step_fn)


def vae_to_sharpen(args):
    """The VAE of ``--init-from``'s folder, or of the run's vae checkpoint (without an earlier fine-tune)."""
    if args.init_from:
        return AutoencoderKL.from_pretrained(os.path.join(args.init_from, "vae"), use_safetensors=True)
    vae, _ = load_trained_vae(args.out, with_decoder_finetune=False)
    return vae


def record_vae_decoder_settings(st: TrainingStage, args, encoder_hash: str) -> None:
    """The run's settings in its meta; a resumed run must keep the VAE encoder it started with."""
    extra = st.meta["extra"]
    if extra.get("encoder_sha256") not in (None, encoder_hash):
        raise SystemExit(f"error: the VAE encoder in {args.init_from or args.out} differs from the one the run "
                         f"in {args.out} started with; resume with the same VAE")
    extra["encoder_sha256"] = encoder_hash
    extra["object_weight"] = args.object_weight
    st.record_setting("texture_phase", args.texture_phase)
    if args.init_from:
        extra["init_from"] = os.path.abspath(args.init_from)


# ------------------------------------------------------------------------ unet


def training_backgrounds(texture_weight: int) -> Tuple[str, ...]:
    """The background names ``sample_scene`` draws from uniformly, with every striped or checkered
    one listed ``texture_weight`` times: textures drawn that many times as often as each other one."""
    if texture_weight < 1:
        raise ValueError("texture_weight must be >= 1")
    return tuple(name for name in W.BACKGROUND_NAMES
                 for _ in range(texture_weight if W.texture_period(name) != (1, 1) else 1))


def train_unet(args):
    tok = M.build_tokenizer()
    unet = (
        M.build_unet()
    )  # before the stage seeds torch: a fresh run's starting weights draw from the process's generator
    te, vae, init_hashes = frozen_text_encoder_and_vae(args, unet)
    st = TrainingStage(args, "unet", {"unet": unet}, list(unet.parameters()), args.lr or 1e-3)
    record_unet_settings(st, args, init_hashes, vae.config.scaling_factor)
    return st.run(UNetTrainingStep(args, st, tok, te, vae, unet))


def frozen_text_encoder_and_vae(args, unet):
    """(text encoder, VAE, hashes of the starting folder or None), frozen: from ``--init-from``'s folder
    (whose UNet is loaded into ``unet`` as the starting point) or from the run's clip and vae checkpoints."""
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
    return te, vae, init_hashes


def record_unet_settings(st: TrainingStage, args, init_hashes: Optional[dict], scaling_factor: float) -> None:
    """The run's settings in its meta; a resumed run must keep the frozen parts (latent and text space)
    and the ``--text-layers`` it started with."""
    extra = st.meta["extra"]
    if init_hashes is not None:
        if hashes_differ(extra.get("init_hashes"), init_hashes):
            raise SystemExit(f"error: --init-from {args.init_from} holds a different text encoder / VAE than "
                             f"the run in {args.out} started from; resume with the same components")
        if extra.get("text_layers", args.text_layers) != args.text_layers:
            raise SystemExit(f"error: the run in {args.out} uses --text-layers {extra['text_layers']}; "
                             f"resume with the same value")
        extra["text_layers"] = args.text_layers
        extra.setdefault("init_from", os.path.abspath(args.init_from))
        extra["init_hashes"] = init_hashes
        extra["scaling_factor"] = scaling_factor
    extra["attn_weight"] = args.attn_weight
    extra["attn_background"] = args.attn_background
    extra["attn_share_weight"] = args.attn_share_weight
    extra["object_weight"] = args.object_weight
    st.record_setting("texture_phase", args.texture_phase)
    st.record_setting("texture_weight", args.texture_weight)
    st.meta.setdefault("attn_losses", [])


class CaptionEmbeddings:
    """The frozen text encoder's last hidden states per caption, each caption encoded once (the world
    has a few thousand captions; the cache is emptied past ``max_cached``)."""

    def __init__(self, text_encoder, tokenizer, max_cached: int = 50000):
        self.text_encoder, self.tokenizer, self.max_cached = text_encoder, tokenizer, max_cached
        self.cache: Dict[str, torch.Tensor] = {}

    def __call__(self, captions: List[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            with torch.no_grad():
                e = self.text_encoder(input_ids=tokenize(self.tokenizer, missing)).last_hidden_state
            for c, v in zip(missing, e):
                self.cache[c] = v
            if len(self.cache) > self.max_cached:
                self.cache.clear()
        return torch.stack([self.cache[c] for c in captions])


def sample_captioned_scenes(rng: np.random.Generator, args, backgrounds: Tuple[str, ...]):
    """(scenes, dropped, captions): ``--batch`` fresh training scenes; a dropped one (probability
    ``--uncond-p``) is captioned "" for classifier-free guidance."""
    scenes = [W.sample_scene(rng, "train", p_two=args.p_two, backgrounds=backgrounds,
                             texture_phase=args.texture_phase) for _ in range(args.batch)]
    dropped = [rng.random() < args.uncond_p for _ in scenes]
    captions = ["" if d else s.caption for s, d in zip(scenes, dropped)]
    return scenes, dropped, captions


def add_noise(z: torch.Tensor, alphas_cumprod: torch.Tensor, num_train_timesteps: int):
    """(z_t, t, noise, alpha-bar_t): DDPM forward noising at a uniformly drawn timestep per row."""
    t = torch.randint(0, num_train_timesteps, (z.shape[0],))
    noise = torch.randn_like(z)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z + (1 - a).sqrt() * noise
    return zt, t, noise, a


def captioned_word_targets(scenes, dropped, caption_tokens, tok, background: bool):
    """(rows, targets): the batch rows of the scenes that kept their caption and, per row,
    :func:`~.losses.object_word_targets` (with the background's words when ``background``)."""
    rows, targets = [], []
    for b, (scene, d) in enumerate(zip(scenes, dropped)):
        if d:
            continue
        rows.append(b)
        targets.append(object_word_targets(scene, caption_tokens, tok, background=background))
    return rows, targets


def words_of_inside_loss(scenes, scene_rows, scene_targets, with_background: bool):
    """(rows, tokens, discs) per word for :func:`~.losses.attention_inside_loss`: every object's colour
    and shape word, and the background's words when ``with_background``."""
    rows, tokens, discs = [], [], []
    for b, targets in zip(scene_rows, scene_targets):
        if not with_background:
            targets = targets[:2 * len(scenes[b].objects)]
        for idx, disc in targets:
            rows.append(b)
            tokens.append(idx)
            discs.append(disc)
    return rows, tokens, discs


class UNetTrainingStep:
    """One step of the unet stage: fresh scenes, the (object-weighted) epsilon loss on their noised
    scaled latents and, with ``--attn-weight`` / ``--attn-share-weight``, the cross-attention losses
    weighted by the signal's share of each noisy latent."""

    def __init__(self, args, st: TrainingStage, tok, te, vae, unet):
        self.args, self.st, self.tok, self.vae, self.unet = args, st, tok, vae, unet
        self.backgrounds = training_backgrounds(args.texture_weight)
        sched = M.build_scheduler()
        self.alphas_cumprod = sched.alphas_cumprod.float()
        self.num_train_timesteps = sched.config.num_train_timesteps
        self.embed = CaptionEmbeddings(te, tok)
        self.caption_tokens: Dict[str, List[List[int]]] = {}
        uses_attention = args.attn_weight > 0 or args.attn_share_weight > 0
        self.attention_state = install_attention_control(unet) if uses_attention else None

    def __call__(self, step: int) -> float:
        args = self.args
        scenes, dropped, captions = sample_captioned_scenes(self.st.rng, args, self.backgrounds)
        imgs = np.stack([s.image for s in scenes])
        with torch.no_grad():
            z = self.vae.encode(M.images_to_tensor(imgs)).latent_dist.sample() * self.vae.config.scaling_factor
            emb = self.embed(captions)
        zt, t, noise, a = add_noise(z, self.alphas_cumprod, self.num_train_timesteps)
        obj_w = (object_loss_weights(scenes, tuple(z.shape[-2:]), args.object_weight)
                 if args.object_weight != 1.0 else None)
        if self.attention_state is None:
            pred = self.unet(zt, t, encoder_hidden_states=emb).sample
            return self.st.update(weighted_mse(pred, noise, obj_w))
        pred, maps = self.predict_keeping_maps(zt, t, emb)
        eps_loss = weighted_mse(pred, noise, obj_w)
        # weight by the signal's share of the noisy latent: at t near T the object's place is not
        # in z_t yet, so asking the maps to find it there would be noise in the loss
        loss = self.add_attention_losses(eps_loss, maps, scenes, dropped, a.view(-1).sqrt())
        self.st.update(loss)
        return float(eps_loss.detach())

    def predict_keeping_maps(self, zt, t, emb):
        """The UNet's epsilon and its cross-attention maps at latent/1, /2, /4 (with gradients)."""
        keeper = AttentionMapKeeper()
        self.attention_state.set(step=0, layout=BatchLayout.single(COND, zt.shape[0]), latent_hw=tuple(zt.shape[-2:]))
        with controlled(self.attention_state, keeper):
            pred = self.unet(zt, t, encoder_hidden_states=emb).sample
        return pred, keeper.maps

    def add_attention_losses(self, loss, maps, scenes, dropped, signal):
        """``loss`` + the weighted inside loss + the weighted share loss (each when its weight is > 0),
        each term's value appended to the stage's record."""
        args, meta = self.args, self.st.meta
        scene_rows, scene_targets = captioned_word_targets(
            scenes,
            dropped,
            self.caption_tokens,
            self.tok,
            background=args.attn_background or args.attn_share_weight > 0,
        )
        if args.attn_weight > 0:
            rows, tokens, discs = words_of_inside_loss(scenes, scene_rows, scene_targets, args.attn_background)
            weights = signal[torch.as_tensor(rows, dtype=torch.long)] if rows else None
            attn_loss = attention_inside_loss(maps, rows, tokens, discs, weights)
            meta["attn_losses"].append(attn_loss.item())
            loss = loss + args.attn_weight * attn_loss
        if args.attn_share_weight > 0:
            share_loss = attention_share_loss(maps, [scenes[b] for b in scene_rows], scene_rows, scene_targets,
                                              signal[torch.as_tensor(scene_rows, dtype=torch.long)])
            meta.setdefault("attn_share_losses", []).append(share_loss.item())
            loss = loss + args.attn_share_weight * share_loss
        return loss
