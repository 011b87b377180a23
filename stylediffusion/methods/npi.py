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

from dataclasses import replace

import torch

from ..editing import EditHooks
from ..encoders import encode_latent, encode_prompts
from ..sampling import ddim_inversion
from .common import checkpointed, option, stack, unstack
from .registry import Inversion, InversionMethod, MethodContext, MethodOption


def _invert(ctx: MethodContext, method: str, settings: dict, extras: dict | None = None) -> Inversion:
    def compute():
        b = ctx.bundle
        z0 = encode_latent(b, ctx.image)
        traj = ddim_inversion(b, ctx.schedule, z0, encode_prompts(b, [ctx.source]), record_maps=False,
                              progress=ctx.progress)
        return Inversion(method, traj.latents[0], traj.latents[-1], trajectory=list(traj.latents),
                         extras=dict(extras or {}))

    inv = checkpointed(ctx, method, settings, compute)
    traj = unstack(stack(inv.trajectory), ctx.bundle.device)  # one tensor on the device, a view per step
    return replace(inv, z0=traj[0], z_T=traj[-1], trajectory=traj)


def npi_inversion(ctx: MethodContext) -> Inversion:
    return _invert(ctx, "npi", {})


def proxnpi_inversion(ctx: MethodContext) -> Inversion:
    prox = {"quantile": option(ctx, "prox_quantile"), "recon_lr": option(ctx, "prox_recon_lr"),
            "recon_t": option(ctx, "prox_recon_t")}
    # the proximal settings act at edit time: this run's, also over a file made with others
    extras = {"prox": prox, "timesteps": ctx.schedule.timesteps.tolist()}
    inv = _invert(ctx, "proxnpi", {}, extras)
    return replace(inv, extras=extras, metadata={**inv.metadata, "prox": prox})


def soft_threshold(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """The proximal map of the L1 norm: sign(x) max(|x| - threshold, 0)."""
    return torch.sign(x) * (x.abs() - threshold).clamp_min(0)


class NegativePromptHooks(EditHooks):
    """Both unconditional rows use the SOURCE prompt's embedding (rows: uncond src, uncond tgt, cond src,
    cond tgt), so the source row's guided noise is its conditional noise."""

    def text(self, i, text):
        return torch.cat([text[2:3], text[2:3], text[2:]])


class ProximalGuidanceHooks(NegativePromptHooks):
    """ProxNPI: soft-thresholded guidance, and reconstruction guidance toward z*_{t-1} where the edit is off."""

    def __init__(self, prox: dict, timesteps: list[int], trajectory: list[torch.Tensor]):
        self.prox, self.timesteps, self.trajectory = prox, timesteps, trajectory
        self.edit_masks: list[torch.Tensor] = []

    def guide(self, i, eps_u, eps_c, z, guidance_scale):
        delta = eps_c - eps_u
        flat = delta.abs().flatten(1)
        threshold = flat.quantile(float(self.prox["quantile"]), dim=1).view(-1, *([1] * (delta.dim() - 1)))
        mask = (delta.abs() > threshold).float()
        mask[0] = 0.0  # the source row is not edited (its difference is zero under NPI)
        self.edit_masks.append(mask)
        return eps_u + guidance_scale * soft_threshold(delta, threshold)

    def after_step(self, i, z):
        t = int(self.timesteps[i])
        recon_t = int(self.prox["recon_t"])
        if self.edit_masks and ((recon_t > 0 and t < recon_t) or (recon_t < 0 and t > -recon_t)):
            target = self.trajectory[len(self.trajectory) - 2 - i].to(z)
            keep = 1 - self.edit_masks[-1]  # pull back only where the edit is inactive
            z = z - float(self.prox["recon_lr"]) * (z - target) * keep
        return z


class NegativePromptInversion(InversionMethod):
    name = "npi"
    paper = "Miyake et al., Negative-prompt Inversion (2023)"
    defaults = "DDIM inversion; source-prompt embedding as the unconditional one when editing; no optimisation"

    def invert(self, ctx: MethodContext) -> Inversion:
        return npi_inversion(ctx)

    def edit_hooks(self, ctx: MethodContext, inv: Inversion) -> EditHooks:
        return NegativePromptHooks()


class ProximalNegativePromptInversion(InversionMethod):
    name = "proxnpi"
    paper = "Han et al., Improving Negative-Prompt Inversion via Proximal Guidance (ProxEdit, 2023)"
    defaults = ("NPI + soft-thresholded guidance (prox_quantile=0.7) + reconstruction guidance "
                "(prox_recon_lr=0.1 for timesteps < prox_recon_t=400)")
    options = (MethodOption("prox_quantile", 0.7, minimum=0.0, maximum=1.0),
               MethodOption("prox_recon_lr", 0.1, minimum=0.0, maximum=1.0),
               MethodOption("prox_recon_t", 400, minimum=-1000, maximum=1000))

    def invert(self, ctx: MethodContext) -> Inversion:
        return proxnpi_inversion(ctx)

    def edit_hooks(self, ctx: MethodContext, inv: Inversion) -> EditHooks:
        return ProximalGuidanceHooks(inv.extras["prox"], inv.extras["timesteps"], inv.trajectory)
