"""Style transfer with StyleDiffusion (the paper's §5.2.7, Fig. 20), on Plug-and-Play's feature injection.

The paper: StyleDiffusion is first trained to reconstruct the STYLE image (its mapping networks M_t are
the style); the CONTENT image is DDIM-inverted and sampled again, and the spatial features of its
decoder layers on the way are injected into the corresponding layers of the style's model, which
samples with its learned values. No optimisation on the content image. The paper names neither the
features, nor the layers, nor the steps; the defaults here are Plug-and-Play's (Tumanyan et al.,
CVPR 2023, ``pnp_utils.py``):

- the residual features (the output of ``conv2``, before the skip is added) of the second ResNet of
  the first decoder block at latent/``transfer_feature_downscale`` (4: SD1's ``up_blocks[1].resnets[1]``),
  for the first ``transfer_feature_fraction`` (0.8) of the steps;
- the self-attention queries and keys (= the maps; the values stay the transfer's own) of every
  decoder self-attention layer at latent/``transfer_attention_downscale`` (4) or finer but the first
  (SD1: ``up_blocks[1].attentions[1, 2]`` and all of ``up_blocks[2, 3]``), for the first
  ``transfer_attention_fraction`` (0.5) of the steps;
- both injected into both guidance branches, each from the content row of the same branch.

One batch, rows [uncond content, uncond transfer, cond content, cond transfer] (``BatchLayout.guided(2)``,
prompt 0 = content, prompt 1 = transfer). The content row is the content's own DDIM sampling: at every
step its latent is put back on the content's inversion trajectory (z*_t, as PnP loads its saved
inverted latents), so its features are those of the content's own trajectory whatever the guidance does.
The transfer row starts from the content's z*_T (as PnP) and uses the style prompt; its conditional
cross-attention takes the style's learned values M_i(E(style), c_style) for the first
``transfer_value_fraction`` (1.0) of the steps. The injection reuses the ``pnp`` edit's machinery
(``methods.attention_edits``: the map-copying controller and the forward hook registered on one module
for the call and removed afterwards).
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .attention_control import (
    AttentionController,
    BatchLayout,
    controlled,
    install_attention_control,
)
from .ddim import DDIMSchedule, guided
from .defaults import GUIDANCE_SCALE
from .editing import EditSpec, num_steps_for, run_edit, value_steps_for
from .encoders import encode_latent, encode_prompts
from .errors import UserError
from .image_io import image_grid
from .methods.attention_edits import (
    PlugAndPlayAttention,
    decoder_downscales,
    feature_injection,
    transformer_layers,
)
from .methods.common import learned_embedding
from .methods.registry import MethodOption
from .models import ModelBundle
from .outputs import EditOutput, to_pil
from .results import Inversion
from .sampling import ddim_inversion, predict
from .training import embedding_inputs

# The inversions whose learned values can carry a style (their ``mappers`` map E(style) to value inputs).
STYLE_INVERSIONS = ("stylediffusion",)

# The one place for the defaults: keyword options of ``transfer_style`` and ``--method_option`` values of the
# command line's style-transfer mode.
TRANSFER_OPTIONS = (
    MethodOption("transfer_feature_fraction", 0.8, minimum=0.0, maximum=1.0),
    MethodOption("transfer_attention_fraction", 0.5, minimum=0.0, maximum=1.0),
    MethodOption("transfer_feature_downscale", 4, minimum=1, maximum=1024),
    MethodOption("transfer_attention_downscale", 4, minimum=1, maximum=1024),
    MethodOption("transfer_value_fraction", 1.0, minimum=0.0, maximum=1.0),
    MethodOption("transfer_feature_layers", "one", choices=("one", "finer")),
    MethodOption("transfer_attention_layers", "decoder", choices=("decoder", "all")),
)


def transfer_options(options: dict) -> dict:
    """Every transfer option, the caller's value checked and converted, or its default; an unknown name
    is one line naming those there are."""
    declared = {o.name: o for o in TRANSFER_OPTIONS}
    unknown = [k for k in options if k not in declared]
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a style-transfer option (options: "
                        f"{', '.join(o.describe() for o in TRANSFER_OPTIONS)}).")
    return {name: opt.default if options.get(name) is None else opt.convert(options[name])
            for name, opt in declared.items()}


def feature_modules(unet, downscale: int, layers: str = "one") -> list:
    """The injected residuals (each ResNet's ``conv2`` output): ``"one"`` = the second ResNet of the first
    decoder block at latent/downscale (PnP's); ``"finer"`` = every decoder ResNet from there on (that
    level and the finer ones)."""
    levels = decoder_downscales(unet)
    if downscale not in levels:
        raise UserError(f"transfer_feature_downscale={downscale}: this model's decoder runs at latent/"
                        f"{', latent/'.join(str(d) for d in sorted(set(levels), reverse=True))}; pick one of these.")
    first = levels.index(downscale)
    block = unet.up_blocks[first]
    if layers == "one":
        return [block.resnets[min(1, len(block.resnets) - 1)].conv2]
    return [r.conv2 for b in unet.up_blocks[first:] for r in b.resnets]


def encoder_downscales(unet) -> list[int]:
    """For each encoder block, the downscale its layers run at (SD1: 1, 2, 4, 8); the mid block runs at the last
    block's output (``mid_downscale``)."""
    downs = list(unet.down_blocks)
    return [2 ** sum(1 for b in downs[:k] if getattr(b, "downsamplers", None)) for k in range(len(downs))]


def mid_downscale(unet) -> int:
    return 2 ** sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))


def attention_layers(unet, downscale: int, which: str = "decoder") -> set[int]:
    """Self-attention layers at latent/downscale or finer: ``"decoder"`` = the decoder's but the first of them
    (PnP's choice); ``"all"`` = every one, encoder, mid and decoder."""
    levels = {"up_blocks": decoder_downscales(unet), "down_blocks": encoder_downscales(unet)}
    chosen = []
    for idx, name in transformer_layers(unet):
        part, _, rest = name.partition(".")
        if part == "mid_block":
            level = mid_downscale(unet)
        elif part in levels:
            level = levels[part][int(rest.split(".")[0])]
        else:
            continue
        if level <= downscale and (which == "all" or part == "up_blocks"):
            chosen.append((part == "up_blocks", idx))
    decoder = [idx for is_up, idx in chosen if is_up]
    if which == "decoder":
        return set(decoder[1:])
    return {idx for _, idx in chosen}


def check_style_inversion(inv) -> None:
    """One line when ``inv`` cannot give a style: not an Inversion, not StyleDiffusion's, or incomplete."""
    if not isinstance(inv, Inversion):
        raise UserError(f"style transfer needs the style image's StyleDiffusion inversion (editor.invert(style_image, "
                        f"style_prompt) or Inversion.load), got {type(inv).__name__}.")
    if inv.method not in STYLE_INVERSIONS:
        raise UserError(f"style transfer needs a StyleDiffusion inversion of the style image (its learned values are "
                        f"the style); this one is {inv.method!r}: invert the style image with method='stylediffusion'.")
    if inv.mappers is None or inv.image_features is None or inv.source is None or inv.num_steps is None:
        raise UserError("this StyleDiffusion inversion lacks its mapping networks, image features, prompt or T: "
                        "make it with editor.invert (or load it with Inversion.load).")
    if len(inv.mappers) != inv.num_steps:
        raise UserError(
            f"this StyleDiffusion inversion holds {len(inv.mappers)} mapping networks for T={inv.num_steps}: "
            f"it is damaged; invert the style image again."
        )


@dataclass
class TransferResult:
    latents: torch.Tensor  # (2, C, h, w): the content row (its own trajectory's end) and the transfer
    reconstruction: torch.Tensor | None  # (1, C, h, w): the style's plain StyleDiffusion reconstruction
    seconds: float = 0.0


@dataclass
class TransferOutput(EditOutput):
    """``StyleDiffusionEditor.transfer_style``'s result: an ``EditOutput`` whose ``images[0]`` is the transfer,
    ``input_image`` the content, ``reconstruction`` the style's own reconstruction."""

    style_image: Image.Image | np.ndarray | torch.Tensor | None = None  # in the call's output_type
    options: dict = field(default_factory=dict)

    def grid(self) -> Image.Image:
        """content | style | transfer (the paper's Fig. 20), a PIL image whatever the output_type."""
        if self.input_image is None:
            raise UserError("grid() needs decoded pictures: this output holds latents (output_type='latent').")
        style = self.style_image if self.style_image is not None else self.reconstruction
        return transfer_grid(*(to_pil(p) for p in (self.input_image, style, self.images[0])))


@torch.no_grad()
def transfer_latents(bundle: ModelBundle, schedule: DDIMSchedule, style: Inversion, content_z0: torch.Tensor,
                     content_prompt: str, options: dict, guidance_scale: float = GUIDANCE_SCALE,
                     progress: bool = True) -> torch.Tensor:
    """The transfer: (2, C, h, w) [content row, transfer row] (see the module's docstring).

    ``transfer_value_fraction=0`` is the no-learned-values baseline (the style prompt alone)."""
    unet, T = bundle.unet, schedule.num_steps
    content_cond = encode_prompts(bundle, [content_prompt])
    trajectory = ddim_inversion(bundle, schedule, content_z0, content_cond, record_maps=False, progress=progress)
    state = install_attention_control(unet)
    layout = BatchLayout.guided(2)
    style_cond = encode_prompts(bundle, [style.source])
    uncond = encode_prompts(bundle, [""])
    text = torch.cat([uncond, uncond, content_cond, style_cond])
    mappers = style.mappers.to(bundle.device).eval()
    features = style.image_features.to(bundle.device)
    embedding = learned_embedding(style)
    value_steps = value_steps_for(options["transfer_value_fraction"], T)
    controller = PlugAndPlayAttention(num_steps_for(options["transfer_attention_fraction"], T),
                                      attention_layers(unet, options["transfer_attention_downscale"],
                                                       options["transfer_attention_layers"]))
    modules = feature_modules(unet, options["transfer_feature_downscale"], options["transfer_feature_layers"])
    feature_steps = num_steps_for(options["transfer_feature_fraction"], T)
    z = trajectory.z_T.expand(2, -1, -1, -1).clone()
    with controlled(state, controller), ExitStack() as hooks:
        for module in modules:
            hooks.enter_context(feature_injection(unet, module, feature_steps))
        for i in tqdm(range(T), desc="style transfer", disable=not progress, leave=False):
            inputs = {}
            if i < value_steps:
                learned = torch.cat([text[:3], mappers[i](features, style_cond)])
                inputs = embedding_inputs(embedding, learned)
            eps_u, eps_c = predict(bundle, schedule, torch.cat([z, z]), i, text, layout, **inputs).chunk(2)
            z = schedule.sample_step(guided(eps_u, eps_c, guidance_scale), z, i)
            z[0] = trajectory.target_for_step(i)[0]  # the content row stays on its own trajectory
    return z


@torch.no_grad()
def style_reconstruction(
    bundle: ModelBundle,
    schedule: DDIMSchedule,
    style: Inversion,
    guidance_scale: float = GUIDANCE_SCALE,
    progress: bool = True,
) -> torch.Tensor:
    """The style image regenerated from its own z*_T with its learned values: (1, C, h, w)."""
    spec = EditSpec(style.source, style.source, guidance_scale=guidance_scale)
    result = run_edit(bundle, schedule, style.z_T, spec, mappers=style.mappers.to(bundle.device),
                      image_features=style.image_features.to(bundle.device), controller=AttentionController(),
                      progress=progress, embedding=learned_embedding(style))
    return result.latents[:1]


def check_sizes(style: Inversion, content_z0: torch.Tensor) -> None:
    if tuple(style.z_T.shape[-3:]) != tuple(content_z0.shape[-3:]):
        raise UserError(f"the style inversion's latent is {tuple(style.z_T.shape[-3:])} and the content image's "
                        f"{tuple(content_z0.shape[-3:])}: invert the style image at this model's size "
                        f"({content_z0.shape[-1]}x{content_z0.shape[-2]} latent) with this editor.")


def run_style_transfer(bundle: ModelBundle, style: Inversion, content_pixels: torch.Tensor,
                       content_prompt: str | None, options: dict, guidance_scale: float = GUIDANCE_SCALE,
                       progress: bool = True, reconstruction: bool = True) -> TransferResult:
    """Checked inputs to latents: the transfer and (``reconstruction``) the style's own reconstruction."""
    check_style_inversion(style)
    style = style.to(bundle.device)
    schedule = DDIMSchedule(bundle.scheduler, style.num_steps)
    content_z0 = encode_latent(bundle, content_pixels)
    check_sizes(style, content_z0)
    t0 = time.perf_counter()
    latents = transfer_latents(bundle, schedule, style, content_z0, content_prompt or "", options, guidance_scale,
                               progress)
    recon = style_reconstruction(bundle, schedule, style, guidance_scale, progress) if reconstruction else None
    return TransferResult(latents, recon, time.perf_counter() - t0)


def transfer_grid(content: Image.Image, style: Image.Image, transfer: Image.Image) -> Image.Image:
    """The paper's Fig. 20 layout: content | style | transfer."""
    return image_grid([content, style, transfer], ["content", "style", "transfer"])
