"""How far each inversion of a ``testbed_inversion.py`` run lands from the VAE's own ceiling, per scene.

An inversion that gives back z0 exactly reconstructs decode(encode(x)), not x: its PSNR against the
input is the VAE's round trip, the ceiling of an exact latent reconstruction. A method that misses z0
can land on either side of it (the decoder's error and the latent error may partly cancel). This
script recomputes the ceiling for the scenes of a run (same ``--seed`` and ``--n``) and prints each
method's PSNR minus it.

    python benchmarks/testbed_vae_ceiling.py --seed 4321 --n 6 \
        --results docs/testbed_bench/sdplus/inversion_T50_seed4321/results.csv
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stylediffusion import StyleDiffusionEditor  # noqa: E402
from stylediffusion.encoders import decode_latent, encode_latent  # noqa: E402
from stylediffusion.image_io import tensor_to_pil  # noqa: E402
from stylediffusion.metrics import psnr  # noqa: E402
from stylediffusion.testbed import world  # noqa: E402


def vae_ceilings(editor: StyleDiffusionEditor, seed: int, n: int) -> list[float]:
    """PSNR of decode(encode(x)) against x for the held-out scenes ``testbed_inversion.py`` draws."""
    bundle = editor.bundle
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, split="heldout", size=bundle.image_size) for _ in range(n)]
    out = []
    for scene in scenes:
        with torch.no_grad():
            round_trip = decode_latent(bundle, encode_latent(bundle, editor._pixels(scene.pil())))
        out.append(psnr(np.asarray(tensor_to_pil(round_trip.reshape(round_trip.shape[-3:]))), scene.image))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="testbed")
    p.add_argument("--seed", type=int, required=True, help="the run's --seed")
    p.add_argument("--n", type=int, required=True, help="the run's --n")
    p.add_argument("--results", type=Path, required=True, help="the run's results.csv")
    args = p.parse_args(argv)
    if not args.results.is_file():
        p.error(f"--results {str(args.results)!r} is not a file: pass the results.csv of a testbed_inversion.py run")
    if args.n < 1:
        p.error("--n must be at least 1")
    torch.set_num_threads(1)
    editor = StyleDiffusionEditor.from_pretrained(args.model, device="cpu", torch_dtype=torch.float32, progress=False)
    ceilings = vae_ceilings(editor, args.seed, args.n)
    with args.results.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("scene", "").isdigit() and int(r["scene"]) < args.n]
    if not rows or not {"method", "psnr"} <= set(rows[0]):
        p.error(f"--results {str(args.results)!r} holds no rows of a testbed_inversion.py run for these scenes")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    gaps = defaultdict(list)
    print("| scene | VAE ceiling | " + " | ".join(f"{m} − ceiling" for m in methods) + " |")
    print("|---" * (len(methods) + 2) + "|")
    for s, ceiling in enumerate(ceilings):
        got = {r["method"]: float(r["psnr"]) for r in rows if int(r["scene"]) == s}
        if set(got) != set(methods):
            p.error(f"--results has no row of {sorted(set(methods) - set(got))} for scene {s}: is --n the run's?")
        for m in methods:
            gaps[m].append(got[m] - ceiling)
        print(f"| {s} | {ceiling:.2f} dB | " + " | ".join(f"{got[m] - ceiling:+.3f} dB" for m in methods) + " |")
    print(f"| mean | {np.mean(ceilings):.2f} dB | " + " | ".join(f"{np.mean(gaps[m]):+.3f} dB" for m in methods) + " |")


if __name__ == "__main__":
    main()
