"""Reconstruction and cost of inversions on held-out test-bed scenes (the paper's Table 3 on the test bed).

For every scene and inversion it measures, in one process (so the ratios compare like with like):
- reconstruction PSNR / SSIM of the source branch (an edit whose target is the source prompt) vs the input;
- the inversion's UNet calls: forwards without gradient, forwards with gradient, and backward passes
  through the UNet (counted on the UNet's output, so a forward that is never back-propagated does not count);
- the inversion's wall time and CPU time (``time.process_time``, this process only).
Per-step records (each method's final loss per DDIM step, and how far the source branch's latent is
from the inversion trajectory z*_t after each step) go to ``steps.json`` for ``stylediffusion_why.py``.
Writes ``results.csv`` (one row per scene and method; a rerun resumes) and ``summary.md`` to ``--outdir``.

    python benchmarks/testbed_inversion.py --n 10 --seed 4321 --num_ddim_steps 50 --num_inner_steps 100 \\
        --methods stylediffusion stylediffusion_plus nulltext directinv --outdir docs/testbed_bench/inversion_T50
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.testbed_reports import write_summary_table  # noqa: E402
from stylediffusion import StyleDiffusionEditor  # noqa: E402
from stylediffusion.ddim import DDIMSchedule  # noqa: E402
from stylediffusion.defaults import GUIDANCE_SCALE, NUM_INNER_STEPS  # noqa: E402
from stylediffusion.encoders import encode_latent, encode_prompts  # noqa: E402
from stylediffusion.files import append_csv_rows, atomic_write_text  # noqa: E402
from stylediffusion.methods import get_inversion  # noqa: E402
from stylediffusion.metrics import psnr, ssim  # noqa: E402
from stylediffusion.sampling import ddim_inversion  # noqa: E402
from stylediffusion.testbed import world  # noqa: E402

COLUMNS = ["scene", "objects", "sizes", "method", "psnr", "ssim", "wall_seconds", "cpu_seconds", "unet_forward_no_grad",
           "unet_forward_grad", "unet_backward"]


class UNetCallCounter:
    """Counts the UNet's forward calls (with and without autograd) and the backward passes through it."""

    def __init__(self, unet: torch.nn.Module):
        self.reset()
        self._handle = unet.register_forward_hook(self._forward)

    def reset(self) -> None:
        self.forward_no_grad = self.forward_grad = self.backward = 0

    def _count_backward(self, grad):
        self.backward += 1
        return grad

    def _forward(self, module, args, output):
        sample = output.sample if hasattr(output, "sample") else output[0]
        if sample.requires_grad:
            self.forward_grad += 1
            sample.register_hook(self._count_backward)
        else:
            self.forward_no_grad += 1

    def remove(self) -> None:
        self._handle.remove()


def method_name(spec: str) -> str:
    return spec.split("@")[0]


def method_options(spec: str) -> dict:
    """``name@key=value,...`` -> {key: value} (numbers converted; the method's declarations check the rest)."""
    if "@" not in spec:
        return {}
    out = {}
    for item in spec.split("@", 1)[1].split(","):
        key, _, value = item.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def describe(scene: world.Scene) -> tuple[int, str]:
    return len(scene.objects), "+".join(o.size or "default" for o in scene.objects)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="testbed")
    p.add_argument("--n", type=int, default=10, help="held-out scenes")
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--methods", nargs="+", default=["stylediffusion", "stylediffusion_plus", "nulltext", "directinv"],
                   help="inversions; NAME@KEY=VALUE,KEY=VALUE passes options (e.g. stylediffusion@num_inner_steps=100, "
                        "stylediffusion@variant=replace), and the whole string labels the rows")
    p.add_argument("--num_ddim_steps", type=int, default=50)
    p.add_argument("--num_inner_steps", type=int, default=NUM_INNER_STEPS)
    p.add_argument("--guidance_scale", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--outdir", type=Path, default=Path("outputs/testbed_inversion"))
    args = p.parse_args(argv)
    for m in args.methods:
        get_inversion(method_name(m))
    torch.set_num_threads(1)
    editor = StyleDiffusionEditor.from_pretrained(args.model, device="cpu", torch_dtype=torch.float32, progress=False)
    bundle = editor.bundle
    rng = np.random.default_rng(args.seed)
    scenes = [world.sample_scene(rng, split="heldout", size=bundle.image_size) for _ in range(args.n)]
    args.outdir.mkdir(parents=True, exist_ok=True)
    csv_path, steps_path = args.outdir / "results.csv", args.outdir / "steps.json"
    rows = list(csv.DictReader(csv_path.open())) if csv_path.is_file() else []
    steps = json.loads(steps_path.read_text()) if steps_path.is_file() else {}
    done = {(int(r["scene"]), r["method"]) for r in rows}
    counter = UNetCallCounter(bundle.unet)
    T = args.num_ddim_steps
    for s, scene in enumerate(scenes):
        objects, sizes = describe(scene)
        trajectory = None
        for method in args.methods:
            if (s, method) in done:
                continue
            counter.reset()
            wall, cpu = time.perf_counter(), time.process_time()
            options = {"num_inner_steps": args.num_inner_steps, **method_options(method)}
            inv = editor.invert(scene.pil(), scene.caption, method=method_name(method), num_inference_steps=T,
                                guidance_scale=args.guidance_scale, seed=0, **options)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            calls = (counter.forward_no_grad, counter.forward_grad, counter.backward)
            if trajectory is None:  # z*_0..z*_T, to measure how far each method's source branch drifts from it
                with torch.no_grad():
                    z0 = encode_latent(bundle, inv.image.to(bundle.device))
                    trajectory = ddim_inversion(bundle, DDIMSchedule(bundle.scheduler, T), z0,
                                                encode_prompts(bundle, [scene.caption]), record_maps=False,
                                                progress=False).latents
            drift = []

            def on_step_end(editor, i, t, callback_kwargs, drift=drift, trajectory=trajectory):
                z = callback_kwargs["latents"]
                drift.append(float((z[:1] - trajectory[T - i - 1]).pow(2).mean()))
                return callback_kwargs

            out = editor.edit(inv, [scene.caption], guidance_scale=args.guidance_scale,
                              callback_on_step_end=on_step_end)
            recon = np.asarray(out.reconstruction)
            row = {"scene": s, "objects": objects, "sizes": sizes, "method": method,
                   "psnr": round(psnr(recon, scene.image), 3), "ssim": round(ssim(recon, scene.image), 4),
                   "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "unet_forward_no_grad": calls[0],
                   "unet_forward_grad": calls[1], "unet_backward": calls[2]}
            append_csv_rows(csv_path, COLUMNS, [row])
            rows.append({k: str(v) for k, v in row.items()})
            steps[f"{s}:{method}"] = {"objects": objects, "sizes": sizes, "caption": scene.caption, "drift": drift,
                                      "final_losses": inv.metadata.get("final_losses"),
                                      "residual_mse": inv.metadata.get("residual_mse")}
            atomic_write_text(steps_path, json.dumps(steps))
            print(f"scene {s + 1}/{len(scenes)} {method}: PSNR {row['psnr']:.2f} dB, {cpu:.1f} s CPU, "
                  f"UNet {calls[0]} + {calls[1]} grad forwards, {calls[2]} backwards", flush=True)
    counter.remove()
    write_summary(args, rows)


def write_summary(args, rows: list[dict]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    scenes = sorted({int(r["scene"]) for r in rows if r["method"] == methods[0]})
    complete = [s for s in scenes if all(any(int(r["scene"]) == s and r["method"] == m for r in rows) for m in methods)]
    mine = lambda m, key, where=lambda r: True: [float(r[key]) for r in rows  # noqa: E731
                                                 if r["method"] == m and int(r["scene"]) in complete and where(r)]
    ref = "stylediffusion" if "stylediffusion" in methods else methods[0]
    lines = [f"Inversions on the test bed: model `{args.model}`, {len(complete)} held-out scenes (seed {args.seed}), "
             f"T={args.num_ddim_steps}, K={args.num_inner_steps}, w={args.guidance_scale}; one process, one thread, "
             f"shared CPU.", "",
             "| inversion | PSNR | SSIM | PSNR, one object | PSNR, two objects | CPU s | wall s | UNet forwards "
             "(no grad + grad) | UNet backwards | backwards / " + ref + " | CPU / " + ref + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        one = mine(m, "psnr", lambda r: r["objects"] == "1")
        two = mine(m, "psnr", lambda r: r["objects"] == "2")
        back, cpu = sum(mine(m, "unet_backward")), sum(mine(m, "cpu_seconds"))
        back_ref, cpu_ref = sum(mine(ref, "unet_backward")), sum(mine(ref, "cpu_seconds"))
        lines.append(
            f"| {m} | {np.mean(mine(m, 'psnr')):.2f} dB | {np.mean(mine(m, 'ssim')):.4f} | "
            f"{np.mean(one) if one else float('nan'):.2f} dB (n={len(one)}) | "
            f"{np.mean(two) if two else float('nan'):.2f} dB (n={len(two)}) | {np.mean(mine(m, 'cpu_seconds')):.2f} | "
            f"{np.mean(mine(m, 'wall_seconds')):.2f} | {np.mean(mine(m, 'unet_forward_no_grad')):.0f} + "
            f"{np.mean(mine(m, 'unet_forward_grad')):.0f} | {np.mean(mine(m, 'unet_backward')):.0f} | "
            f"{back / back_ref if back_ref else float('nan'):.3f} | {cpu / cpu_ref:.3f} |")
    write_summary_table(args.outdir, lines)


if __name__ == "__main__":
    main()
