"""Attention-based edits other than Prompt-to-Prompt: FPE, MasaCtrl and Plug-and-Play.

All run through ``editing.run_edit`` (batch [uncond src, uncond tgt, cond src, cond tgt], both prompts
from z_T, the inversion's hooks applied), with their own controller:

- FPE (Liu et al., CVPR 2024, "Towards Understanding Cross and Self-Attention in Stable Diffusion for
  Text-Guided Image Editing"): for steps i < tau_s T, the conditional target row's SELF-attention maps
  become the source's, in layers with <= (latent/2)^2 queries; cross-attention is never edited.
- MasaCtrl (Cao et al., ICCV 2023): from step ``masactrl_start_step`` (4) and transformer layer
  ``masactrl_start_layer`` (10 of SD1's 16; round(10/16 L) for a UNet with L layers) on, the target
  rows' self-attention queries attend to the source row's keys and values (per guidance branch).
- Plug-and-Play (Tumanyan et al., CVPR 2023): for steps i < ``pnp_feature_fraction`` T (0.8) the residual
  (``conv2``'s output, before the skip is added) of the decoder ResBlock ``up_blocks[1].resnets[1]``
  (PnP's "layer 4" at SD1's 16x16 level, latent/4; on SDXL the block at the same resolution,
  ``up_blocks[0].resnets[1]``) of each target row is replaced by the source row's of the same branch;
  for steps i < ``pnp_attention_fraction`` T (0.5) the target's self-attention maps (= injecting the
  source's queries and keys) are replaced in every decoder self-attention layer but the first (SD1:
  up_blocks 1 [attentions 1, 2], 2 and 3).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..attention_control import COND, UNCOND, AttentionController, install_attention_control
from ..editing import EditSpec, num_steps_for, run_edit
from .common import option
from .registry import EditMethod, Inversion, MethodContext, MethodOption, MethodOutput, edit_loop_inputs


def _copy_source_rows(x: torch.Tensor, layout, branches=(UNCOND, COND)) -> torch.Tensor:
    for branch in branches:
        src = layout.row(branch, 0)
        if src is None:
            continue
        for p in range(1, layout.num_prompts):
            x[layout.row(branch, p)] = x[src]
    return x


def transformer_layers(unet) -> list[tuple[int, str]]:
    """(index, processor name) of every self-attention layer, in forward order."""
    install_attention_control(unet)
    procs = [p for p in unet.attn_processors.values() if getattr(p, "name", "").endswith("attn1.processor")]
    return sorted((p.index, p.name) for p in procs)


class SelfAttentionReplace(AttentionController):
    """FPE: conditional target rows take the source's self-attention maps for the first ``steps`` steps."""

    def __init__(self, steps: int, branches=(COND,)):
        self.steps, self.branches = steps, branches

    def needs_maps(self, place, state):
        return not place.is_cross and place.self_replace_allowed and state.step < self.steps

    def __call__(self, probs, place, state):
        return _copy_source_rows(probs, state.layout, self.branches)


class MutualSelfAttention(AttentionController):
    """MasaCtrl: target self-attention queries attend to the source's keys/values (both branches)."""

    def __init__(self, start_step: int, start_layer: int, end_step: int | None = None):
        self.start_step, self.start_layer, self.end_step = start_step, start_layer, end_step

    def active(self, place, state) -> bool:
        return (not place.is_cross and place.index >= self.start_layer and state.step >= self.start_step
                and (self.end_step is None or state.step < self.end_step))

    def edit_kv(self, k, v, place, state):
        if not self.active(place, state):
            return k, v
        return _copy_source_rows(k.clone(), state.layout), _copy_source_rows(v.clone(), state.layout)


class PlugAndPlayAttention(AttentionController):
    """PnP's self-attention injection: target maps = source maps in the chosen decoder layers."""

    def __init__(self, steps: int, layers: set[int]):
        self.steps, self.layers = steps, layers

    def needs_maps(self, place, state):
        return not place.is_cross and place.index in self.layers and state.step < self.steps

    def __call__(self, probs, place, state):
        return _copy_source_rows(probs, state.layout)


def masactrl_start_layer(unet, start_layer: int | None = None) -> int:
    """SD1's layer 10 of 16, scaled to this UNet's number of transformer layers."""
    if start_layer is not None:
        return start_layer
    return round(10 / 16 * len(transformer_layers(unet)))


def pnp_attention_layers(unet) -> set[int]:
    """Decoder self-attention layers but the first (SD1: up_blocks.1.attentions.1-2, up_blocks.2-3)."""
    up = [idx for idx, name in transformer_layers(unet) if name.startswith("up_blocks")]
    return set(up[1:])


def decoder_downscales(unet) -> list[int]:
    """For each decoder block, the downscale (relative to the latent) its ResNets run at: 2 ** the number of
    upsamplers still to come (SD1 at 64x64: 8, 4, 2, 1)."""
    ups = list(unet.up_blocks)
    return [2 ** sum(1 for b in ups[k:] if getattr(b, "upsamplers", None)) for k in range(len(ups))]


def pnp_feature_module(unet, downscale: int = 4):
    """PnP's injected feature: the ``conv2`` output (the residual, before the skip is added) of the second
    ResNet of the decoder block at latent/``downscale`` (SD1: up_blocks[1], the 16x16 level at 512²; SDXL:
    up_blocks[0], 32x32 at 1024²); a UNet without that level: its coarsest decoder block."""
    levels = decoder_downscales(unet)
    block = unet.up_blocks[levels.index(downscale) if downscale in levels else 0]
    return block.resnets[min(1, len(block.resnets) - 1)].conv2


@contextmanager
def feature_injection(unet, module, steps: int):
    """Forward hook: the target rows of ``module``'s output become the source rows' while step < steps."""
    state = install_attention_control(unet)

    def hook(_module, _inputs, output):
        if state.step >= steps or state.layout is None or state.layout.num_prompts < 2:
            return output
        return _copy_source_rows(output.clone(), state.layout)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _edit(ctx, inv, spec, controller) -> MethodOutput:
    result = run_edit(ctx.bundle, ctx.schedule, inv.z_T, spec, controller=controller, progress=ctx.progress,
                      **edit_loop_inputs(ctx, inv))
    return MethodOutput(result.latents, inv)


def fpe_edit(ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
    return _edit(ctx, inv, spec, SelfAttentionReplace(num_steps_for(spec.tau_s, ctx.num_steps)))


def masactrl_edit(ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
    layer = option(ctx, "masactrl_start_layer")
    controller = MutualSelfAttention(option(ctx, "masactrl_start_step"),
                                     masactrl_start_layer(ctx.bundle.unet, None if layer < 0 else layer))
    return _edit(ctx, inv, spec, controller)


def pnp_edit(ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
    unet, T = ctx.bundle.unet, ctx.num_steps
    feature_steps = num_steps_for(option(ctx, "pnp_feature_fraction"), T)
    controller = PlugAndPlayAttention(num_steps_for(option(ctx, "pnp_attention_fraction"), T),
                                      pnp_attention_layers(unet))
    with feature_injection(unet, pnp_feature_module(unet), feature_steps):
        return _edit(ctx, inv, spec, controller)


class FPEEdit(EditMethod):
    name = "fpe"
    paper = ("Liu et al., Towards Understanding Cross and Self-Attention in SD for Text-Guided Image Editing "
             "(FPE, CVPR 2024)")
    defaults = ("self-attention replacement only (cond branch, layers <= (latent/2)^2 queries) for i < tau_s T "
                "(tau_s .6); no cross-attention swap")

    def edit(self, ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
        return fpe_edit(ctx, inv, spec)


class MasaCtrlEdit(EditMethod):
    name = "masactrl"
    paper = "Cao et al., MasaCtrl: Tuning-Free Mutual Self-Attention Control (ICCV 2023)"
    defaults = "masactrl_start_step=4, masactrl_start_layer=round(10/16 layers) (10 for SD1)"
    options = (MethodOption("masactrl_start_step", 4, minimum=0, maximum=10_000),
               MethodOption("masactrl_start_layer", -1, minimum=-1, maximum=1_000))
    defined_for = ("ddim", "directinv", "spdinv", "generated")

    def edit(self, ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
        return masactrl_edit(ctx, inv, spec)


class PlugAndPlayEdit(EditMethod):
    name = "pnp"
    paper = "Tumanyan et al., Plug-and-Play Diffusion Features (CVPR 2023)"
    defaults = ("pnp_feature_fraction=0.8 (up_blocks[1].resnets[1]'s residual), pnp_attention_fraction=0.5 "
                "(decoder self-attention maps but the first layer)")
    options = (MethodOption("pnp_feature_fraction", 0.8, minimum=0.0, maximum=1.0),
               MethodOption("pnp_attention_fraction", 0.5, minimum=0.0, maximum=1.0))
    defined_for = ("ddim", "directinv", "spdinv", "generated")

    def edit(self, ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
        return pnp_edit(ctx, inv, spec)
