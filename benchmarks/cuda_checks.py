"""The first CUDA run's checks of what the CPU could only stand in for (tests/test_device_placement.py).

Each check prints one ``check <name>: ok / FAILED (...)`` line and goes into ``--out`` (JSON):
- ``dtype``: the GPU's compute capability and what ``--dtype auto`` picks there (bfloat16 from 8.0);
- ``syncs``: ``torch.cuda.set_sync_debug_mode`` counts the host syncs of a DDIM inversion and of a
  P2Plus edit (LocalBlend on): none per step is the promise (training's ``loss.item()`` is its early stop);
- ``from_pipe``: an SD v1.5-shaped pipeline (random weights, ``--resolution``) borrowed plain, after
  ``enable_model_cpu_offload()``, after ``enable_sequential_cpu_offload()`` and with a
  ``torch.compile``d UNet: StyleDiffusion trains and edits on the GPU in each, the offloaded edits
  agree with the plain one, and the pipeline still generates afterwards;
- ``missing_device`` / ``out_of_memory``: ``--device cuda:<count>`` and a memory cap each give one
  ``error:`` line and exit code 2;
- ``determinism``: the same test-bed DirectInversion edit in two fresh processes (cuDNN autotune off,
  as in the runners): the largest difference between their latents (0 = bit for bit).

    python benchmarks/cuda_checks.py --out results/cuda_checks.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from stylediffusion import StyleDiffusionEditor  # noqa: E402
from stylediffusion.models import native_bf16, resolve_dtype  # noqa: E402

SCENE = ROOT / "data" / "images" / "testbed_red_triangle.png"
SOURCE, TARGET = "a red triangle", "a blue triangle"


def check_dtype(device) -> dict:
    capability = torch.cuda.get_device_capability(device)
    auto = resolve_dtype("auto", device)
    ok = auto == (torch.bfloat16 if capability[0] >= 8 else torch.float16) and native_bf16(device) == (
        capability[0] >= 8
    )
    return {"ok": ok, "capability": list(capability), "name": torch.cuda.get_device_name(device),
            "auto_dtype": str(auto), "is_bf16_supported": torch.cuda.is_bf16_supported()}


def count_syncs(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check_syncs(device) -> dict:
    from stylediffusion.ddim import DDIMSchedule
    from stylediffusion.editing import EditSpec, run_edit
    from stylediffusion.encoders import encode_latent, encode_prompts
    from stylediffusion.image_io import load_image
    from stylediffusion.sampling import ddim_inversion

    editor = StyleDiffusionEditor.from_pretrained("testbed", device=device, progress=False)
    b = editor.bundle
    z0 = encode_latent(b, load_image(SCENE, b.image_size)[0])
    out = {}
    for T in (5, 10):
        schedule = DDIMSchedule(b.scheduler, T)
        cond = encode_prompts(b, [SOURCE])
        traj = ddim_inversion(b, schedule, z0, cond, progress=False)  # warm-up (first calls allocate)
        spec = EditSpec(SOURCE, TARGET, tau_u=0.5, blend_words=("triangle", "triangle"))
        def invert(schedule=schedule, cond=cond):
            return ddim_inversion(b, schedule, z0, cond, progress=False)

        def edit(schedule=schedule, traj=traj, spec=spec):
            return run_edit(b, schedule, traj.z_T, spec, progress=False)

        out[f"inversion_T{T}"], out[f"edit_T{T}"] = count_syncs(invert), count_syncs(edit)
    out["ok"] = out["inversion_T5"] == out["inversion_T10"] and out["edit_T5"] == out["edit_T10"]
    return out


def sd15_pipe(device, resolution: int):
    from bench_models import sd15_components
    from diffusers import StableDiffusionPipeline

    parts = sd15_components(torch.device("cpu"), 0, resolution)
    image_encoder = parts.pop("image_encoder")
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=torch.bfloat16), image_encoder.to(device=device, dtype=torch.bfloat16)


def check_from_pipe(device, resolution: int) -> dict:
    from PIL import Image

    image = Image.open(SCENE).convert("RGB").resize((resolution, resolution))
    results, latents = {}, {}
    for how in ("plain", "model_cpu_offload", "sequential_cpu_offload", "compiled_unet"):
        pipe, image_encoder = sd15_pipe(device, resolution)
        if how == "model_cpu_offload":
            pipe.enable_model_cpu_offload(device=device)
        elif how == "sequential_cpu_offload":
            pipe.enable_sequential_cpu_offload(device=device)
        elif how == "compiled_unet":
            pipe.unet = torch.compile(pipe.unet)
        t0 = time.perf_counter()
        try:
            editor = StyleDiffusionEditor.from_pipe(pipe, image_encoder=image_encoder, progress=False)
            inv = editor.invert(image, SOURCE, num_inference_steps=4, num_inner_steps=2)
            out = editor.edit(inv, TARGET, tau_u=0.5)
            latents[how] = out.latents[0].float()
            after = pipe(SOURCE, num_inference_steps=2, height=resolution, width=resolution, output_type="np").images
            results[how] = {"ok": bool(after.shape[0] == 1), "device": str(editor.bundle.device),
                            "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as err:  # report and go on with the other cases
            results[how] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        del pipe
        torch.cuda.empty_cache()
    for how in ("model_cpu_offload", "sequential_cpu_offload"):
        if how in latents and "plain" in latents:
            diff = float((latents[how] - latents["plain"]).abs().max())
            results[how]["max_abs_diff_vs_plain"] = diff
            results[how]["ok"] = results[how]["ok"] and diff < 1e-2
    results["ok"] = all(r["ok"] for r in results.values() if isinstance(r, dict))
    return results


def one_line_exit_2(args: list[str], env: dict | None = None) -> dict:
    import os

    proc = subprocess.run([sys.executable, "-m", "stylediffusion", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    lines = proc.stderr.strip().splitlines()
    ok = proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:")
    return {"ok": ok, "returncode": proc.returncode, "stderr": proc.stderr.strip()[-800:]}


OOM_RUN = """
import sys, torch
torch.cuda.set_per_process_memory_fraction(float(sys.argv[1]))
from stylediffusion.cli import main
sys.exit(main(sys.argv[2:]))
"""


def check_out_of_memory(resolution_model: str) -> dict:
    import os

    args = [
        "--model",
        resolution_model,
        "--image_path",
        str(SCENE),
        "--prompt",
        SOURCE,
        "--target",
        TARGET,
        "--num_ddim_steps",
        "4",
        "--num_inner_steps",
        "2",
        "--outdir",
        "/tmp/cuda_checks_oom",
        "--progress",
        "False",
    ]
    proc = subprocess.run([sys.executable, "-c", OOM_RUN, "0.00001", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    lines = proc.stderr.strip().splitlines()
    ok = proc.returncode == 2 and len(lines) == 1 and "ran out of memory" in lines[0]
    return {"ok": ok, "returncode": proc.returncode, "stderr": proc.stderr.strip()[-800:]}


DETERMINISM_RUN = """
import sys, torch
from safetensors.torch import save_file
from stylediffusion import StyleDiffusionEditor
torch.backends.cudnn.benchmark = False
e = StyleDiffusionEditor.from_pretrained("testbed", device="cuda", progress=False)
inv = e.invert(sys.argv[1], "a red triangle", method=sys.argv[3], num_inference_steps=10, num_inner_steps=10)
save_file({"latent": e.edit(inv, "a blue triangle", tau_u=0.5).latents[0].contiguous().cpu()}, sys.argv[2])
"""


def check_determinism(method: str) -> dict:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(tmp) / f"run{k}.safetensors") for k in range(2)]
        for path in paths:
            subprocess.run([sys.executable, "-c", DETERMINISM_RUN, str(SCENE), path, method], cwd=ROOT, check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
        a, b = (load_file(p)["latent"] for p in paths)  # safetensors: no pickle is read
    diff = float((a.float() - b.float()).abs().max())
    return {"ok": True, "method": method, "max_abs_diff_between_processes": diff, "bitwise_equal": diff == 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resolution", type=int, default=256, help="of the SD v1.5-shaped pipeline for from_pipe")
    p.add_argument("--only", nargs="+", default=None,
                   choices=("dtype", "syncs", "from_pipe", "missing_device", "out_of_memory", "determinism"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: these checks are for the GPU machine (the CPU stand-ins are "
              "tests/test_device_placement.py)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    checks = {
        "dtype": lambda: check_dtype(device),
        "syncs": lambda: check_syncs(device),
        "from_pipe": lambda: check_from_pipe(device, args.resolution),
        "missing_device": lambda: one_line_exit_2(["--model", "tiny", "--device", f"cuda:{torch.cuda.device_count()}",
                                                   "--image_path", str(SCENE), "--prompt", SOURCE, "--target", TARGET]),
        "out_of_memory": lambda: check_out_of_memory("testbed"),
        "determinism": lambda: {"stylediffusion": check_determinism("stylediffusion"),
                                "directinv": check_determinism("directinv"), "ok": True},
    }
    results = {}
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = check()
        except Exception as err:
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(
            f"check {name}: {'ok' if results[name]['ok'] else 'FAILED'} {json.dumps(results[name])[:600]}", flush=True
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
