"""Editing a text-to-image generation instead of a real image: z_T is sampled from a seed.

The "inversion" ``generated`` draws z_T ~ N(0, I) with ``generated_seed`` (0; or from the caller's
generator; the UNet's latent shape),
and z0 is the guided generation of the source prompt from it (guidance 7.5). Every attention edit
(p2p, fpe, masactrl, pnp, word_swap) then runs from z_T exactly as for an inverted image; the input
image of the context is ignored.
"""
from __future__ import annotations

import torch

from ..defaults import MAX_SEED
from ..editing import EditSpec
from ..encoders import encode_prompts
from ..models import ModelBundle
from ..sampling import guided_sampling
from .common import option
from .registry import Inversion, InversionMethod, MethodContext, MethodOption, MethodOutput, run_method


def latent_shape(bundle: ModelBundle) -> tuple[int, ...]:
    cfg = bundle.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
    return (1, cfg.in_channels, *size)


def seeded_latent(bundle: ModelBundle, seed: int) -> torch.Tensor:
    return torch.randn(latent_shape(bundle), generator=torch.Generator().manual_seed(seed)).to(bundle.device)


def generated_inversion(ctx: MethodContext) -> Inversion:
    b = ctx.bundle
    seed = option(ctx, "generated_seed")
    z_T = ctx.randn(latent_shape(b), seed).to(b.device)
    z0 = guided_sampling(b, ctx.schedule, z_T, encode_prompts(b, [ctx.source]), encode_prompts(b, [""]),
                         ctx.train_cfg.guidance_scale, progress=ctx.progress,
                         step_callback=ctx.after_step)
    # With the caller's generator the seed option did not choose z_T: the metadata says so (None).
    return Inversion("generated", z0, z_T, metadata={"seed": seed if ctx.generator is None else None,
                                                     "prompt": ctx.source})


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
    options = (MethodOption("generated_seed", 0, minimum=0, maximum=MAX_SEED),)
    denoising_steps = True

    def invert(self, ctx: MethodContext) -> Inversion:
        return generated_inversion(ctx)
