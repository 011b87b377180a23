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
  latents, 10% of captions dropped to "" (classifier-free guidance);
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
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import model as M
from . import world as W

STAGES = ("clip", "vae", "unet", "vae_decoder")


# ----------------------------------------------------------------- checkpoints


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _atomic_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


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
    tmp = os.path.join(out, f"{stage}_loss.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, os.path.join(out, f"{stage}_loss.png"))


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
    UNet, is unaffected): L1 + MSE + L1 of image gradients on decode(sample)."""
    vae, _ = load_trained_vae(args.out, with_decoder_finetune=False)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    st = _Stage(args, "vae_decoder", {"vae": vae}, params, args.lr or 5e-4)

    def step_fn(step):
        imgs, _ = W.sample_batch(st.rng, args.batch, "train", p_two=args.p_two)
        x = M.images_to_tensor(imgs)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + _grad_l1(rec, x)
        return st.update(loss)

    return st.run(step_fn)


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


def train_unet(args):
    tok = M.build_tokenizer()
    clip_mods, _ = load_trained_text_encoder(args.out)
    te = clip_mods["text"].eval().requires_grad_(False)
    vae, _ = load_trained_vae(args.out)
    vae.eval().requires_grad_(False)
    sf = vae.config.scaling_factor
    unet = M.build_unet()
    st = _Stage(args, "unet", {"unet": unet}, list(unet.parameters()), args.lr or 1e-3)
    sched = M.build_scheduler()
    acp = sched.alphas_cumprod.float()
    cache: Dict[str, torch.Tensor] = {}

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
        imgs, caps = W.sample_batch(st.rng, args.batch, "train", p_two=args.p_two)
        caps = ["" if st.rng.random() < args.uncond_p else c for c in caps]
        with torch.no_grad():
            z = vae.encode(M.images_to_tensor(imgs)).latent_dist.sample() * sf
            emb = embed(caps)
        t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],))
        noise = torch.randn_like(z)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        return st.update(loss)

    return st.run(step_fn)


# ---------------------------------------------------------------------- export


def export(out: str, model_dir: str) -> None:
    import diffusers
    from transformers import CLIPVisionModel

    os.makedirs(model_dir, exist_ok=True)
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
    ev = os.path.join(out, "eval.json")
    if os.path.exists(ev):
        with open(ev) as f:
            info["evaluation"] = json.load(f)
    _atomic_json(os.path.join(model_dir, "testbed.json"), info)
    print(f"exported to {model_dir}", file=sys.stderr)


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
    args = p.parse_args(argv)
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
        export(args.out, args.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
