"""Loading the frozen components: a hub id, a local diffusers folder, or a built-in name.

``tiny`` is an SD-shaped pipeline with seeded random weights and the real SD v1 tokenizer, for tests
and smoke runs (its outputs are noise-like: it is untrained). ``testbed`` is the project's own small
model trained on the synthetic world (``stylediffusion.testbed``), shipped in ``assets``.
"""
from __future__ import annotations

import inspect
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import diffusers.utils.logging as diffusers_logging
import huggingface_hub.utils as hub_utils
import huggingface_hub.utils.logging as hub_logging
import torch
import transformers.utils.logging as transformers_logging
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from . import defaults, families, identity
from .ddim import make_ddim_scheduler
from .errors import UserError
from .specs import given, named, spelled

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "clip_tokenizer"
TESTBED_DIR = ASSETS / "testbed_model"
DEFAULT_MODEL, DEFAULT_IMAGE_ENCODER = defaults.MODEL, defaults.IMAGE_ENCODER
BUILTIN_MODELS = ("tiny", "testbed")

SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


@dataclass
class ModelBundle:
    """The frozen pieces StyleDiffusion needs, plus what identifies them in a checkpoint."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    image_encoder: CLIPVisionModel
    model_id: str
    image_encoder_id: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    untrained: bool = False
    # SDXL only (families.SDXL): the second text encoder and tokenizer, and whether "" encodes to zeros
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: CLIPTokenizer | None = None
    zero_empty_prompt: bool = False
    vae_id: str | None = None  # a VAE given with --vae in place of the model's own
    resolution: int | None = None  # --image_size: pixels to run at instead of the model's default (families.py)

    @property
    def family(self) -> "families.ModelFamily":
        """SD 1.x, SD 2.x or SDXL: how prompts become UNet conditioning (stylediffusion/families.py)."""
        return families.family_of(self.unet.config)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_image_size(self) -> int:
        """Pixel size the model is meant for: UNet sample size times the VAE factor (512 for SD1, 1024 for SDXL)."""
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def image_size(self) -> int:
        """Pixel size of this run: ``resolution`` where one was asked for, else the model's default."""
        return self.resolution or self.default_image_size

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # Weight digests taken at load time, before the dtype cast (identity.weights_digest); None = take them now.
    weight_digests: dict | None = None
    # Set: the UNet runs under torch.autocast in this dtype over float32 weights (a benchmark variant).
    autocast_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the UNet computes in: what loss scaling is decided on (training.gradient_scaler)."""
        return self.autocast_dtype or self.dtype

    @cached_property
    def identity(self) -> dict:
        """What determines this model's outputs (identity.model_identity): public configs, schedule, weights."""
        parts = {k: getattr(self, k) for k in ("vae", "unet", "text_encoder", "image_encoder", "scheduler")}
        if self.text_encoder_2 is not None:  # SDXL; SD 1.x/2.x records stay exactly as they were
            parts.update(text_encoder_2=self.text_encoder_2, zero_empty_prompt=self.zero_empty_prompt)
        record = identity.model_identity(parts, self.weight_digests)
        if self.image_size != self.default_image_size:  # SDXL's time ids, and every latent, follow the size
            record["image_size"] = self.image_size
        return record

    @property
    def fingerprint(self) -> str:
        """Short hash of ``identity``: equal in every process and machine that loads the same files."""
        return identity.fingerprint(self.identity)

    @property
    def label(self) -> str:
        """A short, machine-independent name for file names: the hub id (also read back from a hub-cache
        snapshot path) or the folder's name."""
        size = f"-{self.image_size}px" if self.image_size != self.default_image_size else ""
        return model_label(self.model_id) + size


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: the execution device of accelerate's offload hook where one is
    attached (``enable_model_cpu_offload``: on the module itself; ``enable_sequential_cpu_offload``: on
    its submodules, whose weights wait on the meta device), else the device of its parameters."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_label(model_id: str) -> str:
    parts = Path(model_id).parts
    for k, part in enumerate(parts):  # .../models--CompVis--stable-diffusion-v1-4/snapshots/<sha>
        if part.startswith("models--") and k + 2 < len(parts) and parts[k + 1] == "snapshots":
            return identity.slug(part[len("models--"):].replace("--", "-"))
    if Path(model_id).is_dir():  # a local folder: its own name, not where it happens to sit
        return identity.slug(Path(model_id).resolve().name)
    return identity.slug(model_id)


def sd_tokenizer() -> CLIPTokenizer:
    """The real SD v1 tokenizer, built from the committed BPE files (no download)."""
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)


def tiny_components(seed: int = 0):
    """Small SD-shaped components with seeded random weights: 64 px images, 16x16x4 latents.

    Same topology as SD1 (3 cross-attention down blocks, a plain one, cross-attention mid block,
    mirrored up path), so the 'mid-low' resolution latent/4 exists with 1 down and 2 up layers.
    The vision width (48) differs from the text width (32) on purpose: it exercises the bridge.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=64, layers_per_block=1,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
    ))
    # Random weights behave unlike a trained model in two ways that would make every test measure
    # the weights instead of the method: the VAE's latents are tiny (scale them to unit variance,
    # which is what SD's scaling_factor does), and the UNet's noise predictions are large and
    # erratic (shrink its output layer so DDIM inversion is as self-consistent as a trained model's).
    with torch.no_grad():
        probe = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        vae.register_to_config(scaling_factor=float(1.0 / vae.encode(probe).latent_dist.mean.std()))
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=sd_tokenizer(), scheduler=scheduler,
                image_encoder=image_encoder)


def _missing_weights(what: str, name: str, flag: str, err: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    how = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or the repo lacks it"
    return UserError(
        f"cannot load the {what} '{name}' ({how}; {type(err).__name__}). Supply it with {flag} /path/to/a/local/"
        f"diffusers-or-transformers folder, or download it once with network (huggingface-cli download {name}); "
        f"for a smoke run without weights use --model testbed or --model tiny."
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def _weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) \
        if folder.is_dir() else []


def _local_variant(folder: Path, prefer_half: bool) -> str | None:
    """Which weight files of a local component folder to load: None (the plain files) or "fp16".

    Only safetensors count: a folder whose weights are pickles (.bin) is refused, never loaded.
    The hub's fp16 variant (``*.fp16.safetensors``) is taken when the run is in half precision or when
    it is all the folder has (its values are exact in float32 too).
    """
    files = _weight_files(folder)
    plain = [f for f in files if f.endswith(".safetensors") and ".fp16." not in f]
    half = [f for f in files if f.endswith(".fp16.safetensors")]
    if not plain and not half:
        pickles = [f for f in files if not f.endswith(".safetensors")]
        if pickles:
            raise UserError(
                f"'{folder}' holds only pickled weights ({', '.join(pickles)}); this toolkit never loads pickles "
                f"(they can run code). Convert them once, in an environment you trust, with diffusers' "
                f"save_pretrained(..., safe_serialization=True), or download the safetensors files of the model.")
        return None  # nothing there: let the loader say what is missing
    return "fp16" if half and (prefer_half or not plain) else None


def _scheduler_config(model: str) -> dict:
    """The model's scheduler settings that DDIM understands (betas, prediction type, spacing...).

    A PNDM or Euler config (SD v1.4/1.5, SD 2.1 base) also has keys DDIM has no use for
    (``skip_prk_steps``...); passing them on would only make diffusers warn.
    """
    config = dict(DDIMScheduler.load_config(model, subfolder="scheduler"))
    accepted = inspect.signature(DDIMScheduler.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


def _load_component(cls, model: str, subfolder: str | None, prefer_half: bool, **hub):
    """``cls.from_pretrained`` from safetensors only, choosing the fp16 variant where that is what there is."""
    folder = Path(model) / subfolder if subfolder else Path(model)
    # float32 weights as stored: transformers would otherwise follow a config's "torch_dtype": "float16"
    # (SD 2.x's and SDXL's text encoders) and round them to float16 before load_models casts
    kwargs = dict(use_safetensors=True, torch_dtype=torch.float32, **hub)
    if subfolder:
        kwargs["subfolder"] = subfolder
    if folder.is_dir():
        return cls.from_pretrained(model, variant=_local_variant(folder, prefer_half), **kwargs)
    try:  # a hub id: the plain files, else the fp16 variant
        return cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError):
        return cls.from_pretrained(model, variant="fp16", **kwargs)


def quiet_libraries() -> None:
    """Silence the progress bars ("Loading weights") and warnings of diffusers, transformers and
    huggingface_hub through their own logging settings, so that an ``error:`` line is the only line a
    failed run writes to stderr. The project's own progress bars (``--progress``) are unaffected."""
    hub_utils.disable_progress_bars()
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    # Python warnings raised from inside these libraries (deprecations of their own API).
    warnings.filterwarnings("ignore", module=r"(diffusers|transformers|huggingface_hub|accelerate)(\.|$)")


@contextmanager
def _quiet_loading():
    """Silence the libraries' load-time chatter while components load: progress bars, the report that
    a CLIPVisionModel read from a whole CLIP checkpoint leaves the text tower's weights unused, and
    huggingface_hub's "Could not reach the Hub ... using cached commit hash" when a hub id is read from
    the cache offline. Their errors still raise, and are turned into one line below."""
    saved = [(mod, mod.get_verbosity(), mod.is_progress_bar_enabled()) for mod in
             (diffusers_logging, transformers_logging)]
    hub_verbosity, hub_bars = hub_logging.get_verbosity(), not hub_utils.are_progress_bars_disabled()
    try:
        for mod, _, _ in saved:
            mod.set_verbosity_error()
            mod.disable_progress_bar()
        hub_logging.set_verbosity_error()
        hub_utils.disable_progress_bars()
        yield
    finally:
        for mod, verbosity, bars in saved:
            mod.set_verbosity(verbosity)
            mod.enable_progress_bar() if bars else mod.disable_progress_bar()
        hub_logging.set_verbosity(hub_verbosity)
        if hub_bars:
            hub_utils.enable_progress_bars()


def _load_pretrained(model: str, image_encoder: str | None, prefer_half: bool = False, vae: str | None = None):
    with _quiet_loading():
        return _load_pretrained_quietly(model, image_encoder, prefer_half, vae)


def _load_vae(vae: str, prefer_half: bool) -> AutoencoderKL:
    """``--vae``: a VAE folder or hub id in place of the model's (e.g. madebyollin/sdxl-vae-fp16-fix); the
    folder may be a VAE alone or a whole model folder with a vae/ inside."""
    subfolder = "vae" if (Path(vae) / "vae").is_dir() else None
    try:
        return _load_component(AutoencoderKL, vae, subfolder, prefer_half)
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise _missing_weights("VAE", vae, "--vae", err) from err


def _load_pretrained_quietly(model: str, image_encoder: str | None, prefer_half: bool, vae: str | None = None):
    local = Path(model)
    if local.is_file():
        raise UserError(f"'{model}' is a single file; pass the diffusers folder of the model (model_index.json, unet/, "
                        f"vae/, text_encoder/, tokenizer/, scheduler/), e.g. one made from a single-file checkpoint "
                        f"with diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(folder).")
    if local.exists() and not (local / "unet").is_dir():
        raise UserError(f"'{model}' exists but is not a diffusers model folder (no unet/ inside): pass a folder saved "
                        f"by save_pretrained, or a hub id such as {DEFAULT_MODEL}.")
    try:
        parts = dict(
            vae=_load_component(AutoencoderKL, model, "vae", prefer_half),
            unet=_load_component(UNet2DConditionModel, model, "unet", prefer_half),
            text_encoder=_load_component(CLIPTextModel, model, "text_encoder", prefer_half),
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            scheduler=make_ddim_scheduler(_scheduler_config(model)),
        )
        parts.update(families.load_second_text_encoder(model, _load_component, prefer_half, parts["unet"].config))
        if vae is not None:
            parts["vae"] = _load_vae(vae, prefer_half)
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise _missing_weights("Stable Diffusion model", model, "--model", err) from err
    if image_encoder is None:
        image_encoder = str(local / "image_encoder") if (local / "image_encoder").is_dir() else DEFAULT_IMAGE_ENCODER
    try:
        parts["image_encoder"] = _load_component(CLIPVisionModel, image_encoder, None, prefer_half)
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise _missing_weights("CLIP image encoder", image_encoder, "--image_encoder", err) from err
    return parts, image_encoder


DTYPE_NAMES = defaults.DTYPE_NAMES


def native_bf16(device: str | torch.device) -> bool:
    """Whether the CUDA GPU computes bfloat16 natively (compute capability 8.0+: A100, H100, RTX 30xx...).

    ``torch.cuda.is_bf16_supported()`` can also say yes where bf16 is only emulated (V100, T4; its
    ``including_emulation`` default), which runs without tensor cores and without fused attention kernels.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The frozen models' dtype for a ``--dtype`` name; "auto" (the one place this default lives):

    - CUDA GPU with native bfloat16 (compute capability 8.0+): bfloat16: float32's exponent range, so
      training needs no loss scaling, at half the memory and on tensor cores;
    - older CUDA GPUs (V100, T4: Colab's): float16, which they run on tensor cores; training then uses
      dynamic loss scaling (``training.gradient_scaler``) and the VAE stays float32 (load_models);
    - the CPU and anything else: float32 (CPUs without bf16 units run half precision slower).

    What half precision moves on the test bed is measured in docs/performance.md ("Half precision").
    """
    if name == "auto":
        device = torch.device(device)
        if device.type != "cuda":
            return torch.float32
        if not torch.cuda.is_available():  # no GPU to ask (check_device refuses the run): the current GPUs' answer
            return torch.bfloat16
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if name not in DTYPE_NAMES:
        raise UserError(f"{given('dtype', name)} is not one of {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, name)


def check_device(name: str | torch.device, flag: str | None = None) -> torch.device:
    """``name`` as a torch device the machine has ("auto": the first CUDA GPU, else the CPU), or a
    UserError saying which devices there are (one place for the CLI, the API, the runners and the demo);
    ``flag``: how the message names it (default: as the caller spells ``device``)."""
    flag = flag or spelled("device")
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"{named(flag, str(name))} is not a device: use cpu, cuda or cuda:N.") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{named(flag, str(name))} was asked for but no CUDA GPU is visible; use "
                            f"{named(flag, 'cpu')}.")
        if device.index is not None and device.index >= count:
            visible = "cuda:0" if count == 1 else f"cuda:0 ... cuda:{count - 1}"
            raise UserError(f"{named(flag, str(name))} was asked for but this machine shows {count} CUDA GPU"
                            f"{'s' if count > 1 else ''} ({visible}): pick one of those (CUDA_VISIBLE_DEVICES "
                            f"renumbers them from 0).")
    return device


def out_of_memory_message(device: torch.device | str | None = None) -> str:
    """The one line for a CUDA out-of-memory error: what to lower or pick."""
    where = f" on {device}" if device is not None else ""
    return (f"the GPU ran out of memory{where}: lower the precision (--dtype bfloat16 or float16; API dtype=), use "
            f"a smaller model or image resolution, offload (pipe.enable_model_cpu_offload(), then "
            f"StyleDiffusionEditor.from_pipe(pipe)), free the memory other processes hold, or pick another GPU "
            f"(--device cuda:N).")


@contextmanager
def out_of_memory_as_user_error(device: torch.device | str | None = None):
    """Turn CUDA's out-of-memory error into a UserError that says what to do."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        raise UserError(out_of_memory_message(device)) from err


def tune_backends(device: str | torch.device) -> None:
    """For the command lines: let cuDNN pick the fastest convolution algorithms on CUDA.

    Training calls the UNet 1000+ times on one fixed shape, so autotuning once pays (the GPU
    benchmark's fast mode does the same). A process-wide switch, hence not done by load_models.
    Autotuning may pick other kernels in another process, so GPU results agree across processes to
    rounding, not bit for bit; the benchmark runners leave it off (docs/benchmarks.md).
    """
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def load_models(model: str = DEFAULT_MODEL, image_encoder: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0, vae: str | None = None,
                image_size: int | None = None) -> ModelBundle:
    """Load (or build) every frozen component, move it to ``device``/``dtype`` and freeze it.

    The model's own VAE stays float32 (fp16 SD VAEs, SDXL's most of all, overflow); a ``vae`` given in its
    place (a hub id or folder, e.g. madebyollin/sdxl-vae-fp16-fix) runs in ``dtype``. ``image_size``: the
    pixel size to run at (default: the model's, 1024 for SDXL; families.check_image_size says what fits).
    """
    untrained = model == "tiny"
    if vae is not None and model in BUILTIN_MODELS:
        raise UserError(f"--vae replaces the VAE of a model folder or hub id; --model {model} has its own built in.")
    if model == "tiny":
        parts, image_encoder_id = tiny_components(seed), f"tiny-vision(seed={seed})"
        model_id = f"tiny(seed={seed})"
    else:
        if model == "testbed":
            if not (TESTBED_DIR / "unet").is_dir():
                raise UserError(f"the test-bed model is not in {TESTBED_DIR}; train it with 'python -m "
                                f"benchmarks.testbed_training.train --stage all' in a checkout, or use --model tiny.")
            model = str(TESTBED_DIR)
        parts, image_encoder_id = _load_pretrained(model, image_encoder, prefer_half=dtype != torch.float32, vae=vae)
        model_id = "testbed" if Path(model) == TESTBED_DIR else model
    device = torch.device(device)
    # Digests before the dtype cast, so a bfloat16 run and a float32 run of one model agree.
    frozen = [k for k in ("vae", "unet", "text_encoder", "image_encoder", "text_encoder_2") if k in parts]
    digests = {k: identity.weights_digest(k, parts[k]) for k in frozen}
    with out_of_memory_as_user_error(device), _quiet_loading():
        for key in frozen:
            module = parts[key]
            module.requires_grad_(False)
            module.eval()
            # Every component in the run's dtype, whatever dtype its folder was saved in (a folder saved
            # from an fp16 pipeline loads its text and image encoders in float16). The model's own VAE stays
            # fp32: fp16 SD VAEs overflow (SDXL's too), and it runs only twice per image; a --vae runs in dtype.
            target_dtype = torch.float32 if key == "vae" and vae is None else dtype
            if any(p.dtype != target_dtype for p in module.parameters() if p.is_floating_point()):
                module.to(dtype=target_dtype)
            module.to(device)
    bundle = ModelBundle(**parts, model_id=model_id, image_encoder_id=image_encoder_id, device=device, dtype=dtype,
                         untrained=untrained, weight_digests=digests, vae_id=vae)
    if image_size is not None:
        bundle.resolution = families.check_image_size(bundle, image_size)
    return bundle
