"""SPDInv (Li et al., "Source Prompt Disentangled Inversion for Boosting Image Editability with
Diffusion Models", ECCV 2024).

A DDIM inversion step approximates the noise at z_t by the noise at z_{t-1}. SPDInv instead looks,
at every step, for a fixed point of the exact step
    f(z) = invert_step(eps(z, t, c_src), z_{t-1}),     z_t = f(z_t),
starting from the plain DDIM step and running AdamW on the latent (``spdinv_rounds`` <= 25, lr 1e-3)
on the loss MSE(z, f(z)) until it is below 5e-6; the best latent seen is kept. A DDIM sampling step
with the conditional noise then lands back on z_{t-1}, so editing is NPI-style: the source prompt's
embedding is the unconditional embedding of both rows.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attention_control import BatchLayout
from ..editing import EditHooks
from ..encoders import encode_latent, encode_prompts
from ..sampling import predict
from ..training import gradient_scaler
from .common import checkpointed, option, stack, unstack
from .npi import NegativePromptHooks
from .registry import Inversion, InversionMethod, MethodContext, MethodOption


def fixed_point_map(ctx: MethodContext, schedule, cond: torch.Tensor, z_prev: torch.Tensor, i: int, z: torch.Tensor):
    """f(z) = invert_step(eps(z, t_i), z_prev): the inversion step with the noise taken at z itself."""
    return schedule.invert_step(predict(ctx.bundle, schedule, z, i, cond, BatchLayout.single()), z_prev, i)


@torch.no_grad()
def fixed_point_residual(ctx: MethodContext, schedule, cond, z_prev, z, i) -> float:
    """MSE(z, f(z)) for the latent z of sampling step i inverted from z_prev."""
    return F.mse_loss(z, fixed_point_map(ctx, schedule, cond, z_prev, i, z)).item()


def spd_inversion(ctx: MethodContext, rounds: int = 25, lr: float = 1e-3, tol: float = 5e-6):
    """z*_0..z*_T (fixed points) and, per sampling step i, (DDIM-initial residual, final residual)."""
    b, schedule, T = ctx.bundle, ctx.schedule, ctx.num_steps
    z0 = encode_latent(b, ctx.image)
    cond = encode_prompts(b, [ctx.source])
    latents, z = [z0], z0
    initial, final = [0.0] * T, [0.0] * T
    scaler = gradient_scaler(b)
    for i in tqdm(range(T - 1, -1, -1), desc="SPDInv", disable=not ctx.progress, leave=False):
        with torch.no_grad():
            start = schedule.invert_step(predict(b, schedule, z, i, cond, BatchLayout.single()), z, i)
        x = start.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([x], lr=lr)
        best, best_loss = start, None
        for r in range(rounds + 1):
            with torch.enable_grad():
                loss = F.mse_loss(x, fixed_point_map(ctx, schedule, cond, z, i, x))
            value = loss.item()
            if r == 0:
                initial[i] = value
            if best_loss is None or value < best_loss:
                best, best_loss = x.detach().clone(), value
            if value < tol or r == rounds:
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        final[i] = best_loss
        z = best
        latents.append(z)
    return latents, initial, final


def spdinv_inversion(ctx: MethodContext) -> Inversion:
    rounds = option(ctx, "spdinv_rounds")
    settings = {"rounds": rounds, "lr": 1e-3, "tol": 5e-6}

    def compute():
        latents, initial, final = spd_inversion(ctx, rounds)
        return Inversion("spdinv", latents[0], latents[-1], trajectory=list(latents),
                         metadata={"residual_initial": initial, "residual_final": final})

    inv = checkpointed(ctx, "spdinv", settings, compute)
    traj = unstack(stack(inv.trajectory), ctx.bundle.device)  # one tensor on the device, a view per step
    return replace(inv, z0=traj[0], z_T=traj[-1], trajectory=traj)


class SourcePromptDisentangledInversion(InversionMethod):
    name = "spdinv"
    paper = "Li et al., Source Prompt Disentangled Inversion (SPDInv, ECCV 2024)"
    defaults = ("fixed point per step by AdamW on the latent: spdinv_rounds=25, lr 1e-3, stop at MSE<5e-6; "
                "NPI-style editing (source prompt as the unconditional embedding)")
    options = (MethodOption("spdinv_rounds", 25, minimum=0, maximum=10_000),)

    def invert(self, ctx: MethodContext) -> Inversion:
        return spdinv_inversion(ctx)

    def edit_hooks(self, ctx: MethodContext, inv: Inversion) -> EditHooks:
        return NegativePromptHooks()
