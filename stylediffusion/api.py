"""The Python API: an editor over frozen Stable Diffusion components, ``invert`` then ``edit``.

    editor = StyleDiffusionEditor.from_pretrained("CompVis/stable-diffusion-v1-4", torch_dtype=torch.float16)
    inv = editor.invert(image, "a cat sitting on a chair")           # PIL image, path or array -> Inversion
    out = editor.edit(inv, "a tiger sitting on a chair", blend_words=("cat", "tiger"))
    out.images[0], out.reconstruction, out.attention_maps             # PIL images (output_type="pil")

In diffusers' shape: ``edit`` and ``transfer_style`` return ``BaseOutput``s (``outputs.EditOutput``)
and take ``output_type`` ("pil", "np", "pt", "latent"), ``return_dict``, ``generator`` and
``callback_on_step_end``; ``invert`` returns the ``Inversion`` itself (a value to save, load and
edit, not a picture) and takes ``generator``. Everything runs through the same internals as the
command line (``models``, the methods registry, ``editing.EditSpec``). Bad input raises
``UserError`` (a ``ValueError``) with the command line's messages; library messages go to
``logging`` (loggers under ``stylediffusion``); progress bars are tqdm's and can be switched off per
editor or per call.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import CLIPVisionModel

from . import families, validate
from .ddim import make_ddim_scheduler
from .defaults import GUIDANCE_SCALE, MAX_SEED, NUM_DDIM_STEPS, NUM_INNER_STEPS, TAU_C, TAU_S, TAU_U, TAU_V
from .editing import EditSpec, build_controller, default_edit_type
from .encoders import check_prompt_length, decode_latent
from .errors import UserError
from .image_io import load_image, prepare_image, tensor_to_pil
from .methods import INVERSIONS, MethodContext, get_edit, get_inversion, run_method
from .methods.registry import check_method_options
from .models import (
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_MODEL,
    ModelBundle,
    _missing_weights,
    check_device,
    execution_device,
    load_models,
    out_of_memory_as_user_error,
    resolve_dtype,
)
from .outputs import EditOutput, check_output_type, picture, pictures, pil_picture
from .results import Inversion
from .specs import entry_points
from .style_transfer import TransferOutput, check_style_inversion, run_style_transfer, transfer_options
from .training import TrainConfig
from .visualize import attention_figure

logger = logging.getLogger(__name__)

# Keyword options of ``invert`` that are training settings (``TrainConfig``) rather than method options.
_TRAIN_OPTIONS = ("lr", "attention_loss", "attention_weight", "early_stop", "warm_start")


# Keywords of older versions and of diffusers' removed per-step callback: refused with the one way to do it now.
_OLD_CALLBACKS = ("on_step", "callback", "callback_steps")


def _resolve_device(device) -> torch.device:
    return check_device(device)


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return resolve_dtype("auto" if dtype is None else str(dtype).removeprefix("torch."), device)


def _array_to_pil(array) -> Image.Image:
    """(H, W), (H, W, C) or torch (C, H, W) / (1, C, H, W) arrays, uint8 or float in [0, 1] -> PIL."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.permute(1, 2, 0)
        array = array.numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or min(array.shape[:2]) < 1:
        raise UserError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {tuple(array.shape)}.")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all() \
                or array.min() < 0 or array.max() > 1:
            raise UserError(f"an image array must be uint8, or float with values in [0, 1] (got {array.dtype}"
                            + (f", range [{array.min():.3g}, {array.max():.3g}])" if array.size else ")") + ".")
        array = (array * 255).round().astype(np.uint8)
    return Image.fromarray(array)


@entry_points("api")  # its messages name its keywords (edit_type=), not the command line's flags
class StyleDiffusionEditor:
    """Invert real images and edit them with text, on frozen Stable Diffusion v1.x/2.x or SDXL components."""

    def __init__(self, bundle: ModelBundle, progress: bool = True, _borrowed: bool = False, _pipe=None):
        self.bundle = bundle
        self.progress = progress
        self._borrowed = _borrowed  # components belong to the caller's pipeline: restore them after each call
        self._pipe = _pipe  # the borrowed pipeline (its offload hooks are reset after each call)

    # ------------------------------------------------------------------ construction
    # What callback_on_step_end may ask for in callback_kwargs (diffusers' ``_callback_tensor_inputs``).
    _callback_tensor_inputs = ["latents"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike = DEFAULT_MODEL,
                        image_encoder: str | None = None, device=None, torch_dtype=None, seed: int = 0,
                        progress: bool = True, vae: str | None = None, image_size: int | None = None, *,
                        model: str | None = None, dtype=None) -> "StyleDiffusionEditor":
        """Load a hub id or a local diffusers folder (or ``"testbed"``, ``"tiny"``) plus a CLIP vision tower.

        ``device``: None = CUDA if available, else the CPU. ``torch_dtype`` of the frozen UNet and
        encoders (a ``torch.dtype`` or its name): None = bfloat16 on GPUs with native bf16 (compute
        capability 8.0+), float16 on older GPUs, float32 on the CPU (``models.resolve_dtype``; mapping
        networks, DDIM math and losses stay float32). ``seed`` seeds the random weights of ``"tiny"``.
        ``vae``: a VAE hub id or folder in place of the model's (e.g. ``madebyollin/sdxl-vae-fp16-fix``),
        run in ``torch_dtype``; the model's own VAE runs in float32. ``image_size``: pixels to run at
        (default: the model's; 1024 for SDXL). ``dtype=`` is the same as ``torch_dtype=``: diffusers
        0.42 names it ``dtype`` and deprecates ``torch_dtype``, which most diffusers code still passes, so
        both are taken without a warning (not both at once). ``model=`` is the former name of
        ``pretrained_model_name_or_path``: still taken, with a deprecation warning.
        """
        if model is not None:
            if pretrained_model_name_or_path != DEFAULT_MODEL:
                raise UserError("from_pretrained got both pretrained_model_name_or_path and model=: pass "
                                "pretrained_model_name_or_path only (model= is its former name).")
            logger.warning("from_pretrained(model=...) is deprecated: pass pretrained_model_name_or_path "
                           "(the first argument), as in diffusers.")
            pretrained_model_name_or_path = model
        if dtype is not None:
            if torch_dtype is not None:
                raise UserError("from_pretrained got both torch_dtype= and dtype=: pass one of them (they are "
                                "the same setting; diffusers 0.42 calls it dtype).")
            torch_dtype = dtype
        device = _resolve_device(device)
        bundle = load_models(str(pretrained_model_name_or_path), image_encoder, device=device,
                             dtype=_resolve_dtype(torch_dtype, device), seed=seed, vae=vae, image_size=image_size)
        if bundle.untrained:
            logger.warning(
                "the 'tiny' model has random, untrained weights: outputs show the mechanics, not real edits."
            )
        return cls(bundle, progress=progress)

    @classmethod
    def from_pipe(cls, pipe, image_encoder=None, progress: bool = True) -> "StyleDiffusionEditor":
        """Edit with the components of a loaded ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``
        (shared, never copied; SDXL's second text encoder and ``force_zeros_for_empty_prompt`` come along).

        ``image_encoder``: a CLIP vision model (module), a hub id or folder to load one from, or None for
        the pipeline's own ``image_encoder`` if it has one, else ``openai/clip-vit-base-patch16``. During
        each call the borrowed modules are frozen and get this toolkit's attention processors; afterwards
        their processors, ``requires_grad`` flags and train/eval modes are put back as they were.
        A pipeline with ``enable_model_cpu_offload()`` / ``enable_sequential_cpu_offload()`` runs on its
        offload hooks' execution device (and is offloaded again after each call); a ``torch.compile``d
        UNet is used through the module it wraps.
        """
        missing = [name for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
                   if getattr(pipe, name, None) is None]
        # A torch.compile'd UNet (pipe.unet = torch.compile(pipe.unet)) is used through the module it wraps:
        # the toolkit's attention processors carry per-step Python state, which would recompile every step.
        unet = getattr(getattr(pipe, "unet", None), "_orig_mod", getattr(pipe, "unet", None))
        sdxl = isinstance(unet, UNet2DConditionModel) and families.family_of(unet.config).pooled_row
        if sdxl:
            missing += [name for name in ("text_encoder_2", "tokenizer_2") if getattr(pipe, name, None) is None]
        if missing or not isinstance(unet, UNet2DConditionModel):
            raise UserError(f"from_pipe needs a Stable Diffusion v1/v2 pipeline (vae, unet, text_encoder, tokenizer, "
                            f"scheduler) or an SDXL one (also text_encoder_2, tokenizer_2), got {type(pipe).__name__}"
                            + (f" without {', '.join(missing)}" if missing else "") + ".")
        if sdxl and pipe.vae.dtype == torch.float16 and pipe.vae.config.get("force_upcast", True):
            raise UserError("the pipeline's VAE is SDXL's in float16, which overflows: pipe.vae.to(torch.float32), or "
                            "load madebyollin/sdxl-vae-fp16-fix as the pipeline's vae, then call from_pipe again.")
        # Where the work runs: with model or sequential CPU offload the weights sit on the CPU (or the meta
        # device) between calls and accelerate's hooks run them on their execution device.
        device, dtype = execution_device(unet), unet.dtype
        encoder_id = "pipeline image_encoder"
        if image_encoder is None and isinstance(getattr(pipe, "image_encoder", None), torch.nn.Module):
            image_encoder = pipe.image_encoder
        if image_encoder is None or isinstance(image_encoder, (str, os.PathLike)):
            encoder_id = str(image_encoder or DEFAULT_IMAGE_ENCODER)
            image_encoder = _load_image_encoder(encoder_id).to(device=device, dtype=dtype)
        elif not isinstance(image_encoder, torch.nn.Module):
            raise UserError(f"image_encoder must be a CLIP vision model, a hub id or a folder, got "
                            f"{type(image_encoder).__name__}.")
        else:
            encoder_id = getattr(getattr(image_encoder, "config", None), "_name_or_path", "") or "given image_encoder"
            encoder_device = execution_device(image_encoder)
            if (encoder_device.type, encoder_device.index or 0) != (device.type, device.index or 0):
                raise UserError(f"the image encoder runs on {encoder_device} and the pipeline's UNet on {device}: "
                                f"move it there first (image_encoder.to('{device}')).")
        name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
        bundle = ModelBundle(vae=pipe.vae, unet=unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                             scheduler=make_ddim_scheduler(pipe.scheduler.config), image_encoder=image_encoder,
                             model_id=str(name or "pipeline"), image_encoder_id=encoder_id, device=device, dtype=dtype,
                             **_second_text_encoder(pipe) if sdxl else {})
        return cls(bundle, progress=progress, _borrowed=True, _pipe=pipe)

    # ------------------------------------------------------------------ the two calls
    def invert(
        self,
        image,
        prompt: str,
        method: str = "stylediffusion",
        num_inference_steps: int = NUM_DDIM_STEPS,
        num_inner_steps: int = NUM_INNER_STEPS,
        guidance_scale: float = GUIDANCE_SCALE,
        progress: bool | None = None,
        checkpoint: str | Path | None = None,
        seed: int | None = None,
        generator=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        **options,
    ) -> Inversion:
        """Invert ``image`` (a PIL image, a file path, or an array) described by ``prompt``.

        Returns the ``Inversion`` itself (not a ``BaseOutput``): a value to ``save``, ``load`` and pass to
        ``edit``; it holds no pictures, so there is no ``output_type`` / ``return_dict`` here.
        ``method``: any registered inversion (``stylediffusion.methods.INVERSIONS``); ``"generated"``
        takes ``image=None`` and generates the source from ``generated_seed``. ``num_inference_steps``
        is T, ``num_inner_steps`` StyleDiffusion's K. Other keywords: training settings (``lr``,
        ``attention_loss``, ``early_stop``) and method options (``variant="replace"``,
        ``embedding="key"``, ``nulltext_iterations=10``...; docs/methods.md). ``checkpoint``: a file
        where an optimising inversion is saved and resumed from, the command line's and
        ``Inversion.save``'s one format (None = in memory only). The global random state is left
        alone. What the method draws (the mapping networks' initial weights, ``generated``'s z_T)
        comes from ``generator`` (a ``torch.Generator``, which advances by what was drawn, or an int
        seed; a CPU generator seeded with s draws what ``seed=s`` does), else from ``seed`` (default 0)
        and the method's seed option.
        ``callback_on_step_end(editor, step_index, timestep, callback_kwargs)`` (diffusers' signature)
        is called after each denoising step of inversions that have them (``generated``).
        """
        inversion_method = get_inversion(method)
        _refuse_old_callbacks(options)
        for name in ("output_type", "return_dict"):
            if name in options:
                raise UserError(f"invert returns an Inversion (a value to save, load and edit), not pictures: "
                                f"{name}= is an argument of edit and transfer_style.")
        if not isinstance(num_inference_steps, int) or not isinstance(num_inner_steps, int) \
                or num_inference_steps < 1 or num_inner_steps < 1:
            raise UserError("num_inference_steps and num_inner_steps must be whole numbers of at least 1.")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("invert needs the source prompt: a caption of the image, e.g. 'a photo of a cat'.")
        check_prompt_length(self.bundle.tokenizer, prompt)
        limit = int(self.bundle.scheduler.config.num_train_timesteps)
        if num_inference_steps > limit:
            raise UserError(f"num_inference_steps {num_inference_steps} is more than the scheduler's {limit} training "
                            f"timesteps: use at most {limit}.")
        guidance_scale = validate.number(guidance_scale, "guidance_scale", minimum=0.0, maximum=validate.MAX_GUIDANCE)
        generator = _generator(generator)
        if generator is not None and seed is not None:
            raise UserError("invert got both seed= and generator=: pass one (generator=torch.Generator()"
                            ".manual_seed(s) draws what seed=s does).")
        seed = 0 if seed is None else validate.number(seed, "seed", minimum=0, maximum=MAX_SEED, integer=True)
        if callback_on_step_end is not None and not inversion_method.denoising_steps:
            raise UserError(f"invert with method={method!r} runs no denoising steps, so callback_on_step_end "
                            f"would never be called (the inversions that have them: "
                            f"{', '.join(n for n, m in INVERSIONS.items() if m.denoising_steps)}).")
        pixels = None
        if image is not None or method != "generated":
            pixels = self._pixels(image)
        cfg = TrainConfig(num_inner_steps=num_inner_steps, guidance_scale=float(guidance_scale),
                          **{k: options.pop(k) for k in _TRAIN_OPTIONS if k in options})
        options = check_method_options(options, method)
        _refuse_two_seeds(generator, options)
        progress = self.progress if progress is None else progress
        ctx = MethodContext(self.bundle, pixels, prompt, num_inference_steps, cfg,
                            None if checkpoint is None else Path(checkpoint), progress=progress, options=options)
        with self._lent(), self._random_state(generator, seed) as draws:
            ctx.generator = draws
            ctx.step_callback = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                                    ctx.schedule)
            inv = inversion_method.invert(ctx)
        return inv.record_origin(self.bundle, pixels, prompt, num_inference_steps, options)

    def edit(
        self,
        inversion: Inversion,
        target: str | EditSpec | list,
        tau_v: float = TAU_V,
        tau_c: float | dict = TAU_C,
        tau_s: float = TAU_S,
        tau_u: float = TAU_U,
        blend_words=None,
        edit_type: str | None = None,
        eq_params: dict | None = None,
        method: str = "p2p",
        generator=None,
        guidance_scale: float = GUIDANCE_SCALE,
        progress: bool | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        **options,
    ):
        """Edit an inversion into one target prompt or several (one output image each).

        A target may also be an ``editing.EditSpec`` (with its own τ, edit type, blend words...; its
        source must be the inversion's prompt): the other edit arguments then do not apply to it.

        The τ are fractions of the T steps (defaults as on the command line: τ_v .5, τ_c .6, τ_s .6,
        τ_u 0; τ_u > 0 is P2Plus); ``tau_c`` may be a per-word dict ``{'default_': .6, 'wooden': .2}``.
        ``blend_words`` = (source word, target word) for LocalBlend (or ``"cat tiger"``);
        ``edit_type`` = Replacement, Refinement or Reweight (None: Replacement when both prompts have
        the same number of words, else Refinement); ``eq_params`` = ``{'words': [...], 'values': [...]}``.
        ``method``: any registered edit defined for the inversion's method. Other keywords are method
        options (``masactrl_start_step=4``...; docs/methods.md).

        As a diffusers pipeline: returns an ``EditOutput`` (a ``BaseOutput``), or with
        ``return_dict=False`` the tuple ``(images, reconstruction, attention_maps)``; ``output_type``
        "pil" (default), "np", "pt" or "latent" (``outputs`` module). DDIM editing is deterministic;
        ``generator`` (a ``torch.Generator`` on any device, an int seed, or a list of generators, one
        per target) draws the noise of ``sdedit``: every target starts from the same draw of one
        generator (a CPU generator seeded with s draws what ``sdedit_seed=s`` does).
        ``callback_on_step_end(editor, step_index, timestep, callback_kwargs) -> dict`` is called at the
        end of every denoising step of each target's edit; ``callback_kwargs["latents"]`` (the names in
        ``callback_on_step_end_tensor_inputs``) are the (2, C, h, w) latents [reconstruction, edit], and
        the ``"latents"`` of the dict it returns (None: unchanged) continue the loop.
        """
        guidance_scale = validate.number(guidance_scale, "guidance_scale", minimum=0.0, maximum=validate.MAX_GUIDANCE)
        _refuse_old_callbacks(options)
        output_type = check_output_type(output_type)
        if not isinstance(inversion, Inversion):
            raise UserError(f"edit needs an Inversion (from editor.invert or Inversion.load), got "
                            f"{type(inversion).__name__}.")
        self._check_model(inversion)
        single = isinstance(target, (str, EditSpec))
        targets = [target] if single else list(target) if isinstance(target, (list, tuple)) else None
        if not targets or not all(isinstance(t, EditSpec) or (isinstance(t, str) and t.strip()) for t in targets):
            raise UserError("edit needs a target prompt (the edited caption) or a non-empty list of them.")
        get_edit(method, inversion.method)  # an unknown edit, or one not defined for the inversion, before any work
        T = inversion.num_steps
        no_blend = isinstance(blend_words, str) and not blend_words
        blend = None if no_blend else validate.blend_words(blend_words, "blend_words")
        specs = [t if isinstance(t, EditSpec) else
                 EditSpec(inversion.source, t, edit_type or default_edit_type(inversion.source, t), tau_v=tau_v,
                          tau_c=tau_c, tau_s=tau_s, tau_u=tau_u, blend_words=blend, eq_params=eq_params,
                          guidance_scale=float(guidance_scale)) for t in targets]
        for spec in specs:
            if spec.source != inversion.source:
                raise UserError(f"the edit's source prompt {spec.source!r} is not the inverted image's "
                                f"{inversion.source!r}.")
        for spec in specs:  # every word-level problem before any work
            check_prompt_length(self.bundle.tokenizer, spec.target)
            build_controller(spec, self.bundle.tokenizer, T)
        generators = _generators(generator, len(specs))
        options = check_method_options(options, inversion.method, method)
        _refuse_two_seeds(generators[0], options)
        progress = self.progress if progress is None else progress
        inv = inversion.to(self.bundle.device)
        ctx = MethodContext(self.bundle, inv.image, inv.source, T, TrainConfig(guidance_scale=float(guidance_scale)),
                            None, progress=progress, options=options)
        ctx.step_callback = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, ctx.schedule)
        with self._lent():
            outputs = []
            for spec, draws in zip(specs, _rewound(generators)):
                ctx.generator = draws
                outputs.append(run_method(ctx, spec, inv.method, method, inverted=inv))
            if output_type == "latent":  # nothing decoded, as diffusers' "latent"
                images, reconstruction = torch.stack([out.latents[1] for out in outputs]), outputs[0].latents[0]
            else:
                pixels = [decode_latent(self.bundle, out.latents) for out in outputs]
                source = inv.image if inv.image is not None else decode_latent(self.bundle, inv.z0)
                images = pictures(torch.stack([p[1] for p in pixels]), output_type)
                reconstruction = picture(pixels[0][0], output_type)
        input_image = figure = None
        if output_type != "latent":
            figure = self._attention_figure(outputs[0], inv.source, tensor_to_pil(source), output_type)
            input_image = picture(source, output_type)
        out = EditOutput(images=images, reconstruction=reconstruction, attention_maps=figure, input_image=input_image,
                         latents=[out.latents.cpu() for out in outputs], specs=specs,
                         cross_attention=[None if out.attention_maps is None else out.attention_maps.cpu()
                                          for out in outputs],
                         seconds=sum(out.seconds.get("edit", 0.0) for out in outputs))
        return out if return_dict else (out.images, out.reconstruction, out.attention_maps)

    def transfer_style(
        self,
        style_inversion: Inversion,
        content_image,
        content_prompt: str | None = None,
        guidance_scale: float = GUIDANCE_SCALE,
        progress: bool | None = None,
        style_reconstruction: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        **options,
    ):
        """Style transfer (the paper's §5.2.7): the content image's structure in the style of the image
        ``style_inversion`` was made from (a StyleDiffusion inversion: its learned values are the style).

        The content image is DDIM-inverted with ``content_prompt`` (None: the empty prompt, as
        Plug-and-Play) and its decoder features are injected into a sampling pass that uses the style's
        prompt and learned values; nothing is optimised on the content. ``images[0]`` is the transfer,
        ``reconstruction`` the style's own reconstruction (None with ``style_reconstruction=False``, which
        saves its sampling pass), ``input_image`` the content; ``grid()`` shows content | style | transfer.
        ``output_type`` and ``return_dict`` as for ``edit`` (nothing here is random). Options
        (``style_transfer.TRANSFER_OPTIONS``; docs/method.md):
        ``transfer_feature_fraction`` (.8), ``transfer_attention_fraction`` (.5),
        ``transfer_feature_downscale`` (4), ``transfer_attention_downscale`` (4), ``transfer_value_fraction``
        (1; 0 = the style prompt alone).
        """
        check_style_inversion(style_inversion)
        self._check_model(style_inversion)
        output_type = check_output_type(output_type)
        guidance_scale = validate.number(guidance_scale, "guidance_scale", minimum=0.0, maximum=validate.MAX_GUIDANCE)
        if content_image is None:
            raise UserError("style transfer needs a content image (its structure is kept): pass content_image.")
        if content_prompt is not None:
            if not isinstance(content_prompt, str):
                raise UserError(f"content_prompt must be text or None, got {type(content_prompt).__name__}.")
            check_prompt_length(self.bundle.tokenizer, content_prompt)
        opts = transfer_options(options)
        pixels = self._pixels(content_image)
        progress = self.progress if progress is None else progress
        with self._lent():
            result = run_style_transfer(self.bundle, style_inversion, pixels, content_prompt, opts,
                                        float(guidance_scale), progress, reconstruction=bool(style_reconstruction))
            if output_type != "latent":
                decoded = decode_latent(self.bundle, torch.cat([result.latents] + (
                    [result.reconstruction] if result.reconstruction is not None else [])))
                style_pixels = style_inversion.image if style_inversion.image is not None else \
                    decode_latent(self.bundle, style_inversion.z0.to(self.bundle.device))
        if output_type == "latent":
            images = result.latents[1:]
            reconstruction = None if result.reconstruction is None else result.reconstruction[0]
            content = style = None
        else:
            images = pictures(decoded[1:2], output_type)
            reconstruction = picture(decoded[2], output_type) if len(decoded) > 2 else None
            content, style = (picture(p.to(self.bundle.device), output_type) for p in (pixels, style_pixels))
        spec = EditSpec(content_prompt or "", style_inversion.source, guidance_scale=float(guidance_scale))
        out = TransferOutput(images=images, reconstruction=reconstruction, attention_maps=None, input_image=content,
                             latents=[result.latents.cpu()], specs=[spec], seconds=result.seconds, style_image=style,
                             options=opts)
        return out if return_dict else (out.images, out.reconstruction, out.attention_maps)

    # ------------------------------------------------------------------ helpers
    def _pixels(self, image) -> torch.Tensor:
        """(1, 3, S, S) in [-1, 1] at the model's size, converted and centre-cropped as the CLI does."""
        size = self.bundle.image_size
        if isinstance(image, (str, os.PathLike)):
            pixels, notes = load_image(Path(image), size)
        elif isinstance(image, Image.Image):
            pixels, notes = prepare_image(image, size, "image")
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            pixels, notes = prepare_image(_array_to_pil(image), size, "image")
        else:
            raise UserError(f"image must be a PIL image, a file path or an array, got {type(image).__name__}.")
        for note in notes:
            logger.info("note: %s", note)
        return pixels

    @contextmanager
    def _random_state(self, generator: torch.Generator | None, seed: int):
        """torch's global random state for one ``invert`` (forked: left as it was afterwards), and the
        generator the method draws explicit noise from (None: its seed option). Without ``generator`` the
        fork is seeded with ``seed``. A CPU generator's state becomes the fork's (so the method's implicit
        draws, e.g. initial weights, come from it) and the generator continues from where the call left
        it; a generator on another device seeds the fork with one draw and gives the explicit noise."""
        cuda = [self.bundle.device.index or 0] if self.bundle.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            if generator is None:
                torch.manual_seed(seed)
                yield None
            elif generator.device.type == "cpu":
                torch.manual_seed(generator.initial_seed())
                torch.default_generator.set_state(generator.get_state())
                yield torch.default_generator
                generator.set_state(torch.default_generator.get_state())
            else:
                torch.manual_seed(int(torch.randint(0, MAX_SEED, (1,), generator=generator, device=generator.device)))
                yield generator

    def _step_callback(self, callback, tensor_inputs, schedule):
        """diffusers' ``callback_on_step_end`` as the methods' ``MethodContext.step_callback(i, latents)``."""
        if callback is None:
            return None
        if not callable(callback):
            raise UserError(f"callback_on_step_end must be a function fn(editor, step_index, timestep, "
                            f"callback_kwargs) -> dict, got {type(callback).__name__}.")
        names = [tensor_inputs] if isinstance(tensor_inputs, str) else list(tensor_inputs or ())
        unknown = [n for n in names if n not in self._callback_tensor_inputs]
        if unknown:
            raise UserError(f"callback_on_step_end_tensor_inputs may name {', '.join(self._callback_tensor_inputs)}, "
                            f"not {unknown[0]!r}.")

        def step(i: int, latents: torch.Tensor) -> torch.Tensor:
            tensors = {"latents": latents}
            returned = callback(self, i, schedule.timesteps[i], {n: tensors[n] for n in names})
            if returned is None:
                return latents
            if not isinstance(returned, dict):
                raise UserError(f"callback_on_step_end must return a dict (its callback_kwargs) or None, got "
                                f"{type(returned).__name__}.")
            new = returned.get("latents", latents)
            if not isinstance(new, torch.Tensor) or new.shape != latents.shape:
                raise UserError(f"callback_on_step_end returned latents of shape "
                                f"{tuple(getattr(new, 'shape', ()))}; the step's are {tuple(latents.shape)}.")
            return new.to(latents)

        return step

    def _attention_figure(self, output, source_prompt: str, input_image: Image.Image, output_type: str):
        """The source prompt's cross-attention per word over the input (None where the edit records none)."""
        maps = output.attention_maps
        if maps is None:
            return None
        h, w = output.latents.shape[-2:]
        figure = attention_figure(maps[0], source_prompt, self.bundle.tokenizer, (h // 4, w // 4), input_image)
        return pil_picture(figure, output_type, self.bundle.device)

    def _check_model(self, inv: Inversion) -> None:
        made_for = inv.model.get("model_fingerprint")
        if made_for is not None and made_for != self.bundle.fingerprint:
            raise UserError(f"this inversion was made with another model ({inv.model.get('model_id')!r}, this editor: "
                            f"{self.bundle.model_id!r}); invert the image again with this editor.")
        if inv.source is None or inv.num_steps is None:
            raise UserError("this inversion does not say its source prompt and T: make it with editor.invert.")

    @contextmanager
    def _lent(self):
        """For borrowed components: freeze them for the call, then restore processors, flags and modes
        (and, for a pipeline with model CPU offload, put its components back on the CPU). Out of memory
        on the GPU is a UserError saying what to lower, for own and borrowed components alike."""
        if not self._borrowed:
            with out_of_memory_as_user_error(self.bundle.device):
                yield
            return
        b = self.bundle
        modules = [m for m in (b.vae, b.unet, b.text_encoder, b.image_encoder, b.text_encoder_2) if m is not None]
        processors = dict(b.unet.attn_processors)
        state = getattr(b.unet, "_stylediffusion_state", None)  # set while the toolkit's processors are in
        flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        modes = [(sub, sub.training) for m in modules for sub in m.modules()]
        for m in modules:
            m.requires_grad_(False)
            m.eval()
        try:
            with out_of_memory_as_user_error(b.device):
                yield
        finally:
            free_hooks = getattr(self._pipe, "maybe_free_model_hooks", None)
            if callable(free_hooks):  # model CPU offload: what ran last goes back to the CPU, as after pipe(...)
                free_hooks()
            b.unet.set_attn_processor(processors)
            if state is not None:
                b.unet._stylediffusion_state = state
            elif hasattr(b.unet, "_stylediffusion_state"):  # the toolkit's processors went with the call
                del b.unet._stylediffusion_state
            for p, flag in flags:
                p.requires_grad_(flag)
            for sub, mode in modes:
                sub.training = mode


def _refuse_old_callbacks(options: dict) -> None:
    """The per-step callback of older versions (``on_step=``) and diffusers' removed one: one line each."""
    for name in _OLD_CALLBACKS:
        if name in options:
            raise UserError(
                f"{name}= is no longer taken: pass callback_on_step_end=fn, called as fn(editor, "
                f"step_index, timestep, callback_kwargs) at the end of every denoising step and returning "
                f"callback_kwargs (diffusers' signature; callback_kwargs['latents'] are the step's latents)."
            )


def _generator(generator) -> torch.Generator | None:
    """``generator=`` as the API takes it: None, a ``torch.Generator`` (any device), or an int seed (a new
    CPU generator seeded with it)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise UserError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}.")
    return torch.Generator().manual_seed(validate.number(generator, "generator", minimum=0, maximum=MAX_SEED,
                                                         integer=True))


def _generators(generator, count: int) -> list[torch.Generator | None]:
    """One generator per target: a list of them as given (diffusers' per-prompt generators), else the one."""
    if not isinstance(generator, (list, tuple)):
        return [_generator(generator)] * count
    if len(generator) != count or not all(isinstance(g, torch.Generator) for g in generator):
        raise UserError(f"generator is a list of {len(generator)} items for {count} target(s): pass one "
                        f"torch.Generator per target, or a single generator for all.")
    return list(generator)


def _rewound(generators: list[torch.Generator | None]):
    """The generators of the targets in turn; one generator shared by all is put back, before each target,
    where it stood before the first, so that every target is an edit of the same draw."""
    starts = {id(g): g.get_state() for g in generators if g is not None}
    shared = len(generators) > 1 and all(g is generators[0] for g in generators)
    for g in generators:
        if shared and g is not None:
            g.set_state(starts[id(g)])
        yield g


def _refuse_two_seeds(generator: torch.Generator | None, options: dict) -> None:
    """A method's seed option (``generated_seed``, ``sdedit_seed``) and ``generator=`` both choose its noise."""
    seeds = [k for k in options if k.endswith("_seed")]
    if generator is not None and seeds:
        raise UserError(f"got both generator= and {seeds[0]}=: pass one (torch.Generator().manual_seed(s) draws "
                        f"what {seeds[0]}=s does).")


def _second_text_encoder(pipe) -> dict:
    """An SDXL pipeline's second text tower, its tokenizer, and how it encodes the empty prompt (families.py)."""
    zeros = getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", True)
    return dict(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, zero_empty_prompt=bool(zeros))


def _load_image_encoder(name: str):
    try:
        return CLIPVisionModel.from_pretrained(name, use_safetensors=True).requires_grad_(False).eval()
    except (OSError, ValueError) as err:
        raise _missing_weights("CLIP image encoder", name, "image_encoder=", err) from err


__all__ = ["EditOutput", "Inversion", "StyleDiffusionEditor", "UserError"]
