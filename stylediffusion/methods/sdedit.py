"""SDEdit (Meng et al., ICLR 2022), alone or after a StyleDiffusion inversion (paper Fig. 18).

The input latent z0 is noised to the level of sampling step i0 = T - int(strength T) (strength 0.5 by
default), z = sqrt(a) z0 + sqrt(1 - a) n with n ~ N(0, I) from ``sdedit_seed`` (0; or the caller's
generator), and both rows
(source prompt, target prompt) are denoised with classifier-free guidance from there. After a
StyleDiffusion inversion the conditional rows use the learned value inputs as in P2Plus: the source
row M_i(E(x), c_src) at every step, the target row M_i(E(x), c_tgt) for steps < tau_v T.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..attention_control import BatchLayout
from ..ddim import guided
from ..defaults import MAX_SEED
from ..editing import EditSpec, value_steps_for
from ..encoders import encode_prompts
from ..errors import UserError
from ..sampling import predict
from ..training import embedding_inputs
from .common import learned_embedding, option
from .registry import EditMethod, Inversion, MethodContext, MethodOption, MethodOutput


@torch.no_grad()
def sdedit(ctx: MethodContext, inv: Inversion, spec: EditSpec, strength: float = 0.5, seed: int = 0) -> torch.Tensor:
    if not 0.0 < strength <= 1.0:
        raise UserError(f"sdedit_strength = {strength} must be in (0, 1].")
    b, schedule, T = ctx.bundle, ctx.schedule, ctx.num_steps
    start = T - int(strength * T + 1e-9)
    z0 = inv.z0.to(b.device)
    noise = ctx.randn(z0.shape, seed).to(z0)
    a = schedule.alpha(start).to(z0) if start < T else torch.ones((), device=z0.device)
    z = (a.sqrt() * z0 + (1 - a).sqrt() * noise).expand(2, -1, -1, -1).clone()
    cond = encode_prompts(b, [spec.source, spec.target])
    uncond = encode_prompts(b, [""]).expand(2, -1, -1)
    text = torch.cat([uncond, cond])
    value_steps = value_steps_for(spec.tau_v, T)
    mappers, embedding = inv.mappers, learned_embedding(inv)
    if mappers is not None:
        mappers.to(b.device).eval()
    for i in tqdm(range(start, T), desc="SDEdit", disable=not ctx.progress, leave=False):
        values = None
        if mappers is not None:
            v_tgt = mappers[i](inv.image_features, cond[1:]) if i < value_steps else cond[1:]
            values = torch.cat([uncond, mappers[i](inv.image_features, cond[:1]), v_tgt])
        eps_u, eps_c = predict(b, schedule, torch.cat([z, z]), i, text, BatchLayout.guided(2),
                               **embedding_inputs(embedding, values)).chunk(2)
        z = ctx.after_step(i, schedule.sample_step(guided(eps_u, eps_c, spec.guidance_scale), z, i))
    return z


def sdedit_edit(ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
    z = sdedit(ctx, inv, spec, option(ctx, "sdedit_strength"), option(ctx, "sdedit_seed"))
    return MethodOutput(z, inv)


class SDEditEdit(EditMethod):
    name = "sdedit"
    paper = "Meng et al., SDEdit (ICLR 2022); with stylediffusion: the paper's Fig. 18 ablation"
    defaults = "sdedit_strength=0.5, sdedit_seed=0, guidance 7.5"
    options = (MethodOption("sdedit_strength", 0.5, minimum=0.0, maximum=1.0),
               MethodOption("sdedit_seed", 0, minimum=0, maximum=MAX_SEED))
    defined_for = ("ddim", "stylediffusion")

    def edit(self, ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
        return sdedit_edit(ctx, inv, spec)
