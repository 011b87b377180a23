"""StyleDiffusion+ : StyleDiffusion's learned values at a quarter of the budget, with the residual closed exactly.

What it keeps from StyleDiffusion (Li et al., 2023): per-step mapping networks M_i turn the image's CLIP
features E(x) into the value input of every cross-attention layer (keys keep the plain prompt), trained
against the DDIM-inversion trajectory with the reconstruction and the mid-low attention loss; edits
with P2P / P2Plus use M_i(E(x), c) in the conditional rows as StyleDiffusion's do.

What it changes (docs/method.md, "Why StyleDiffusion reconstructs worse" for the measurements behind it):

* **The pivot is the inversion trajectory.** StyleDiffusion trains M_i at its own previous output z~_t,
  so whatever M_0..M_{i-1} did not fit is carried into step i and accumulates. Here M_i is trained at
  z*_t, and what it leaves, o_i = z*_{t-1} - DDIM(eps_u + w (eps_c(M_i) - eps_u), z*_t), is recorded and
  added to the source row after step i of an edit, as DirectInversion (Ju et al., 2024) does for plain
  DDIM: the source branch then follows z*_t exactly (up to float error) whatever the values learned.
* **A quarter of the optimiser budget.** With the error closed exactly, the values no longer have to
  carry the whole reconstruction; they only have to make the image's own values fit the step. K+_i =
  ceil(``sdplus_budget`` * K_i) iterations (K_i = ceil(K e^(-0.1 i)) as StyleDiffusion's), M_i
  warm-started from the trained M_{i-1}, StyleDiffusion's early stop kept. M_0 starts as StyleDiffusion's
  (PyTorch's initialisation); ``sdplus_init=identity`` starts every network at value = c instead.

Everything learned comes from the image (E(x), z*_t, A*_i) and the prompt; no other data.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .. import seq_aligner
from ..attention_control import BatchLayout, CrossAttentionRecorder, install_attention_control
from ..ddim import guided
from ..defaults import VARIANT
from ..editing import EditHooks
from ..encoders import clip_image_features, encode_latent, encode_prompts
from ..errors import UserError
from ..inversion import mapping_config
from ..mapping import MappingNetworks
from ..sampling import ddim_inversion, predict
from ..training import fit_step, gradient_scaler, inner_steps
from .common import checkpointed, option
from .directinv import SourceOffsetHooks
from .registry import Inversion, InversionMethod, MethodContext, MethodOption

logger = logging.getLogger(__name__)

NAME = "stylediffusion_plus"
TARGET_VALUES = ("learned", "aligned")


def budget_steps(num_inner_steps: int, budget: float, i: int) -> int:
    """K+_i = ceil(budget * K_i), at least one iteration."""
    return max(1, math.ceil(budget * inner_steps(num_inner_steps, i) - 1e-9))


def identity_init(mappers: MappingNetworks) -> None:
    """Start every M_i at value = c (gamma = 1, beta = 0): the learned values are a residual around the
    prompt's own values, so a target word keeps its meaning where the budget leaves the network little changed."""
    with torch.no_grad():
        for mapper in mappers.mappers:
            last = mapper.net[-1]
            last.weight.zero_()
            rows = last.bias.shape[0] // 2
            last.bias[:rows] = 1.0
            last.bias[rows:] = 0.0


def train_with_offsets(ctx: MethodContext, budget: float, features: torch.Tensor, cond: torch.Tensor,
                       init: str = "random", progress: bool = True):
    """(z0, trajectory, trained mapping networks, offsets (T, C, h, w), per-step reports) for E(x) = ``features``
    and the source prompt's embedding ``cond``."""
    b, schedule, T = ctx.bundle, ctx.schedule, ctx.num_steps
    cfg = replace(ctx.train_cfg, embedding="value")
    z0 = encode_latent(b, ctx.image)
    uncond = encode_prompts(b, [""])
    mappers = MappingNetworks(mapping_config(b, features, cond, VARIANT), T)
    if init == "identity":
        identity_init(mappers)
    mappers.to(b.device).train()
    traj = ddim_inversion(b, schedule, z0, cond, record_maps=cfg.attention_loss, progress=progress)
    state = install_attention_control(b.unet)
    recorder = CrossAttentionRecorder(keep_grad=True)
    layout = BatchLayout.single()
    scaler = gradient_scaler(b)
    offsets, reports = [], []
    bar = tqdm(total=sum(budget_steps(cfg.num_inner_steps, budget, i) for i in range(T)),
               desc="StyleDiffusion+ training", disable=not progress)
    for i in range(T):
        z = traj.latents[T - i].to(b.device)  # the pivot is z*_t: earlier steps' residuals are closed exactly
        target = traj.target_for_step(i).to(b.device)
        reference = traj.maps.get(i, [])
        mapper = mappers[i]
        if i > 0:
            mapper.load_state_dict(mappers[i - 1].state_dict())
        with torch.no_grad():
            eps_u = predict(b, schedule, z, i, uncond, layout)
        it, loss_value = fit_step(b, schedule, z, i, eps_u, mapper, features, cond, target, reference, state,
                                  recorder, cfg, scaler, budget_steps(cfg.num_inner_steps, budget, i), bar,
                                  what=f"{NAME} training")
        with torch.no_grad():
            eps_c = predict(b, schedule, z, i, cond, layout, values=mapper(features, cond))
            landed = schedule.sample_step(guided(eps_u, eps_c, cfg.guidance_scale), z, i)
        offset = target - landed
        offsets.append(offset.detach())
        reports.append({"step": i, "iterations": it, "loss": loss_value,
                        "residual_mse": float(offset.pow(2).mean())})
    bar.close()
    return z0, traj, mappers.eval(), torch.cat(offsets), reports


class PlusEditHooks(SourceOffsetHooks):
    """The source row's offsets (``SourceOffsetHooks``) and what the target row's values take from the image.

    ``target_values``: "learned" gives every target token the learned values (StyleDiffusion's edit);
    "aligned" gives them only to the tokens the edit keeps (aligned with an equal source token), and the
    target prompt's own embedding to the words it changes, whose learned values would carry the source's
    attribute. ``weight`` scales the learned part: c + weight (M_i(E(x), c) - c).
    """

    def __init__(self, offsets: torch.Tensor, target_values: str = "learned", weight: float = 1.0):
        super().__init__(offsets)
        self.mode, self.weight = target_values, weight
        self._kept: dict = {}

    def kept_tokens(self, spec, tokenizer) -> torch.Tensor:
        """(tokens,) 1 where the target token is aligned with an equal source token, 0 where the edit changes it."""
        key = (spec.source, spec.target)
        if key not in self._kept:
            _, alphas = seq_aligner.refinement_mapper(spec.source, spec.target, tokenizer, tokenizer.model_max_length)
            self._kept[key] = alphas
        return self._kept[key]

    def target_values(self, i, values, plain, spec, tokenizer):
        if self.weight != 1.0:
            values = torch.lerp(plain, values, self.weight)
        if self.mode == "aligned":
            kept = self.kept_tokens(spec, tokenizer).to(values.device).bool()
            n = kept.shape[0]  # rows past the tokens (SDXL's pooled row) are the prompt's anyway
            values = torch.cat([torch.where(kept.view(1, -1, 1), values[:, :n], plain[:, :n]), values[:, n:]], dim=1)
        return values


def stylediffusion_plus_inversion(ctx: MethodContext) -> Inversion:
    budget = option(ctx, "sdplus_budget")
    init = option(ctx, "sdplus_init")
    cfg = ctx.train_cfg
    settings = {"budget": budget, "init": init, "num_inner_steps": cfg.num_inner_steps, "lr": cfg.lr,
                "guidance_scale": cfg.guidance_scale, "attention_loss": cfg.attention_loss,
                "attention_weight": cfg.attention_weight, "early_stop": cfg.early_stop}
    b = ctx.bundle
    cond = encode_prompts(b, [ctx.source])
    features = clip_image_features(b, ctx.image)
    mcfg = mapping_config(b, features, cond, VARIANT)

    def compute():
        t0 = time.perf_counter()
        z0, traj, mappers, offsets, reports = train_with_offsets(
            ctx, budget, features, cond, init, progress=ctx.progress
        )
        return Inversion(
            NAME,
            z0,
            traj.z_T,
            mappers=mappers,
            image_features=features,
            extras={"latent_offsets": offsets},
            metadata={
                "mapping_config": mcfg.to_dict(),
                "train_seconds": round(time.perf_counter() - t0, 3),
                "inner_iterations": sum(r["iterations"] for r in reports),
                "final_losses": [float(f"{r['loss']:.4g}") for r in reports],
                "residual_mse": [float(f"{r['residual_mse']:.4g}") for r in reports],
            },
        )

    inv = checkpointed(ctx, NAME, settings, compute)
    if inv.mappers is None or inv.mappers.cfg != mcfg or len(inv.mappers) != ctx.num_steps:
        raise UserError(f"checkpoint '{ctx.checkpoint}' was made with other mapping networks; delete it or pass "
                        f"another --checkpoint.")
    # E(x) of this run's image (the file's copy is the same values, for Inversion.load)
    return replace(inv, image_features=features).to(b.device)


class StyleDiffusionPlusInversion(InversionMethod):
    name = NAME
    trains_inner_steps = True  # a share (sdplus_budget) of StyleDiffusion's K
    paper = ("StyleDiffusion's learned values (Li et al., 2023) trained on the DDIM trajectory, their residual "
             "closed per step as DirectInversion does (Ju et al., 2024)")
    defaults = ("T=30, K_i as StyleDiffusion's times sdplus_budget=0.25, warm start, attention loss on, "
                "source-branch offsets; option sdplus_init=random|identity (value = c at the start); "
                "edit with --edit p2p (tau_u > 0: P2Plus)")
    options = (MethodOption("sdplus_budget", 0.25, minimum=0.01, maximum=1.0),
               MethodOption("sdplus_init", "random", choices=("random", "identity")),
               MethodOption("sdplus_target_values", "learned", choices=TARGET_VALUES),
               MethodOption("sdplus_target_weight", 1.0, minimum=0.0, maximum=1.0))

    def invert(self, ctx: MethodContext) -> Inversion:
        return stylediffusion_plus_inversion(ctx)

    def edit_inputs(self, ctx: MethodContext, inv: Inversion) -> dict:
        """The learned values, in the conditional rows as StyleDiffusion's (source always, target while i < tau_v T)."""
        return {"mappers": inv.mappers, "image_features": inv.image_features, "embedding": "value"}

    def edit_hooks(self, ctx: MethodContext, inv: Inversion) -> EditHooks:
        return PlusEditHooks(inv.extras["latent_offsets"], option(ctx, "sdplus_target_values"),
                             option(ctx, "sdplus_target_weight"))
