"""The models the benchmarks run on, and what every benchmark run records about its machine.

``build_bundle(size, ...)``: ``sd15`` / ``sdxl`` are SD v1.5's / SDXL base 1.0's architectures from the JSON
configs in ``stylediffusion/configs`` with seeded random weights (timing does not depend on the weights,
and real ones cannot reach a GPU machine); ``tiny`` and ``testbed`` are ``load_models(size)``.
Used by benchmarks/gpu_bench.py, benchmarks/precision_check.py, benchmarks/sd15_training_cost.py and
benchmarks/cuda_checks.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from stylediffusion.models import ModelBundle, load_models, sd_tokenizer  # noqa: E402
from stylediffusion.training import inner_steps  # noqa: E402

CONFIG_DIR = ROOT / "stylediffusion" / "configs" / "sd15"
SDXL_CONFIG_DIR = ROOT / "stylediffusion" / "configs" / "sdxl"  # the hub files of SDXL base 1.0 (tests/fixtures)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES = ("sd15", "sdxl", "tiny", "testbed")


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


def build_bundle(
    size: str, device: torch.device, dtype: torch.dtype, seed: int = 0, resolution: int = 512
) -> ModelBundle:
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



# ----------------------------------------------------------------------------- the run
def resolve_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return device


def default_size(device: torch.device) -> str:
    return "sd15" if device.type == "cuda" else "tiny"


def resolve_resolution(size: str, resolution: int | None) -> int:
    """The image size a run uses: --resolution for the random SD-shaped models, the loaded model's own otherwise."""
    if size in ("sd15", "sdxl"):
        return resolution or (1024 if size == "sdxl" else 512)
    return build_bundle(size, torch.device("cpu"), torch.float32).image_size


def run_metadata(device: torch.device, size: str, resolution: int) -> dict:
    """Date, machine and library versions: the header of every result file."""
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "size": size,
        "resolution": resolution,
    }
    try:
        import diffusers
        import transformers
        meta.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except Exception:  # pragma: no cover
        pass
    return meta


def write_json(path: Path | None, results: dict):
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))


def schedule_iterations(num_steps: int, num_inner_steps: int) -> int:
    return sum(inner_steps(num_inner_steps, i) for i in range(num_steps))


def inner_steps_for(num_steps: int, iterations: int) -> int:
    """The smallest K whose schedule sum_i ceil(K exp(-0.1 i)) reaches ``iterations``."""
    k = 1
    while schedule_iterations(num_steps, k) < iterations:
        k += 1
    return k


def resolve_schedule(args: argparse.Namespace) -> tuple[int, int]:
    """(T, K) from --steps, --inner_steps, --iters and --quick."""
    num_steps = args.steps or (10 if args.quick else 30)
    num_inner_steps = args.inner_steps or (10 if args.quick else 100)
    if args.iters is not None:
        num_inner_steps = inner_steps_for(num_steps, args.iters)
    return num_steps, num_inner_steps


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every benchmark program here shares: model, schedule, seed, threads, output file."""
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="sd15: SD v1.5 architecture, random weights (default on CUDA); sdxl: SDXL base 1.0's "
                        "architecture, random weights; tiny: load_models('tiny') (default on CPU); testbed: the "
                        "project's trained test-bed model (load_models('testbed'))")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size for --size sd15 (default 512) and sdxl (default 1024)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps T (default 30; 10 with --quick)")
    p.add_argument("--inner_steps", type=int, default=None, help="K (default 100, i.e. 1015 iterations at T=30)")
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="total training iterations: picks the smallest K whose schedule reaches it (overrides --inner_steps)",
    )
    p.add_argument("--quick", action="store_true", help="T=10, K=10 (72 training iterations) unless given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: leave as is)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")

