"""Negative-prompt inversion (Miyake et al., 2023) and its proximal variant ProxNPI (Han et al., 2023).

NPI: plain DDIM inversion with the source prompt; when editing, the SOURCE prompt's embedding is the
unconditional ("negative") embedding of every row, source and target. The source row's guided noise
is then its conditional noise, so its reconstruction is the guidance-1 DDIM reconstruction whatever
the guidance scale.

ProxNPI (ProxEdit, "Improving Tuning-Free Real Image Editing with Proximal Guidance"), as
implemented here:
- proximal guidance: for every row, d = eps_c - eps_u is replaced by its soft-thresholded version
  sign(d) max(|d| - lambda, 0), lambda = the ``prox_quantile`` (0.7) quantile of |d| over that row, so
  only the large, edit-carrying part of the guidance acts;
- reconstruction ("inversion") guidance: after each step whose timestep is below ``prox_recon_t``
  (400), the latents are moved toward the inverted latent z*_{t-1} by ``prox_recon_lr`` (0.1) times the
  gap, only where the proximal edit mask |d| > lambda is off (the source row everywhere).
Defaults follow the PnP-Inversion benchmark's ProxNPI settings.
"""
from __future__ import annotations

from ..encoders import encode_latent, encode_prompts
from ..sampling import ddim_inversion
from .common import checkpointed, option, stack, unstack
from .registry import Inverted, MethodContext, MethodOption, register_inversion


def _invert(ctx: MethodContext, method: str, settings: dict):
    def compute():
        b = ctx.bundle
        z0 = encode_latent(b, ctx.image)
        traj = ddim_inversion(b, ctx.schedule, z0, encode_prompts(b, [ctx.source]), record_maps=False,
                              progress=ctx.progress)
        return {"trajectory": stack(traj.latents)}, {}

    tensors, meta = checkpointed(ctx, method, settings, compute)
    return unstack(tensors["trajectory"], ctx.bundle.device), meta


@register_inversion("npi", "Miyake et al., Negative-prompt Inversion (2023)",
                    "DDIM inversion; source-prompt embedding as the unconditional one when editing; no optimisation")
def npi_inversion(ctx: MethodContext) -> Inverted:
    traj, meta = _invert(ctx, "npi", {})
    return Inverted("npi", traj[0], traj[-1], trajectory=traj, extras={"negative_prompt": True}, metadata=meta)


@register_inversion("proxnpi", "Han et al., Improving Negative-Prompt Inversion via Proximal Guidance (ProxEdit, 2023)",
                    "NPI + soft-thresholded guidance (prox_quantile=0.7) + reconstruction guidance "
                    "(prox_recon_lr=0.1 for timesteps < prox_recon_t=400)",
                    options=(MethodOption("prox_quantile", 0.7, minimum=0.0, maximum=1.0),
                             MethodOption("prox_recon_lr", 0.1, minimum=0.0, maximum=1.0),
                             MethodOption("prox_recon_t", 400, minimum=-1000, maximum=1000)))
def proxnpi_inversion(ctx: MethodContext) -> Inverted:
    prox = {"quantile": option(ctx, "prox_quantile"), "recon_lr": option(ctx, "prox_recon_lr"),
            "recon_t": option(ctx, "prox_recon_t")}
    traj, meta = _invert(ctx, "proxnpi", {})
    extras = {"negative_prompt": True, "prox": prox, "timesteps": ctx.schedule.timesteps.tolist()}
    return Inverted("proxnpi", traj[0], traj[-1], trajectory=traj, extras=extras, metadata={**meta, "prox": prox})
