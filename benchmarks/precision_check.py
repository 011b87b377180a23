"""Half-precision check: train the same StyleDiffusion inversion in float32 and in half precision and
compare the reconstruction PSNRs.

Trains in float32 and in bfloat16 (float16 too on CUDA; any list with ``--precision_dtypes``, incl.
``<dtype>-autocast`` and the rounding-noise control ``float32-explicit``) and reports the reconstruction
PSNR of each and its difference to float32 (tolerance 0.1 dB): against the input image (what papers
report; includes the VAE's error), against decode(z0) (the inversion's own error, which at 50+ dB moves
with any rounding change) and in latent space.

``--size testbed`` (the project's trained test-bed model, 32 px) is the run to read: a random model
exaggerates rounding noise. The models: benchmarks/bench_models.py.

Run ``python benchmarks/precision_check.py --help``; see benchmarks/README.md and docs/performance.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_models import (  # noqa: E402
    DTYPES,
    add_run_arguments,
    build_bundle,
    default_size,
    resolve_device,
    resolve_resolution,
    resolve_schedule,
    run_metadata,
    schedule_iterations,
    write_json,
)
from benchmarks.cost_modes import ExplicitEverywhere, recorder_for  # noqa: E402
from ptp_utils import BatchLayout, controlled, install_attention_control  # noqa: E402
from stylediffusion import sampling as sd_sampling  # noqa: E402
from stylediffusion.ddim import DDIMSchedule, guided  # noqa: E402
from stylediffusion.encoders import clip_image_features, decode_latent, encode_latent, encode_prompts  # noqa: E402
from stylediffusion.inversion import mapping_config  # noqa: E402
from stylediffusion.mapping import MappingNetworks  # noqa: E402
from stylediffusion.models import ModelBundle  # noqa: E402
from stylediffusion.sampling import ddim_inversion, predict  # noqa: E402
from stylediffusion.training import TrainConfig, train_mapping_networks  # noqa: E402

SOURCE_PROMPT = "a photo of a cat sitting on the grass"
# what each --size inverts: (image under data/images, its source prompt)
PRECISION_SUBJECTS = {
    "tiny": ("chelsea.jpg", SOURCE_PROMPT),
    "sd15": ("chelsea.jpg", SOURCE_PROMPT),
    "sdxl": ("chelsea.jpg", SOURCE_PROMPT),
    # the trained test-bed model only knows its synthetic world: invert one of its scenes with its caption
    "testbed": ("testbed_red_triangle.png", "a large red triangle on a gray background"),
}
VARIANT_SUFFIXES = ("", "autocast", "explicit")


def _num(x, fmt="{:.3g}"):
    return "n/a" if x is None else fmt.format(x)


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
        eps_u, eps_c = predict(
            bundle, schedule, torch.cat([z, z]), i, text, BatchLayout.guided(1), values=values
        ).chunk(2)
        z = schedule.sample_step(guided(eps_u, eps_c, guidance_scale), z, i)
    return z


def load_test_image(size: int, seed: int, name: str = "chelsea.jpg") -> torch.Tensor:
    path = ROOT / "data" / "images" / name
    if path.is_file():
        from stylediffusion.image_io import load_image
        return load_image(path, size)[0]
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(
        torch.rand(1, 3, size // 8, size // 8, generator=g) * 2 - 1,
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )


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
    with controlled(install_attention_control(bundle.unet), ExplicitEverywhere() if explicit else None):
        trajectory = ddim_inversion(bundle, schedule, z0, cond, progress=False, recorder=recorder_for(explicit))
        reports = train_mapping_networks(bundle, schedule, trajectory, features, cond, uncond, mappers, cfg,
                                         progress=False, recorder=recorder_for(explicit, keep_grad=True))
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
    out = {
        "size": size,
        "image": subject[0],
        "prompt": subject[1],
        "device": str(device),
        "num_ddim_steps": num_steps,
        "num_inner_steps": num_inner_steps,
        "tolerance_db": tolerance_db,
        "runs": {},
        "deltas": {},
        "failed": failed,
    }
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
    lines = [
        "| dtype | iterations | PSNR vs input image (dB) | delta (dB) | PSNR vs decoded z0 (dB) | delta (dB) | "
        "PSNR latent (dB) | same M_i, fp32 sampling: PSNR vs decoded z0 (dB) | plain DDIM PSNR vs decoded z0 (dB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in result["runs"].items():
        delta = result["deltas"].get(name, {})
        lines.append(f"| {name} | {run['iterations']} | {run['psnr_input_image_db']:.3f} | "
                     f"{_num(delta.get('input_image_db'), '{:+.3f}')} | {run['psnr_image_db']:.3f} | "
                     f"{_num(delta.get('image_db'), '{:+.3f}')} | {run['psnr_latent_db']:.3f} | "
                     f"{_num(run['psnr_image_fp32_sampling_db'], '{:.3f}')} | {run['psnr_image_plain_ddim_db']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked: a bad --precision_dtypes / --precision_image is one line and exit code 2."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--precision_dtypes", type=parse_dtypes, default=None,
                   help="comma list compared with float32, e.g. bfloat16,bfloat16-autocast "
                        "(default bfloat16 on CPU, bfloat16,float16 on CUDA)")
    p.add_argument("--precision_image", default=None, help="image under data/images to invert (default per --size)")
    p.add_argument("--precision_prompt", default=None, help="its source prompt (with --precision_image)")
    args = p.parse_args(argv)
    if (args.precision_image is None) != (args.precision_prompt is None):
        p.error("--precision_image and --precision_prompt go together")
    if args.precision_image is not None and not (ROOT / "data" / "images" / args.precision_image).is_file():
        p.error(f"--precision_image: no file data/images/{args.precision_image}")
    return args


def parse_dtypes(text: str) -> tuple[str, ...] | None:
    """--precision_dtypes: a comma list of <dtype>, <dtype>-autocast or <dtype>-explicit (empty: the default)."""
    dtypes = tuple(d.strip() for d in text.split(",") if d.strip())
    for d in dtypes:
        name, _, how = d.partition("-")
        if name not in DTYPES or how not in VARIANT_SUFFIXES:
            raise argparse.ArgumentTypeError(f"{d!r} is not <dtype>, <dtype>-autocast or <dtype>-explicit")
    return dtypes or None


def report(result: dict, log=print) -> None:
    log(precision_table(result))
    for name, why in result["failed"].items():
        log(f"{name}: FAILED ({why})")
    tol = result["tolerance_db"]
    for name, d in result["deltas"].items():
        log(f"{name}: reconstruction PSNR vs the input image moves {d['input_image_db']:+.3f} dB vs float32 "
            f"({'within' if d['within_tolerance_input_image'] else 'OUTSIDE'} +-{tol} dB); vs the decoded z0 "
            f"{d['image_db']:+.3f} dB ({'within' if d['within_tolerance'] else 'OUTSIDE'} +-{tol} dB)")


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.precision_dtypes
    subject = (args.precision_image, args.precision_prompt) if args.precision_image else None
    device = resolve_device(args.device)
    size = args.size or default_size(device)
    resolution = resolve_resolution(size, args.resolution)
    num_steps, num_inner_steps = resolve_schedule(args)
    meta = {**run_metadata(device, size, resolution), "num_ddim_steps": num_steps, "num_inner_steps": num_inner_steps,
            "train_iterations": schedule_iterations(num_steps, num_inner_steps)}
    result = {**meta, "precision": check_precision(size, device, num_steps, num_inner_steps, args.seed, resolution,
                                                   dtypes, subject=subject)}
    report(result["precision"], log)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
