"""Built-in methods: StyleDiffusion and plain DDIM inversion; P2P/P2Plus and word-swap edits.

Every method is registered in ``methods/__init__.py`` (see docs/methods.md).
"""
from __future__ import annotations

import logging
from dataclasses import replace

from ..attention_control import AttentionController
from ..defaults import VARIANT, VARIANTS
from ..editing import EditSpec, run_edit
from ..encoders import encode_latent, encode_prompts
from ..inversion import load_inversion, train_inversion
from ..sampling import ddim_inversion, guided_sampling
from ..training import EMBEDDINGS, embedding_inputs
from .common import learned_embedding
from .registry import (
    EditMethod,
    Inversion,
    InversionMethod,
    MethodContext,
    MethodOption,
    MethodOutput,
    edit_loop_inputs,
)

logger = logging.getLogger(__name__)


def stylediffusion_inversion(ctx: MethodContext) -> Inversion:
    b = ctx.bundle
    variant = ctx.options.get("variant", VARIANT)
    embedding = ctx.options.get("embedding")
    if embedding is not None:
        embedding_inputs(str(embedding), None)  # refuses an unknown name before any work
    cfg = ctx.train_cfg if embedding is None else replace(ctx.train_cfg, embedding=str(embedding))
    if ctx.checkpoint is not None and ctx.checkpoint.is_file():
        # a checkpoint trained with another variant, K, lr, embedding... is refused, never reused
        inv = load_inversion(b, ctx.checkpoint, ctx.image, ctx.source, ctx.num_steps,
                             settings={"variant": variant, "train_config": cfg.to_dict()}, options=ctx.options)
    else:  # without a checkpoint path the trained networks live only in memory
        inv = train_inversion(b, ctx.image, ctx.source, ctx.num_steps, cfg, ctx.checkpoint, variant=variant,
                              progress=ctx.progress, options=ctx.options)
    return inv


def ddim_inversion_method(ctx: MethodContext) -> Inversion:
    b = ctx.bundle
    z0 = encode_latent(b, ctx.image)
    cond = encode_prompts(b, [ctx.source])
    traj = ddim_inversion(b, ctx.schedule, z0, cond, record_maps=False, progress=ctx.progress)
    return Inversion("ddim", z0, traj.z_T, cond_embedding=cond, trajectory=traj.latents)


def p2p_edit(ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
    result = run_edit(ctx.bundle, ctx.schedule, inv.z_T, spec, progress=ctx.progress, **edit_loop_inputs(ctx, inv))
    return MethodOutput(result.latents, inv, result.controller.average_maps())


def word_swap_edit(ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
    b = ctx.bundle
    inputs = edit_loop_inputs(ctx, inv)
    hooks = inputs.get("hooks")  # the inversion's per-step changes, not its learned values
    if hooks is None and ctx.step_callback is None:  # plain sampling
        cond = encode_prompts(b, [spec.source, spec.target])
        z = guided_sampling(b, ctx.schedule, inv.z_T, cond, encode_prompts(b, [""]), spec.guidance_scale,
                            progress=ctx.progress)
        return MethodOutput(z, inv)
    # Null-text embeddings, NPI's negative prompt, DirectInversion's offsets... with no attention control.
    result = run_edit(b, ctx.schedule, inv.z_T, spec, controller=AttentionController(), progress=ctx.progress,
                      hooks=hooks, step_callback=inputs.get("step_callback"))
    return MethodOutput(result.latents, inv)



class StyleDiffusionInversion(InversionMethod):
    name = "stylediffusion"
    trains_inner_steps = True
    paper = "Li et al., StyleDiffusion: Prompt-Embedding Inversion (2023)"
    defaults = ("T=30, K=100, lr 1e-2, modulate mapping, attention loss on; options variant=modulate|replace, "
                "embedding=value|key|key_value (the paper's key and key+value ablations, Fig. 14)")
    options = (
        MethodOption("variant", VARIANT, choices=VARIANTS),
        MethodOption("embedding", "value", choices=EMBEDDINGS),
    )

    def invert(self, ctx: MethodContext) -> Inversion:
        return stylediffusion_inversion(ctx)

    def edit_inputs(self, ctx: MethodContext, inv: Inversion) -> dict:
        """The learned embeddings: M_i(E(x), c) in the conditional rows (source always, target while i < tau_v T),
        as values (or keys, for the paper's ablations)."""
        return {"mappers": inv.mappers, "image_features": inv.image_features, "embedding": learned_embedding(inv)}


class DDIMInversion(InversionMethod):
    name = "ddim"
    paper = "Song et al., DDIM (2021); inversion at guidance 1"
    defaults = "T=30"

    def invert(self, ctx: MethodContext) -> Inversion:
        return ddim_inversion_method(ctx)


class PromptToPromptEdit(EditMethod):
    name = "p2p"
    paper = "Hertz et al., Prompt-to-Prompt (2022); P2Plus (StyleDiffusion) when tau_u > 0"
    defaults = "tau_v .5, tau_c .6, tau_s .6, tau_u 0, LocalBlend threshold .3"

    def edit(self, ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
        return p2p_edit(ctx, inv, spec)


class WordSwapEdit(EditMethod):
    name = "word_swap"
    paper = "DDIM inversion, then sample the target prompt with no attention control"
    defaults = "guidance 7.5"

    def edit(self, ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
        return word_swap_edit(ctx, inv, spec)
