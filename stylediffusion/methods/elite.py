"""SPDInv + ELITE: edit an inverted image towards a prompt with a placeholder word (``a photo of a white *``)
whose meaning is a visual concept encoded from a reference image by ELITE (Wei et al., ICCV 2023).

As SPDInv's ``run_SPDInv_ELITE.py`` does: invert the source image (SPDInv by default, any inversion
allowed), then run a Prompt-to-Prompt edit from z*_T whose target row's text embedding has ELITE's
primary word (word 0 of the global mapping network, from the reference image, by default the source
image itself) at the placeholder's token. On top of that, as ELITE's own inference does:
- the target rows' cross-attention keys and values come from ELITE's fine-tuned projections stored
  in the global mapper file (``elite_projections=elite``; ``unet`` keeps the UNet's own, which is what
  SPDInv's script ends up doing, since its Prompt-to-Prompt forward uses ``to_k``/``to_v``); the source
  rows always keep the UNet's, so the reconstruction follows the inversion;
- with a local mapper (``elite_local``) and an object mask (``elite_mask``), the conditional target
  row gets ELITE's local values in every cross-attention layer, weighted by lambda (``elite_lambda``,
  0.8 in ELITE's inference script) and by the placeholder's own attention map.
Networks, weight files and the attention parts: ``stylediffusion/elite.py``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .. import elite
from ..attention_control import COND, BatchLayout
from ..editing import EditHooks, EditSpec, build_controller, run_edit
from ..encoders import decode_latent
from ..errors import UserError
from ..image_io import load_image
from .common import option
from .registry import OPTIONS, EditMethod, Inversion, MethodContext, MethodOption, MethodOutput, edit_loop_inputs

TARGET_ROW = BatchLayout.guided(2).row(COND, 1)
_LOADED: dict = {}  # the last loaded ELITE components, by (files, encoder, device, dtype)


class EliteHooks(EditHooks):
    """The inversion's hooks, plus: the conditional target row's text is the one with ELITE's word, and the
    attention controller is told each step's text (the target rows' keys and values come from it)."""

    def __init__(self, inner: EditHooks | None, target_text: torch.Tensor, controller: elite.EliteAttention):
        self.inner, self.target_text, self.controller = inner or EditHooks(), target_text, controller

    def text(self, i, text):
        text = self.inner.text(i, text).clone()
        text[TARGET_ROW] = self.target_text[0].to(text)
        self.controller.step_text = text
        return text

    def guide(self, i, eps_u, eps_c, z, guidance_scale):
        return self.inner.guide(i, eps_u, eps_c, z, guidance_scale)

    def after_step(self, i, z):
        return self.inner.after_step(i, z)


class UNetProjections:
    """The UNet's own cross-attention key/value projections, by the authors' layer names (used when the
    loop replaces value inputs, e.g. after a StyleDiffusion inversion, so the target rows still read the
    concept word)."""

    def __init__(self, unet):
        self.modules = {elite.projection_name(name): m for name, m in unet.named_modules() if name.endswith("attn2")}

    def projection(self, layer: str, which: str):
        return getattr(self.modules[layer], f"to_{which}")


def _value(options: dict, name: str):
    value = options.get(name)
    return OPTIONS[name].default if value is None else value


def _image_file(path: str, flag: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{flag} '{path}' {'is a folder' if file.is_dir() else 'does not exist'}: pass an image file.")
    load_image(file, 8)  # unreadable, truncated, decompression bomb: one line here, before any work


def check_elite_inputs(spec: EditSpec, options: dict) -> None:
    """Everything about ELITE's inputs that needs no model: the weight files, the images, the placeholder."""
    global_file = _value(options, "elite_global")
    if not global_file:
        raise UserError("--edit elite needs ELITE's global mapper: convert the authors' global_mapper.pt once with "
                        "'python -m stylediffusion.convert_elite global_mapper.pt elite_global.safetensors' and pass "
                        "--elite_global elite_global.safetensors.")
    elite.check_mapper_file(global_file, "global", "--elite_global")
    local_file, mask = _value(options, "elite_local"), _value(options, "elite_mask")
    if local_file:
        elite.check_mapper_file(local_file, "local", "--elite_local")
        if not mask:
            raise UserError("--elite_local needs --elite_mask: a black-and-white image of the reference's object "
                            "(white = object), as ELITE's local mapping reads only the object's patches.")
    elif mask:
        raise UserError("--elite_mask is only read by ELITE's local mapper: pass --elite_local too, or drop the mask.")
    if _value(options, "elite_reference"):
        _image_file(_value(options, "elite_reference"), "--elite_reference")
    if mask:
        _image_file(mask, "--elite_mask")
    placeholder = _value(options, "elite_placeholder")
    if not placeholder.strip() or len(placeholder.split()) != 1:
        raise UserError(f"--elite_placeholder {placeholder!r} must be one word, e.g. '*' or 'S'.")
    words = [w.lower() for w in spec.target.split()]
    if placeholder.lower() not in words:
        raise UserError(f"the target prompt {spec.target!r} has no placeholder word {placeholder!r}: ELITE puts the "
                        f"reference's concept there (e.g. 'a photo of a white {placeholder}').")


def load_components(ctx: MethodContext) -> dict:
    """ELITE's networks and image encoder for this model, loaded once per files/device/dtype and checked
    against the model (text width, cross-attention layers)."""
    b = ctx.bundle
    files = tuple((p, Path(p).stat().st_mtime_ns) if p else None
                  for p in (option(ctx, "elite_global"), option(ctx, "elite_local")))
    key = (files, option(ctx, "elite_image_encoder"), str(b.device), b.dtype, id(b.unet))
    if key not in _LOADED:
        _LOADED.clear()
        encoder = elite.load_image_encoder(option(ctx, "elite_image_encoder"), b.device, b.dtype)
        width = int(encoder.config.hidden_size)
        parts = {"encoder": encoder, "local": None, "features": {}}
        for kind, flag in (("global", "--elite_global"), ("local", "--elite_local")):
            path = option(ctx, f"elite_{kind}")
            if path:
                mapper = elite.read_mapper(path, kind, flag)
                elite.check_fits(mapper, b, flag, width)
                parts[kind] = mapper.to(device=b.device, dtype=b.dtype)
        _LOADED[key] = parts
    return _LOADED[key]


def _reference(ctx: MethodContext, inv: Inversion) -> torch.Tensor:
    path = option(ctx, "elite_reference")
    if path:
        return load_image(Path(path), ctx.bundle.image_size)[0]
    if ctx.image is not None:
        return ctx.image
    return decode_latent(ctx.bundle, inv.z0)  # a generation: its own picture


# Hidden states of this many reference images are kept with the loaded encoder (an edit of several
# targets, or a demo session editing one image again, encodes its reference once).
MAX_CACHED_REFERENCES = 4


def reference_hidden_states(parts: dict, pixels: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The image encoder's selected hidden states of ``pixels``, computed once per picture (keyed by its
    bytes) and kept with the components they were computed by."""
    key = (hashlib.sha256(pixels.detach().float().cpu().numpy().tobytes()).hexdigest(), tuple(pixels.shape), dtype)
    cache = parts["features"]
    if key not in cache:
        if len(cache) >= MAX_CACHED_REFERENCES:
            cache.pop(next(iter(cache)))
        cache[key] = [h.to(dtype) for h in elite.image_hidden_states(parts["encoder"], pixels)]
    return cache[key]


@torch.no_grad()
def elite_edit(ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
    """(``run_method`` has checked the inputs through ``EliteEdit.check`` before any work.)"""
    b, T = ctx.bundle, ctx.num_steps
    parts = load_components(ctx)
    encoder, global_mapper = parts["encoder"], parts["global"]
    position = elite.placeholder_position(spec.target, option(ctx, "elite_placeholder"), b.tokenizer)
    reference = _reference(ctx, inv).to(b.device)
    features = reference_hidden_states(parts, reference, global_mapper.dtype)
    word = global_mapper(features)[0, option(ctx, "elite_word")]
    target_text = elite.encode_with_word(b, spec.target, position, word)
    local = None
    if parts["local"] is not None:
        mask = (load_image(Path(option(ctx, "elite_mask")), b.image_size)[0].mean(dim=1, keepdim=True) > 0)
        mask = mask.to(b.device)
        obj = (reference + 1) * mask - 1  # the object on black, as ELITE's reference images
        hidden = reference_hidden_states(parts, obj, parts["local"].dtype)
        tokens = parts["local"](hidden) * elite.patch_mask(mask, encoder).to(parts["local"].dtype)
        local = elite.LocalValues(tokens, parts["local"], float(option(ctx, "elite_lambda")))
    inputs = edit_loop_inputs(ctx, inv)
    projections = global_mapper if option(ctx, "elite_projections") == "elite" else (
        UNetProjections(b.unet) if inputs.get("mappers") is not None else None)
    controller = elite.EliteAttention(build_controller(spec, b.tokenizer, T), position, projections, local)
    inputs["hooks"] = EliteHooks(inputs.get("hooks"), target_text, controller)
    result = run_edit(b, ctx.schedule, inv.z_T, spec, controller=controller, progress=ctx.progress, **inputs)
    return MethodOutput(result.latents, inv, controller.average_maps())


class EliteEdit(EditMethod):
    name = "elite"
    paper = ("Wei et al., ELITE: Encoding Visual Concepts into Textual Embeddings (ICCV 2023); "
             "with SPDInv as in SPDInv's run_SPDInv_ELITE.py")
    defaults = ("needs elite_global (converted global_mapper.pt); placeholder '*', word 0, ELITE's projections; "
                "local mapper optional (elite_local + elite_mask, lambda 0.8); reference = the source image; "
                "Prompt-to-Prompt control (SPDInv's script: Refinement, tau_c .4, tau_s .6, T 50)")
    options = (MethodOption("elite_global", ""), MethodOption("elite_local", ""),
               MethodOption("elite_reference", ""), MethodOption("elite_mask", ""),
               MethodOption("elite_lambda", 0.8, minimum=0.0, maximum=20.0),
               MethodOption("elite_placeholder", "*"),
               MethodOption("elite_word", 0, minimum=0, maximum=elite.NUM_WORDS - 1),
               MethodOption("elite_projections", "elite", choices=("elite", "unet")),
               MethodOption("elite_image_encoder", elite.DEFAULT_IMAGE_ENCODER))
    default_inversion = "spdinv"
    families = ("SD 1.x",)
    family_reason = ("ELITE's mapping networks write a word into SD v1's one 768-wide CLIP text encoder and its "
                     "16 cross-attention layers; use an SD v1.x model (e.g. CompVis/stable-diffusion-v1-4).")

    def check(self, spec: EditSpec, options: dict) -> None:
        check_elite_inputs(spec, options)

    def edit(self, ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
        return elite_edit(ctx, inv, spec)
