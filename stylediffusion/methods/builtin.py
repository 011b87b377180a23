"""Built-in methods: StyleDiffusion and plain DDIM inversion; P2P/P2Plus and word-swap edits."""
from __future__ import annotations

import torch

from ..editing import EditSpec, run_edit
from ..encoders import clip_image_features, encode_latent, encode_prompts
from ..inversion import load_inversion, train_inversion
from ..sampling import ddim_inversion, guided_sampling
from .registry import Inverted, MethodContext, MethodOutput, register_edit, register_inversion

ALL_INVERSIONS = ("stylediffusion", "ddim")


@register_inversion("stylediffusion", "Li et al., StyleDiffusion: Prompt-Embedding Inversion (2023)",
                    "T=30, K=100, lr 1e-2, modulate mapping, attention loss on")
def stylediffusion_inversion(ctx: MethodContext) -> Inverted:
    b = ctx.bundle
    variant = ctx.options.get("variant", "modulate")
    if ctx.checkpoint is not None and ctx.checkpoint.is_file():
        inv = load_inversion(b, ctx.checkpoint, ctx.image, ctx.source, ctx.num_steps)
    else:
        from tempfile import TemporaryDirectory
        from pathlib import Path

        if ctx.checkpoint is not None:
            inv = train_inversion(b, ctx.image, ctx.source, ctx.num_steps, ctx.train_cfg, ctx.checkpoint,
                                  variant=variant, progress=ctx.progress, log=lambda *_: None)
        else:
            with TemporaryDirectory() as tmp:
                inv = train_inversion(b, ctx.image, ctx.source, ctx.num_steps, ctx.train_cfg,
                                      Path(tmp) / "inversion.safetensors", variant=variant, progress=ctx.progress,
                                      log=lambda *_: None)
    return Inverted("stylediffusion", encode_latent(b, ctx.image), inv.z_T, mappers=inv.mappers,
                    image_features=clip_image_features(b, ctx.image), metadata=inv.metadata)


@register_inversion("ddim", "Song et al., DDIM (2021); inversion at guidance 1", "T=30")
def ddim_inversion_method(ctx: MethodContext) -> Inverted:
    b = ctx.bundle
    z0 = encode_latent(b, ctx.image)
    cond = encode_prompts(b, [ctx.source])
    traj = ddim_inversion(b, ctx.schedule, z0, cond, record_maps=False, progress=ctx.progress)
    return Inverted("ddim", z0, traj.z_T, cond_embedding=cond, trajectory=traj.latents)


@register_edit("p2p", "Hertz et al., Prompt-to-Prompt (2022); P2Plus (StyleDiffusion) when tau_u > 0",
               ALL_INVERSIONS, "tau_v .5, tau_c .6, tau_s .6, tau_u 0, LocalBlend threshold .3")
def p2p_edit(ctx: MethodContext, inv: Inverted, spec: EditSpec) -> MethodOutput:
    result = run_edit(ctx.bundle, ctx.schedule, inv.z_T, spec, inv.mappers, inv.image_features, progress=ctx.progress)
    return MethodOutput(result.latents, inv, result.controller.average_maps())


@register_edit("word_swap", "DDIM inversion, then sample the target prompt with no attention control",
               ALL_INVERSIONS, "guidance 7.5")
def word_swap_edit(ctx: MethodContext, inv: Inverted, spec: EditSpec) -> MethodOutput:
    b = ctx.bundle
    cond = encode_prompts(b, [spec.source, spec.target])
    z = guided_sampling(b, ctx.schedule, inv.z_T, cond, encode_prompts(b, [""]), spec.guidance_scale,
                        progress=ctx.progress)
    return MethodOutput(z, inv)
