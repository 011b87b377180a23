"""Editing a text-to-image generation instead of a real image: z_T is sampled from a seed.

The "inversion" ``generated`` draws z_T ~ N(0, I) with ``generated_seed`` (0; the UNet's latent shape),
and z0 is the guided generation of the source prompt from it (guidance 7.5). Every attention edit
(p2p, fpe, masactrl, pnp, word_swap) then runs from z_T exactly as for an inverted image; the input
image of the context is ignored.
"""
from __future__ import annotations

import torch

from ..editing import EditSpec
from ..encoders import encode_prompts
from ..models import ModelBundle
from ..sampling import guided_sampling
from .common import option
from .registry import Inversion, InversionMethod, MethodContext, MethodOption, MethodOutput, run_method


def seeded_latent(bundle: ModelBundle, seed: int) -> torch.Tensor:
    cfg = bundle.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
    z = torch.randn((1, cfg.in_channels, *size), generator=torch.Generator().manual_seed(seed))
    return z.to(bundle.device)


def generated_inversion(ctx: MethodContext) -> Inversion:
    b = ctx.bundle
    seed = option(ctx, "generated_seed")
    z_T = seeded_latent(b, seed)
    z0 = guided_sampling(b, ctx.schedule, z_T, encode_prompts(b, [ctx.source]), encode_prompts(b, [""]),
                         ctx.train_cfg.guidance_scale, progress=ctx.progress)
    return Inversion("generated", z0, z_T, metadata={"seed": seed, "prompt": ctx.source})


def edit_generated(bundle: ModelBundle, spec: EditSpec, edit: str = "p2p", seed: int = 0, num_steps: int = 50,
                   options: dict | None = None, progress: bool = False) -> MethodOutput:
    """Generate ``spec.source`` from ``seed`` and edit it into ``spec.target`` with ``edit``."""
    ctx = MethodContext(bundle, None, spec.source, num_steps, progress=progress,
                        options={**(options or {}), "generated_seed": seed})
    return run_method(ctx, spec, "generated", edit)


class GeneratedImage(InversionMethod):
    name = "generated"
    paper = "text-to-image generation from a seed (no inversion; P2P's synthetic-image setting)"
    defaults = "generated_seed=0; z0 = the guided generation of the source prompt"
    options = (MethodOption("generated_seed", 0, minimum=0, maximum=2**63 - 1),)

    def invert(self, ctx: MethodContext) -> Inversion:
        return generated_inversion(ctx)
