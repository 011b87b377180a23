"""Null-text inversion (Mokady et al., CVPR 2023): per-step optimised unconditional embeddings.

DDIM inversion with the source prompt (guidance 1) gives z*_0..z*_T. Then, from z~_T = z*_T, for
sampling step i (0 = noisiest): eps_c once without grad; the unconditional embedding u_i (warm-started
from u_{i-1}, u_{-1} = embedding of "") gets up to ``nulltext_iterations`` (10) Adam steps,
lr 1e-2 (1 - i/100), minimising MSE(DDIM step with eps_u(u_i) + w (eps_c - eps_u(u_i)), z*_{t-1});
early stop when the loss < 1e-5 + 2e-5 i; then z~_{t-1} = the step with the final u_i.

Option ``nulltext_attention_loss`` (StyleDiffusion's ablation, paper Fig. 15): adds the attention loss
to the objective. u_i only changes the unconditional branch, so the term that has a gradient is the
MSE between the unconditional branch's mid-low cross-attention maps and the maps A*_i recorded by the
inversion; this is the implementation of that ablation here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attention_control import BatchLayout, CrossAttentionRecorder, controlled, install_attention_control
from ..ddim import guided
from ..editing import EditHooks
from ..encoders import encode_latent, encode_prompts
from ..sampling import ddim_inversion, predict
from ..training import attention_loss, early_stop_threshold, gradient_scaler, step_lr
from .common import checkpointed, option
from .registry import Inversion, InversionMethod, MethodContext, MethodOption


def nulltext_optimise(ctx: MethodContext, iterations: int = 10, lr: float = 1e-2, att_loss: bool = False):
    """(z0, z*_T, [u_0..u_{T-1}], final losses, cond)."""
    b, schedule, T = ctx.bundle, ctx.schedule, ctx.num_steps
    w = ctx.train_cfg.guidance_scale
    z0 = encode_latent(b, ctx.image)
    cond = encode_prompts(b, [ctx.source])
    traj = ddim_inversion(b, schedule, z0, cond, record_maps=att_loss, progress=ctx.progress)
    state = install_attention_control(b.unet)
    recorder = CrossAttentionRecorder(keep_grad=True)
    layout = BatchLayout.single()  # one row at a time; the recorder reads the row it is given
    u = encode_prompts(b, [""])
    z = traj.z_T
    embeddings, losses = [], []
    scaler = gradient_scaler(b)
    for i in tqdm(range(T), desc="Null-text inversion", disable=not ctx.progress, leave=False):
        target = traj.target_for_step(i)
        reference = traj.maps.get(i, []) if att_loss else []
        with torch.no_grad():
            eps_c = predict(b, schedule, z, i, cond, layout)
        u = u.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([u], lr=step_lr(lr, i))
        loss_value = float("nan")
        for _ in range(iterations):
            recorder.reset()
            with torch.enable_grad(), controlled(state, recorder if reference else None):
                eps_u = predict(b, schedule, z, i, u, layout)
                z_prev = schedule.sample_step(guided(eps_u, eps_c, w), z, i)
                loss = F.mse_loss(z_prev, target)
                if reference:
                    loss = loss + attention_loss(recorder.maps.get(i, []), reference)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_value = loss.item()
            if loss_value < early_stop_threshold(i):
                break
        u = u.detach()
        recorder.reset()
        embeddings.append(u.clone())
        losses.append(loss_value)
        with torch.no_grad():
            eps_u = predict(b, schedule, z, i, u, layout)
            z = schedule.sample_step(guided(eps_u, eps_c, w), z, i)
    return z0, traj.z_T, embeddings, losses, cond


def nulltext_inversion(ctx: MethodContext) -> Inversion:
    iterations = option(ctx, "nulltext_iterations")
    att = option(ctx, "nulltext_attention_loss")
    settings = {"iterations": iterations, "lr": 1e-2, "attention_loss": att,
                "guidance_scale": ctx.train_cfg.guidance_scale}

    def compute():
        z0, z_T, embeddings, losses, _ = nulltext_optimise(ctx, iterations, att_loss=att)
        return Inversion("nulltext", z0, z_T, uncond_embeddings=embeddings,
                         metadata={"final_losses": [float(f"{x:.4g}") for x in losses]})

    return checkpointed(ctx, "nulltext", settings, compute).to(ctx.bundle.device)


class NullTextHooks(EditHooks):
    """Both unconditional rows use the optimised embedding u_i of step i."""

    def __init__(self, embeddings: list[torch.Tensor]):
        self.embeddings = embeddings

    def text(self, i, text):
        return torch.cat([self.embeddings[i].to(text).expand(2, -1, -1), text[2:]])


class NullTextInversion(InversionMethod):
    name = "nulltext"
    paper = "Mokady et al., Null-text Inversion for Editing Real Images (CVPR 2023)"
    defaults = (
        "T from --num_ddim_steps (paper 50), guidance 7.5, <=10 Adam iterations/step, lr 1e-2(1-i/100), "
        "early stop 1e-5+2e-5 i; options nulltext_iterations=10, nulltext_attention_loss=false (StyleDiffusion "
        "ablation, Fig. 15); with --edit p2p and tau_u>0 it is the paper's 'Null-text + P2Plus' ablation (Fig. 14)"
    )
    options = (MethodOption("nulltext_iterations", 10, minimum=0, maximum=10_000),
               MethodOption("nulltext_attention_loss", False))

    def invert(self, ctx: MethodContext) -> Inversion:
        return nulltext_inversion(ctx)

    def edit_hooks(self, ctx: MethodContext, inv: Inversion) -> EditHooks:
        return NullTextHooks(inv.uncond_embeddings)
