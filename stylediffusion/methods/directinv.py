"""DirectInversion / PnP Inversion (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3
Lines of Code", ICLR 2024).

DDIM inversion with the source prompt gives z*_0..z*_T. For sampling step i, the guided step from the
inverted latent z*_t (unconditional "" + w (cond - uncond)) lands on z~_{t-1}; the gap
o_i = z*_{t-1} - z~_{t-1} is stored. When editing, o_i is added to the SOURCE row after step i, which
keeps the source branch on the inversion trajectory (exact reconstruction up to float error); the
target row is left alone and only feels the source through the attention edit. No optimisation.
The offset is added before LocalBlend (``run_edit`` calls the hooks first), as PnPInversion's
``direct_inversion_p2p_guidance_diffusion_step`` does, so outside the blend mask the target row takes
the corrected source latent.
"""
from __future__ import annotations

import torch

from ..attention_control import BatchLayout
from ..ddim import guided
from ..editing import EditHooks
from ..encoders import encode_latent, encode_prompts
from ..sampling import ddim_inversion, predict
from .common import checkpointed
from .registry import Inversion, InversionMethod, MethodContext


@torch.no_grad()
def direct_offsets(ctx: MethodContext, trajectory: list[torch.Tensor], guidance_scale: float) -> torch.Tensor:
    b, schedule = ctx.bundle, ctx.schedule
    text = torch.cat([encode_prompts(b, [""]), encode_prompts(b, [ctx.source])])
    offsets = []
    T = len(trajectory) - 1
    for i in range(T):
        z = trajectory[T - i]
        eps_u, eps_c = predict(b, schedule, torch.cat([z, z]), i, text, BatchLayout.guided(1)).chunk(2)
        offsets.append(trajectory[T - i - 1] - schedule.sample_step(guided(eps_u, eps_c, guidance_scale), z, i))
    return torch.cat(offsets)


def directinv_inversion(ctx: MethodContext) -> Inversion:
    w = ctx.train_cfg.guidance_scale
    b = ctx.bundle

    def compute():
        z0 = encode_latent(b, ctx.image)
        traj = ddim_inversion(b, ctx.schedule, z0, encode_prompts(b, [ctx.source]), record_maps=False,
                              progress=ctx.progress)
        return Inversion("directinv", z0, traj.z_T, extras={"latent_offsets": direct_offsets(ctx, traj.latents, w)})

    return checkpointed(ctx, "directinv", {"guidance_scale": w}, compute).to(b.device)


class SourceOffsetHooks(EditHooks):
    """After step i the stored offset o_i is added to the source row only (it then follows z*_{t-1})."""

    def __init__(self, offsets: torch.Tensor):
        self.offsets = offsets  # (T, C, h, w)

    def after_step(self, i, z):
        return torch.cat([z[:1] + self.offsets[i].to(z), z[1:]])


class DirectInversion(InversionMethod):
    name = "directinv"
    paper = "Ju et al., PnP Inversion / DirectInversion (ICLR 2024)"
    defaults = "DDIM inversion + per-step source-branch offsets at guidance 7.5; no optimisation"

    def invert(self, ctx: MethodContext) -> Inversion:
        return directinv_inversion(ctx)

    def edit_hooks(self, ctx: MethodContext, inv: Inversion) -> EditHooks:
        return SourceOffsetHooks(inv.extras["latent_offsets"])
