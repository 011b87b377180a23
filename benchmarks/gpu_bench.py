"""StyleDiffusion end-to-end benchmark: the authors' cost structure ("reference") against ours ("fast").

One process times, for each mode, the three phases of editing one real image:

  inversion  DDIM inversion with the source prompt (T UNet calls, mid-low maps recorded)
  training   StyleDiffusion mapping-network training, early stop OFF so both modes run the same
             number of inner iterations (T=30, K=100: 1015 by default; ``--iters``/``--quick``)
  edit       a Prompt-to-Prompt / P2Plus edit (source + target) with the learned value embeddings

and reports seconds per phase and in total, ms per UNet call, peak GPU memory
(``torch.cuda.max_memory_allocated``, reset before every phase) and achieved TFLOP/s. Each mode first
runs a short untimed warm-up (T=2, K=1). The process CPU time of every phase is recorded too: on a
shared CPU it gives far steadier ratios than wall time (``ratios_cpu_time``, CPU runs only). A mode
that fails is reported under ``failed_modes`` and the other still runs (``--fail_fast`` to stop).

FLOP count (documented convention): a UNet *row* (one sample in a batch) costs F FLOPs forward,
F = 0.8 TFLOP for SD v1.5 at 512x512 (``--size sd15`` at 512) or the value measured with
``torch.utils.flop_counter`` for one forward otherwise. A forward without grad counts 1 F; a forward
that is back-propagated counts 3 F (forward + backward), in BOTH modes. The reference really does
~3 F (it computes weight gradients); the fast mode, whose weights are frozen, does ~2 F (input
gradients only), so its TFLOP/s is the *useful* work rate at the nominal count, not the hardware's.
Work that is pure overhead (the reference's repeated CLIP image encoder, text encoder, VAE) is not
counted.

Modes
-----
reference  emulates the released code's cost structure, in this codebase:
           fp32 everywhere (PyTorch's default matmul precision); the CLIP image encoder run again in
           every cross-attention call that uses the learned values (a forward pre-hook on each
           cross-attention layer; forward only, its output is discarded -- the values are the same);
           UNet weights with requires_grad=True, so training's backward also computes (and
           accumulates) the weight gradients; explicit softmax attention in EVERY layer (a controller
           whose needs_maps() is always True, also while recording / editing); separate
           unconditional and conditional UNet calls in the edit (two calls of 2 rows per step).
fast       the product path: ``load_models(dtype=...)`` -- frozen UNet/encoders in bf16 (CUDA default)
           or fp16, mapping networks, DDIM math and losses in fp32 (``predict`` casts); CLIP image
           features and text embeddings computed once; the edit batches [uncond src, uncond tgt,
           cond src, cond tgt] in one call; fused SDPA wherever the maps are not read or edited;
           TF32 matmuls and cuDNN autotuning on CUDA; optional ``--compile`` (regional
           torch.compile of the ResNet blocks and feed-forwards; the attention processors, which
           carry Python state, stay eager).

The model
---------
``--size sd15``: SD v1.5's architecture from the JSON configs in ``stylediffusion/configs/sd15``
(UNet 320/640/1280/1280, VAE 128/256/512/512, CLIP ViT-L/14 text tower, CLIP ViT-B/16 vision tower),
seeded random weights -- timing does not depend on the weights, and real ones cannot reach the GPU
machine. ``--size sdxl``: SDXL base 1.0's architecture from its hub configs in
``stylediffusion/configs/sdxl`` (UNet 320/640/1280 with 70 transformer blocks, both text towers,
the same ViT-B/16 vision tower), 1024 px by default, seeded random weights. ``--size tiny``: ``load_models('tiny')``, for CPU regression figures in seconds.
``--size testbed``: the project's trained test-bed model (``load_models('testbed')``, 32 px): a trained
model for ``--check_precision``, where a random one exaggerates rounding noise.

``--check_precision`` instead trains the same inversion in float32 and in bfloat16 (float16 too on
CUDA; any list with ``--precision_dtypes``, incl. ``<dtype>-autocast`` and the rounding-noise
control ``float32-explicit``) and reports the reconstruction PSNR of each and its difference to
float32 (tolerance 0.1 dB): against the input image (what papers report; includes the VAE's error),
against decode(z0) (the inversion's own error, which at 50+ dB moves with any rounding change) and
in latent space.

Run ``python benchmarks/gpu_bench.py --help``; see benchmarks/README.md and docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from ptp_utils import (COND, UNCOND, AttentionController, BatchLayout, CrossAttentionRecorder,  # noqa: E402
                       controlled, install_attention_control)
from stylediffusion import sampling as sd_sampling  # noqa: E402
from stylediffusion import training as sd_training  # noqa: E402
from stylediffusion.ddim import DDIMSchedule, guided  # noqa: E402
from stylediffusion.editing import EditSpec, build_controller, run_edit, value_steps_for  # noqa: E402
from stylediffusion.encoders import clip_image_features, decode_latent, encode_latent, encode_prompts  # noqa: E402
from stylediffusion.inversion import mapping_config  # noqa: E402
from stylediffusion.mapping import MappingNetworks  # noqa: E402
from stylediffusion.models import ModelBundle, load_models, sd_tokenizer  # noqa: E402
from stylediffusion.sampling import ddim_inversion, predict  # noqa: E402
from stylediffusion.training import TrainConfig, inner_steps, train_mapping_networks  # noqa: E402

CONFIG_DIR = ROOT / "stylediffusion" / "configs" / "sd15"
SDXL_CONFIG_DIR = ROOT / "stylediffusion" / "configs" / "sdxl"  # the hub files of SDXL base 1.0 (tests/fixtures)
NOMINAL_SD15_FLOPS = 0.8e12  # one SD v1.5 UNet forward, one 512x512 sample (64x64 latent)
PHASES = ("inversion", "training", "edit")
SOURCE_PROMPT, TARGET_PROMPT = "a photo of a cat sitting on the grass", "a photo of a dog sitting on the grass"
# what each --size inverts in --check_precision: (image under data/images, its source prompt)
PRECISION_SUBJECTS = {
    "tiny": ("chelsea.jpg", SOURCE_PROMPT),
    "sd15": ("chelsea.jpg", SOURCE_PROMPT),
    "sdxl": ("chelsea.jpg", SOURCE_PROMPT),
    # the trained test-bed model only knows its synthetic world: invert one of its scenes with its caption
    "testbed": ("testbed_red_triangle.png", "a large red triangle on a gray background"),
}
# Issue targets (SD v1.5 at 512x512, one H100, T=30, K=100).
TARGETS = {"speedup_train_edit_min": 5.0, "fast_total_seconds_max": 10.0, "fast_edit_seconds_max": 1.5,
           "fast_training_peak_gb_max": 8.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- models
def _config(name: str, folder: Path = CONFIG_DIR) -> dict:
    cfg = json.loads((folder / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def sd15_components(device: torch.device, seed: int = 0, resolution: int = 512) -> dict:
    """SD v1.5-shaped components with seeded random weights, built directly on ``device``."""
    unet_cfg = _config("unet")
    vae_cfg = _config("vae")
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if resolution % (vae_factor * 8):
        raise SystemExit(f"--resolution must be a multiple of {vae_factor * 8}")
    unet_cfg["sample_size"] = resolution // vae_factor
    vae_cfg["sample_size"] = resolution
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**_config("image_encoder")))
    with torch.no_grad():  # as in models.tiny_components: keep a random UNet's DDIM inversion tame
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=sd_tokenizer(), image_encoder=image_encoder,
                scheduler=DDIMScheduler.from_config(_config("scheduler")))


def sdxl_components(device: torch.device, seed: int = 0, resolution: int = 1024) -> dict:
    """SDXL base 1.0-shaped components (its hub configs, ``stylediffusion/configs/sdxl``) with seeded random
    weights, built directly on ``device``; the image encoder is ViT-B/16 as for SD v1.5."""
    from transformers import CLIPTextModelWithProjection

    unet_cfg, vae_cfg = _config("unet", SDXL_CONFIG_DIR), _config("vae", SDXL_CONFIG_DIR)
    if resolution % 64:
        raise SystemExit("--resolution must be a multiple of 64")
    unet_cfg["sample_size"], vae_cfg["sample_size"] = resolution // 8, resolution
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config("text_encoder", SDXL_CONFIG_DIR)))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2", SDXL_CONFIG_DIR)))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**_config("image_encoder")))
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    tokenizer_2 = sd_tokenizer()
    tokenizer_2.pad_token = "!"  # as SDXL's tokenizer_2
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=sd_tokenizer(), image_encoder=image_encoder,
                scheduler=DDIMScheduler.from_config(_config("scheduler", SDXL_CONFIG_DIR)),
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, zero_empty_prompt=True)


def build_bundle(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0, resolution: int = 512) -> ModelBundle:
    if size in ("tiny", "testbed"):
        return load_models(size, device=device, dtype=dtype, seed=seed)
    parts = sdxl_components(device, seed, resolution) if size == "sdxl" else sd15_components(device, seed, resolution)
    for key in ("vae", "unet", "text_encoder", "image_encoder", "text_encoder_2"):  # freezing/casting as load_models
        if key not in parts:
            continue
        module = parts[key]
        module.requires_grad_(False)
        module.eval()
        module.to(device=device, dtype=torch.float32 if key == "vae" else dtype)
    return ModelBundle(**parts, model_id=f"{size}-random(seed={seed})", image_encoder_id="vit-b16-random",
                       device=device, dtype=dtype, untrained=True)


# ----------------------------------------------------------------------------- mode settings
@dataclass
class Mode:
    name: str
    dtype: str
    explicit_attention: bool  # softmax maps materialised in every attention layer
    image_encoder_per_layer: bool  # CLIP image encoder re-run in every cross-attention call with learned values
    unet_weight_grads: bool  # UNet parameters require grad (weight gradients computed in training)
    split_branches: bool  # separate unconditional / conditional UNet calls in the edit
    tf32: bool = False
    compile: bool = False
    channels_last: bool = False


def reference_mode() -> Mode:
    return Mode("reference", "float32", explicit_attention=True, image_encoder_per_layer=True, unet_weight_grads=True,
                split_branches=True)


def fast_mode(device: torch.device, dtype: str | None, compile_unet: bool, channels_last: bool) -> Mode:
    if dtype is None:  # half precision pays on GPUs; on a CPU without AMX, bf16 kernels are slower than fp32
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return Mode("fast", dtype, explicit_attention=False, image_encoder_per_layer=False, unet_weight_grads=False,
                split_branches=False, tf32=device.type == "cuda", compile=compile_unet, channels_last=channels_last)


class ExplicitEverywhere(AttentionController):
    """Reference cost: explicit softmax maps in every layer; edits delegated to ``inner`` where it asks."""

    def __init__(self, inner: AttentionController | None = None):
        self.inner = inner

    def needs_maps(self, place, state):
        return True

    def __call__(self, probs, place, state):
        if self.inner is None or not self.inner.needs_maps(place, state):
            return probs
        if place.is_cross and state.layout is not None and not state.layout.rows(COND):
            return probs  # an unconditional-only call (split branches): its cross-attention is never edited
        return self.inner(probs, place, state)

    def after_step(self, latents, state):
        return latents if self.inner is None else self.inner.after_step(latents, state)


class ExplicitRecorder(CrossAttentionRecorder):
    """The mid-low cross-attention recorder, but with explicit attention in every layer (reference)."""

    def needs_maps(self, place, state):
        return True

    def __call__(self, probs, place, state):
        if place.is_cross and place.is_mid_low:
            return super().__call__(probs, place, state)
        return probs


@contextlib.contextmanager
def reference_recorders():
    """Make the core's inversion and training use ExplicitRecorder (restored afterwards)."""
    saved = sd_sampling.CrossAttentionRecorder, sd_training.CrossAttentionRecorder
    sd_sampling.CrossAttentionRecorder = sd_training.CrossAttentionRecorder = ExplicitRecorder
    try:
        yield
    finally:
        sd_sampling.CrossAttentionRecorder, sd_training.CrossAttentionRecorder = saved


def add_per_layer_image_encoder(bundle: ModelBundle, image: torch.Tensor) -> list:
    """Run the CLIP image encoder again in every cross-attention call that receives learned values."""
    handles = []

    def hook(module, args, kwargs):
        if kwargs.get("value_states") is not None:
            clip_image_features(bundle, image)
        return None

    for name, module in bundle.unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "processor"):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def compile_regions(unet) -> int:
    """Regional torch.compile: ResNet blocks and feed-forwards (no Python attention state inside)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D

    import torch._dynamo.config as dynamo_config

    # ~40 compiled regions share a few code objects: let every shape/module variant keep its graph
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    n = 0
    for module in unet.modules():
        if isinstance(module, (ResnetBlock2D, FeedForward)):
            module.compile(dynamic=False)
            n += 1
    return n


class UnetCounter:
    """Counts UNet calls and rows, split by whether the call builds a graph (forward+backward)."""

    def __init__(self, unet, image_encoder=None):
        self.reset()
        self.handle = unet.register_forward_pre_hook(self._hook)
        self.image_handle = image_encoder.register_forward_pre_hook(self._image_hook) if image_encoder is not None else None

    def reset(self):
        self.calls = self.rows_forward = self.rows_backward = self.image_encoder_calls = 0

    def remove(self):
        self.handle.remove()
        if self.image_handle is not None:
            self.image_handle.remove()

    def _image_hook(self, module, args):
        self.image_encoder_calls += 1

    def _hook(self, module, args):
        self.calls += 1
        rows = int(args[0].shape[0])
        if torch.is_grad_enabled():
            self.rows_backward += rows
        else:
            self.rows_forward += rows

    def snapshot(self) -> dict:
        return dict(calls=self.calls, rows_forward=self.rows_forward, rows_forward_backward=self.rows_backward,
                    image_encoder_calls=self.image_encoder_calls)


# ----------------------------------------------------------------------------- phases
def schedule_iterations(num_steps: int, num_inner_steps: int) -> int:
    return sum(inner_steps(num_inner_steps, i) for i in range(num_steps))


def inner_steps_for(num_steps: int, iterations: int) -> int:
    """The smallest K whose schedule sum_i ceil(K exp(-0.1 i)) reaches ``iterations``."""
    k = 1
    while schedule_iterations(num_steps, k) < iterations:
        k += 1
    return k


def reference_edit(bundle: ModelBundle, schedule: DDIMSchedule, z_T, spec: EditSpec, mappers, features):
    """run_edit's math with the released code's structure: separate uncond / cond UNet calls per step."""
    T = schedule.num_steps
    controller = ExplicitEverywhere(build_controller(spec, bundle.tokenizer, T))
    state = install_attention_control(bundle.unet)
    cond = encode_prompts(bundle, [spec.source, spec.target])
    uncond = encode_prompts(bundle, [""]).expand(2, -1, -1)
    value_steps = value_steps_for(spec.tau_v, T)
    z = z_T.to(bundle.device).expand(2, -1, -1, -1).clone()
    mappers.eval()
    with torch.no_grad(), controlled(state, controller):
        for i in range(T):
            v_src = mappers[i](features, cond[:1])
            v_tgt = mappers[i](features, cond[1:]) if i < value_steps else cond[1:]
            eps_u = predict(bundle, schedule, z, i, uncond, BatchLayout.single(UNCOND, 2))
            eps_c = predict(bundle, schedule, z, i, cond, BatchLayout.single(COND, 2), values=torch.cat([v_src, v_tgt]))
            z = schedule.sample_step(guided(eps_u, eps_c, spec.guidance_scale), z, i)
            z = controller.after_step(z, state)
    return z


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def phase_timer(device: torch.device, record: dict):
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    _sync(device)
    record["seconds"] = time.perf_counter() - t0
    # CPU time of this process: on a shared CPU with one torch thread it is far less noisy than wall time
    record["cpu_seconds"] = time.process_time() - c0
    record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@dataclass
class Inputs:
    image: torch.Tensor
    z0: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    features: torch.Tensor


def prepare_inputs(bundle: ModelBundle, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    size = bundle.image_size
    # a smooth random image (timing does not depend on the content)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g) * 2 - 1, size=(size, size),
                                            mode="bilinear", align_corners=False).to(bundle.device)
    return Inputs(image, encode_latent(bundle, image), encode_prompts(bundle, [SOURCE_PROMPT]),
                  encode_prompts(bundle, [""]), clip_image_features(bundle, image))


def run_phases(bundle: ModelBundle, mode: Mode, inputs: Inputs, num_steps: int, num_inner_steps: int, seed: int,
               counter: UnetCounter | None = None, records: dict | None = None) -> torch.Tensor:
    """Inversion, training (early stop off) and edit, each timed into ``records[phase]`` when given."""
    device = bundle.device
    records = {} if records is None else records
    schedule = DDIMSchedule(bundle.scheduler, num_steps)
    cfg = TrainConfig(num_inner_steps=num_inner_steps, early_stop=False)
    spec = EditSpec(SOURCE_PROMPT, TARGET_PROMPT, tau_u=0.5)
    torch.manual_seed(seed)
    mappers = MappingNetworks(mapping_config(bundle, inputs.features, inputs.cond, "modulate"), num_steps).to(device)
    state = install_attention_control(bundle.unet)
    explicit = ExplicitEverywhere() if mode.explicit_attention else None
    recorders = reference_recorders() if mode.explicit_attention else contextlib.nullcontext()

    def timed(name):
        records[name] = {}
        if counter is not None:
            counter.reset()
        return phase_timer(device, records[name])

    with recorders, controlled(state, explicit):
        with timed("inversion"):
            trajectory = ddim_inversion(bundle, schedule, inputs.z0, inputs.cond, progress=False)
        if counter is not None:
            records["inversion"].update(counter.snapshot())
        with timed("training"):
            reports = train_mapping_networks(bundle, schedule, trajectory, inputs.features, inputs.cond, inputs.uncond,
                                             mappers, cfg, progress=False)
        if counter is not None:
            records["training"].update(counter.snapshot())
        records["training"]["iterations"] = sum(r.iterations for r in reports)
    with timed("edit"):
        if mode.split_branches:
            z = reference_edit(bundle, schedule, trajectory.z_T, spec, mappers, inputs.features)
        else:
            z = run_edit(bundle, schedule, trajectory.z_T, spec, mappers=mappers, image_features=inputs.features,
                         progress=False).latents
    if counter is not None:
        records["edit"].update(counter.snapshot())
    if not torch.isfinite(z).all():
        raise RuntimeError(f"{mode.name}: the edit produced non-finite latents")
    return z


def measure_unet_flops(bundle: ModelBundle) -> float | None:
    """FLOPs of one UNet forward on one sample, from torch's FLOP counter (matmuls, convs, attention)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    side = int(bundle.unet.config.sample_size)
    z = torch.zeros(1, bundle.unet.config.in_channels, side, side, device=bundle.device, dtype=bundle.dtype)
    rows = 77 + int(bundle.family.pooled_row)  # SDXL: the pooled row (stylediffusion/families.py)
    text = torch.zeros(1, rows, bundle.unet.config.cross_attention_dim, device=bundle.device, dtype=bundle.dtype)
    text, added = bundle.family.unet_conditioning(bundle, text, (side, side))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        bundle.unet(z, torch.tensor(500, device=bundle.device), encoder_hidden_states=text, added_cond_kwargs=added)
    return float(counter.get_total_flops())


@contextlib.contextmanager
def backend_flags(mode: Mode, device: torch.device):
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = mode.tf32  # PyTorch's default is False: the reference's fp32
    torch.backends.cudnn.benchmark = mode.name == "fast"
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def run_mode(mode: Mode, args, device: torch.device, num_steps: int, num_inner_steps: int, flops_override: float | None,
             log=print) -> dict:
    t_load = time.perf_counter()
    bundle = build_bundle(args.size, device, DTYPES[mode.dtype], args.seed, args.resolution)
    if mode.unet_weight_grads:
        bundle.unet.requires_grad_(True)
    if mode.channels_last:
        bundle.unet.to(memory_format=torch.channels_last)
    inputs = prepare_inputs(bundle, args.seed)
    measured = measure_unet_flops(bundle)
    compiled = compile_regions(bundle.unet) if mode.compile else 0
    handles = add_per_layer_image_encoder(bundle, inputs.image) if mode.image_encoder_per_layer else []
    load_seconds = time.perf_counter() - t_load
    out = {"settings": asdict(mode), "load_seconds": load_seconds, "measured_unet_flops_per_row": measured,
           "compiled_modules": compiled, "phases": {}}
    try:
        with backend_flags(mode, device):
            if not args.no_warmup:  # cuDNN autotuning, allocator growth, lazy inits, compilation
                t0 = time.perf_counter()
                run_phases(bundle, mode, inputs, 2, 1, args.seed)
                _sync(device)
                out["warmup_seconds"] = time.perf_counter() - t0
            counter = UnetCounter(bundle.unet, bundle.image_encoder)
            z_edit = run_phases(bundle, mode, inputs, num_steps, num_inner_steps, args.seed, counter, out["phases"])
            counter.remove()
            out["edit_latents"] = z_edit.float().cpu()
    finally:
        for h in handles:
            h.remove()
    flops = flops_override if flops_override is not None else measured
    for name, rec in out["phases"].items():
        rec["ms_per_unet_call"] = 1e3 * rec["seconds"] / max(rec["calls"], 1)
        work = rec["rows_forward"] + 3 * rec["rows_forward_backward"]
        rec["nominal_flops"] = work * flops if flops else None
        rec["tflops_per_s"] = rec["nominal_flops"] / rec["seconds"] / 1e12 if flops else None
    phases = out["phases"]
    out["total_seconds"] = sum(phases[p]["seconds"] for p in PHASES)
    out["train_edit_seconds"] = phases["training"]["seconds"] + phases["edit"]["seconds"]
    out["total_cpu_seconds"] = sum(phases[p]["cpu_seconds"] for p in PHASES)
    out["train_edit_cpu_seconds"] = phases["training"]["cpu_seconds"] + phases["edit"]["cpu_seconds"]
    peaks = [phases[p]["peak_memory_bytes"] for p in PHASES]
    out["peak_memory_bytes"] = max(peaks) if all(p is not None for p in peaks) else None
    total_flops = sum(phases[p]["nominal_flops"] or 0 for p in PHASES)
    out["tflops_per_s"] = total_flops / out["total_seconds"] / 1e12 if flops else None
    log(f"[{mode.name}] " + ", ".join(f"{p} {phases[p]['seconds']:.2f}s" for p in PHASES)
        + f", total {out['total_seconds']:.2f}s")
    del bundle, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- reporting
def _gb(x):
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def _num(x, fmt="{:.3g}"):
    return "n/a" if x is None else fmt.format(x)


def ratios(results: dict, clock: str = "seconds") -> dict:
    """reference / fast per phase, for train+edit and in total; ``clock`` "seconds" (wall) or "cpu_seconds"."""
    ref, fast = results["modes"]["reference"], results["modes"]["fast"]
    r = {p: ref["phases"][p][clock] / fast["phases"][p][clock] for p in PHASES}
    prefix = "" if clock == "seconds" else "cpu_"
    r["train+edit"] = ref[f"train_edit_{prefix}seconds"] / fast[f"train_edit_{prefix}seconds"]
    r["total"] = ref[f"total_{prefix}seconds"] / fast[f"total_{prefix}seconds"]
    return r


def detail_table(results: dict) -> str:
    lines = ["| mode | phase | seconds | UNet calls | ms / UNet call | TFLOP/s (nominal) | peak GPU mem (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, m in results["modes"].items():
        for p in PHASES:
            rec = m["phases"][p]
            lines.append(f"| {name} | {p} | {rec['seconds']:.3f} | {rec['calls']} | {rec['ms_per_unet_call']:.1f} | "
                         f"{_num(rec['tflops_per_s'])} | {_gb(rec['peak_memory_bytes'])} |")
        lines.append(f"| {name} | **total** | {m['total_seconds']:.3f} | | | {_num(m['tflops_per_s'])} | "
                     f"{_gb(m['peak_memory_bytes'])} |")
    return "\n".join(lines)


def ratio_table(results: dict) -> str:
    r = results["ratios"]
    ref, fast = results["modes"]["reference"], results["modes"]["fast"]

    def secs(m, key):
        return m["phases"][key]["seconds"] if key in PHASES else m["train_edit_seconds" if key == "train+edit" else "total_seconds"]

    cpu = results.get("ratios_cpu_time")
    if cpu is None:
        lines = ["| phase | reference (s) | fast (s) | speed-up (reference / fast) |", "|---|---:|---:|---:|"]
    else:
        lines = ["| phase | reference (s) | fast (s) | speed-up (reference / fast) | speed-up in CPU time |",
                 "|---|---:|---:|---:|---:|"]
    for key in (*PHASES, "train+edit", "total"):
        extra = "" if cpu is None else f" {cpu[key]:.2f}x |"
        lines.append(f"| {key} | {secs(ref, key):.3f} | {secs(fast, key):.3f} | {r[key]:.2f}x |{extra}")
    return "\n".join(lines)


def check_targets(results: dict) -> dict:
    fast = results["modes"]["fast"]
    applicable = (results["size"] == "sd15" and results["resolution"] == 512 and results["device"].startswith("cuda")
                  and results["num_ddim_steps"] == 30 and results["num_inner_steps"] == 100)
    peak = fast["phases"]["training"]["peak_memory_bytes"]
    checks = {
        "speedup_train_edit": (results["ratios"]["train+edit"], results["ratios"]["train+edit"] >= TARGETS["speedup_train_edit_min"]),
        "fast_total_seconds": (fast["total_seconds"], fast["total_seconds"] <= TARGETS["fast_total_seconds_max"]),
        "fast_edit_seconds": (fast["phases"]["edit"]["seconds"], fast["phases"]["edit"]["seconds"] <= TARGETS["fast_edit_seconds_max"]),
        "fast_training_peak_gb": (None if peak is None else peak / 1e9,
                                  None if peak is None else peak / 1e9 <= TARGETS["fast_training_peak_gb_max"]),
    }
    return {"applicable": applicable, "targets": TARGETS,
            "checks": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()}}


# ----------------------------------------------------------------------------- precision check
def psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


@torch.no_grad()
def reconstruct(bundle, schedule, z_T, mappers, features, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """Guided sampling from z*_T with the learned values in the conditional branch (the edit's source row)."""
    z = z_T
    mappers.eval()
    text = torch.cat([uncond, cond])
    for i in range(schedule.num_steps):
        values = torch.cat([uncond, mappers[i](features, cond)])
        eps_u, eps_c = predict(bundle, schedule, torch.cat([z, z]), i, text, BatchLayout.guided(1), values=values).chunk(2)
        z = schedule.sample_step(guided(eps_u, eps_c, guidance_scale), z, i)
    return z


def load_test_image(size: int, seed: int, name: str = "chelsea.jpg") -> torch.Tensor:
    path = ROOT / "data" / "images" / name
    if path.is_file():
        from stylediffusion.image_io import load_image
        return load_image(path, size)[0]
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g) * 2 - 1, size=(size, size),
                                           mode="bilinear", align_corners=False)


def autocast_unet(bundle: ModelBundle, dtype: torch.dtype) -> None:
    """fp32 weights, UNet forward under torch.autocast (matmuls/convs in ``dtype``, norms/softmax in fp32).

    ``sampling.predict`` enters the autocast; training decides loss scaling on the compute dtype, so
    float16-autocast trains with a GradScaler as float16 weights do."""
    bundle.autocast_dtype = dtype


def precision_run(size: str, device: torch.device, variant: str, num_steps: int, num_inner_steps: int,
                  seed: int = 0, resolution: int = 512, subject: tuple[str, str] | None = None) -> dict:
    """One trained inversion; ``variant`` is a dtype name ("bfloat16": half-precision frozen models, as
    ``load_models(dtype=...)``), "<dtype>-autocast" (fp32 weights, UNet under autocast) or
    "<dtype>-explicit" (explicit attention everywhere: a rounding-noise control)."""
    dtype_name, _, how = variant.partition("-")
    dtype = DTYPES[dtype_name]
    bundle = build_bundle(size, device, torch.float32 if how == "autocast" else dtype, seed, resolution)
    if how == "autocast":
        autocast_unet(bundle, dtype)
    image_name, prompt = subject or PRECISION_SUBJECTS[size]
    image = load_test_image(bundle.image_size, seed, image_name).to(device)
    schedule = DDIMSchedule(bundle.scheduler, num_steps)
    z0 = encode_latent(bundle, image)
    cond, uncond = encode_prompts(bundle, [prompt]), encode_prompts(bundle, [""])
    features = clip_image_features(bundle, image)
    torch.manual_seed(seed)
    mappers = MappingNetworks(mapping_config(bundle, features, cond, "modulate"), num_steps).to(device)
    cfg = TrainConfig(num_inner_steps=num_inner_steps, early_stop=False)
    t0 = time.perf_counter()
    # "-explicit": the same fp32 math with explicit instead of fused attention: a control that shows how
    # much training moves from float rounding alone (Adam amplifies rounding noise, e.g. in the
    # mathematically zero gradients of the biases in front of BatchNorm).
    explicit = how == "explicit"
    with (reference_recorders() if explicit else contextlib.nullcontext()), \
            controlled(install_attention_control(bundle.unet), ExplicitEverywhere() if explicit else None):
        trajectory = ddim_inversion(bundle, schedule, z0, cond, progress=False)
        reports = train_mapping_networks(bundle, schedule, trajectory, features, cond, uncond, mappers, cfg,
                                         progress=False)
    seconds = time.perf_counter() - t0
    z_rec = reconstruct(bundle, schedule, trajectory.z_T, mappers, features, cond, uncond, cfg.guidance_scale)
    z_plain = reconstruct_plain(bundle, schedule, trajectory.z_T, cond, uncond, cfg.guidance_scale)
    x0, x_rec, x_plain = (decode_latent(bundle, z).clamp(-1, 1) for z in (z0, z_rec, z_plain))
    peak = float(z0.max() - z0.min())
    fp32_eval = None
    if dtype != torch.float32 or how == "autocast":
        # diagnostic: the same learned M_i and z*_T, sampled with the UNet in fp32
        # (separates what the half-precision training learned from half-precision sampling noise)
        bundle.autocast_dtype = None
        bundle.unet.float()
        bundle.dtype = torch.float32
        z32 = reconstruct(bundle, schedule, trajectory.z_T, mappers, features, cond, uncond, cfg.guidance_scale)
        fp32_eval = psnr((decode_latent(bundle, z32).clamp(-1, 1) + 1) / 2, (x0 + 1) / 2, 1.0)
    return {"dtype": variant, "seconds": seconds, "iterations": sum(r.iterations for r in reports),
            "psnr_image_fp32_sampling_db": fp32_eval,
            "final_loss_mean": sum(r.loss for r in reports) / len(reports),
            "psnr_image_db": psnr((x_rec + 1) / 2, (x0 + 1) / 2, 1.0),
            # what users and papers call reconstruction PSNR: against the input image (VAE error included)
            "psnr_input_image_db": psnr((x_rec + 1) / 2, (image.clamp(-1, 1) + 1) / 2, 1.0),
            "psnr_latent_db": psnr(z_rec, z0, peak),
            "psnr_image_plain_ddim_db": psnr((x_plain + 1) / 2, (x0 + 1) / 2, 1.0),
            "z_rec": z_rec.float().cpu()}


@torch.no_grad()
def reconstruct_plain(bundle, schedule, z_T, cond, uncond, guidance_scale: float) -> torch.Tensor:
    return sd_sampling.guided_sampling(bundle, schedule, z_T, cond, uncond, guidance_scale)


def check_precision(size: str, device: torch.device, num_steps: int, num_inner_steps: int, seed: int = 0,
                    resolution: int = 512, dtypes: tuple[str, ...] | None = None, tolerance_db: float = 0.1,
                    subject: tuple[str, str] | None = None) -> dict:
    """Train the same inversion in fp32 and in half precision; compare reconstruction PSNRs."""
    if dtypes is None:
        dtypes = ("bfloat16", "float16") if device.type == "cuda" else ("bfloat16",)
    subject = subject or PRECISION_SUBJECTS[size]
    base = precision_run(size, device, "float32", num_steps, num_inner_steps, seed, resolution, subject)
    runs = {"float32": base}
    failed = {}
    for name in dtypes:
        try:
            runs[name] = precision_run(size, device, name, num_steps, num_inner_steps, seed, resolution, subject)
        except Exception as err:  # e.g. fp16 overflow in a random model: report it, keep the other variants
            failed[name] = f"{type(err).__name__}: {err}"
    dtypes = tuple(d for d in dtypes if d not in failed)
    out = {"size": size, "image": subject[0], "prompt": subject[1], "device": str(device), "num_ddim_steps": num_steps, "num_inner_steps": num_inner_steps,
           "tolerance_db": tolerance_db, "runs": {}, "deltas": {}, "failed": failed}
    z_recs = {name: run.pop("z_rec") for name, run in runs.items()}
    ref = z_recs["float32"]
    for name, run in runs.items():
        # how far the half-precision reconstruction is from the fp32 one (not from z0)
        run["latent_psnr_vs_float32_reconstruction_db"] = (
            None if name == "float32" else psnr(z_recs[name], ref, float(ref.max() - ref.min())))
        out["runs"][name] = run
    for name in dtypes:
        d_img = out["runs"][name]["psnr_image_db"] - out["runs"]["float32"]["psnr_image_db"]
        d_lat = out["runs"][name]["psnr_latent_db"] - out["runs"]["float32"]["psnr_latent_db"]
        d_in = out["runs"][name]["psnr_input_image_db"] - out["runs"]["float32"]["psnr_input_image_db"]
        out["deltas"][name] = {"image_db": d_img, "latent_db": d_lat, "input_image_db": d_in,
                               "within_tolerance": abs(d_img) < tolerance_db,
                               "within_tolerance_input_image": abs(d_in) < tolerance_db}
    return out


def precision_table(result: dict) -> str:
    lines = ["| dtype | iterations | PSNR vs input image (dB) | delta (dB) | PSNR vs decoded z0 (dB) | delta (dB) | "
             "PSNR latent (dB) | same M_i, fp32 sampling: PSNR vs decoded z0 (dB) | plain DDIM PSNR vs decoded z0 (dB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in result["runs"].items():
        delta = result["deltas"].get(name, {})
        lines.append(f"| {name} | {run['iterations']} | {run['psnr_input_image_db']:.3f} | "
                     f"{_num(delta.get('input_image_db'), '{:+.3f}')} | {run['psnr_image_db']:.3f} | "
                     f"{_num(delta.get('image_db'), '{:+.3f}')} | {run['psnr_latent_db']:.3f} | "
                     f"{_num(run['psnr_image_fp32_sampling_db'], '{:.3f}')} | {run['psnr_image_plain_ddim_db']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--size", choices=("sd15", "sdxl", "tiny", "testbed"), default=None,
                   help="sd15: SD v1.5 architecture, random weights (default on CUDA); sdxl: SDXL base 1.0's "
                        "architecture, random weights; tiny: load_models('tiny') (default on CPU); testbed: the "
                        "project's trained test-bed model (load_models('testbed'))")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size for --size sd15 (default 512) and sdxl (default 1024)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps T (default 30; 10 with --quick)")
    p.add_argument("--inner_steps", type=int, default=None, help="K (default 100, i.e. 1015 iterations at T=30)")
    p.add_argument("--iters", type=int, default=None,
                   help="total training iterations: picks the smallest K whose schedule reaches it (overrides --inner_steps)")
    p.add_argument("--quick", action="store_true", help="T=10, K=10 (72 training iterations) unless given")
    p.add_argument("--modes", default="reference,fast", help="comma-separated subset of reference,fast")
    p.add_argument("--fast_dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the frozen models in fast mode (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="fast mode: regional torch.compile of the UNet")
    p.add_argument("--channels_last", action="store_true", help="fast mode: UNet in channels_last memory format")
    p.add_argument("--flops_per_unet", type=float, default=None,
                   help="FLOPs per UNet forward per sample (default 0.8e12 for sd15 at 512, else measured)")
    p.add_argument("--no_warmup", action="store_true", help="skip the short untimed warm-up run of each mode")
    p.add_argument("--fail_fast", action="store_true", help="stop at the first failing mode instead of reporting it")
    p.add_argument("--check_precision", action="store_true",
                   help="instead of timing: train in float32 and bfloat16 (+float16 on CUDA) and compare reconstruction PSNR")
    p.add_argument("--precision_dtypes", default=None,
                   help="with --check_precision: comma list compared with float32, e.g. bfloat16,bfloat16-autocast "
                        "(default bfloat16 on CPU, bfloat16,float16 on CUDA)")
    p.add_argument("--precision_image", default=None,
                   help="with --check_precision: image under data/images to invert (default per --size)")
    p.add_argument("--precision_prompt", default=None, help="with --check_precision: its source prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: leave as is)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    return p.parse_args(argv)


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    args.size = args.size or ("sd15" if device.type == "cuda" else "tiny")
    num_steps = args.steps or (10 if args.quick else 30)
    num_inner_steps = args.inner_steps or (10 if args.quick else 100)
    if args.iters is not None:
        num_inner_steps = inner_steps_for(num_steps, args.iters)
    if args.size in ("sd15", "sdxl"):
        resolution = args.resolution or (1024 if args.size == "sdxl" else 512)
    else:
        resolution = build_bundle(args.size, torch.device("cpu"), torch.float32).image_size
    args.resolution = resolution
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "size": args.size, "resolution": resolution,
            "num_ddim_steps": num_steps, "num_inner_steps": num_inner_steps,
            "train_iterations": schedule_iterations(num_steps, num_inner_steps)}
    try:
        import diffusers
        import transformers
        meta.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except Exception:  # pragma: no cover
        pass

    if args.check_precision:
        dtypes = tuple(d.strip() for d in args.precision_dtypes.split(",") if d.strip()) if args.precision_dtypes else None
        for d in dtypes or ():
            if d.partition("-")[0] not in DTYPES or d.partition("-")[2] not in ("", "autocast", "explicit"):
                raise SystemExit(f"--precision_dtypes: {d!r} is not <dtype>, <dtype>-autocast or <dtype>-explicit")
        if (args.precision_image is None) != (args.precision_prompt is None):
            raise SystemExit("--precision_image and --precision_prompt go together")
        if args.precision_image is not None and not (ROOT / "data" / "images" / args.precision_image).is_file():
            raise SystemExit(f"--precision_image: no file data/images/{args.precision_image}")
        subject = (args.precision_image, args.precision_prompt) if args.precision_image else None
        result = {**meta, "precision": check_precision(args.size, device, num_steps, num_inner_steps, args.seed,
                                                       resolution, dtypes, subject=subject)}
        log(precision_table(result["precision"]))
        for name, why in result["precision"]["failed"].items():
            log(f"{name}: FAILED ({why})")
        tol = result["precision"]["tolerance_db"]
        for name, d in result["precision"]["deltas"].items():
            log(f"{name}: reconstruction PSNR vs the input image moves {d['input_image_db']:+.3f} dB vs float32 "
                f"({'within' if d['within_tolerance_input_image'] else 'OUTSIDE'} +-{tol} dB); vs the decoded z0 "
                f"{d['image_db']:+.3f} dB ({'within' if d['within_tolerance'] else 'OUTSIDE'} +-{tol} dB)")
        _write(args.out, result)
        return result

    flops = args.flops_per_unet
    if flops is None and args.size == "sd15" and resolution == 512:
        flops = NOMINAL_SD15_FLOPS
    meta["flops_per_unet_row_used"] = flops
    modes = {"reference": reference_mode(), "fast": fast_mode(device, args.fast_dtype, args.compile, args.channels_last)}
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(wanted) - set(modes)
    if unknown:
        raise SystemExit(f"unknown --modes {sorted(unknown)}")
    log(f"StyleDiffusion benchmark: {args.size} at {resolution}px on {meta['device_name']} ({device}), T={num_steps}, "
        f"K={num_inner_steps} ({meta['train_iterations']} training iterations)")
    results = {**meta, "modes": {}, "failed_modes": {}}
    for name in wanted:
        try:
            results["modes"][name] = run_mode(modes[name], args, device, num_steps, num_inner_steps, flops, log=log)
        except Exception as err:  # keep the other mode's figures (one GPU session may be all there is)
            if isinstance(err, RuntimeError) and "out of memory" in str(err) and device.type == "cuda":
                torch.cuda.empty_cache()
            results["failed_modes"][name] = f"{type(err).__name__}: {err}"
            log(f"[{name}] FAILED: {results['failed_modes'][name]}")
            if args.fail_fast:
                raise
            continue
        if flops is None:
            results["flops_per_unet_row_used"] = flops = results["modes"][name]["measured_unet_flops_per_row"]
            results["modes"][name] = _recount(results["modes"][name], flops)
    if not results["modes"]:
        _write(args.out, results)
        raise SystemExit("every mode failed: " + "; ".join(f"{k}: {v}" for k, v in results["failed_modes"].items()))
    log("")
    log(detail_table(results))
    if {"reference", "fast"} <= set(results["modes"]):
        results["ratios"] = ratios(results)
        if device.type == "cpu":
            results["ratios_cpu_time"] = ratios(results, "cpu_seconds")
        # Both modes compute the same edit (same weights, same math): their results must agree up to
        # precision (explicit vs fused attention, and bf16/fp16 in fast mode on CUDA).
        a, b = (results["modes"][m]["edit_latents"] for m in ("reference", "fast"))
        results["edit_max_abs_diff_reference_vs_fast"] = float((a - b).abs().max())
        results["edit_latent_std"] = float(a.std())
        results["targets"] = check_targets(results)
        if results["targets"]["applicable"]:
            for k, c in results["targets"]["checks"].items():
                log(f"target {k}: {_num(c['value'], '{:.3f}')} -> {'met' if c['met'] else 'NOT met'}")
        log("")
        log(ratio_table(results))
    for m in results["modes"].values():
        m.pop("edit_latents", None)
    _write(args.out, results)
    return results


def _recount(mode_result: dict, flops: float) -> dict:
    """Fill in TFLOP/s once the per-row FLOP count is known (measured in the first mode)."""
    total = 0.0
    for rec in mode_result["phases"].values():
        rec["nominal_flops"] = (rec["rows_forward"] + 3 * rec["rows_forward_backward"]) * flops
        rec["tflops_per_s"] = rec["nominal_flops"] / rec["seconds"] / 1e12
        total += rec["nominal_flops"]
    mode_result["tflops_per_s"] = total / mode_result["total_seconds"] / 1e12
    return mode_result


def _write(path: Path | None, results: dict):
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
