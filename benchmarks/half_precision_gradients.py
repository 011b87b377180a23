"""Do half-precision gradients survive StyleDiffusion's backward pass? fp16 vs bf16, with and without loss scaling.

Training back-propagates a latent MSE through the frozen UNet into the mapping network M_i. The
gradient reaching the UNet's output is about 2 r / N per element (r: the residual, N: latent
elements, 16,384 for SD v1 at 512x512), i.e. ~1e-7 late in training: below float16's smallest normal
number (6.1e-5). This script builds one training iteration (DDIM step i of T on a real model, M_i at
its seeded initialisation, target = the predicted latent plus a residual of the given RMS), and
compares the gradient of M_i's weights in each precision with float32's: cosine similarity and the
fraction of exact zeros. ``--latent_elements`` rescales the loss so the UNet receives the per-element
gradient it would get at that latent size (default SD v1's 16,384).

    python benchmarks/half_precision_gradients.py --model testbed
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ptp_utils import BatchLayout  # noqa: E402
from stylediffusion.ddim import DDIMSchedule, guided  # noqa: E402
from stylediffusion.defaults import VARIANT  # noqa: E402
from stylediffusion.encoders import clip_image_features, encode_latent, encode_prompts  # noqa: E402
from stylediffusion.image_io import load_image  # noqa: E402
from stylediffusion.inversion import mapping_config  # noqa: E402
from stylediffusion.mapping import MappingNetworks  # noqa: E402
from stylediffusion.models import ModelBundle, load_models  # noqa: E402
from stylediffusion.sampling import predict  # noqa: E402
from stylediffusion.training import gradient_scaler  # noqa: E402

SD_LATENT_ELEMENTS = 4 * 64 * 64
SUBJECTS = {  # the test-bed model only knows its own world
    "testbed": ("testbed_red_triangle.png", "a large red triangle on a gray background"),
}
DEFAULT_SUBJECT = ("chelsea.jpg", "a photo of a cat")


def mapper_gradient(bundle: ModelBundle, image: torch.Tensor, prompt: str, residual: float, *,
                    latent_elements: int = SD_LATENT_ELEMENTS, num_steps: int = 10, step: int = 8,
                    scaled: bool = False) -> torch.Tensor:
    """Flattened gradient of M_step's weights for one training iteration with a residual of RMS ``residual``.

    ``scaled``: back-propagate through ``gradient_scaler(bundle)`` as training does (unscaled after).
    """
    schedule = DDIMSchedule(bundle.scheduler, num_steps)
    z = encode_latent(bundle, image)
    cond, uncond = encode_prompts(bundle, [prompt]), encode_prompts(bundle, [""])
    features = clip_image_features(bundle, image)
    torch.manual_seed(0)
    mapper = MappingNetworks(mapping_config(bundle, features, cond, VARIANT), num_steps)[step]
    with torch.no_grad():
        eps_u = predict(bundle, schedule, z, step, uncond, BatchLayout.single())
    eps_c = predict(bundle, schedule, z, step, cond, BatchLayout.single(), values=mapper(features, cond))
    z_prev = schedule.sample_step(guided(eps_u, eps_c, 7.5), z, step)
    noise = torch.randn(z_prev.shape, generator=torch.Generator().manual_seed(1)).to(z_prev.device)
    # a mean over N elements: rescale to the per-element gradient of a latent with latent_elements
    loss = F.mse_loss(z_prev, z_prev.detach() + residual * noise) * (z_prev.numel() / latent_elements)
    optimizer = torch.optim.Adam(mapper.parameters())
    scaler = gradient_scaler(bundle) if scaled else None
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    return torch.cat([p.grad.flatten() for p in mapper.parameters()])


def compare(model: str, device: torch.device, residuals: tuple[float, ...], latent_elements: int) -> list[dict]:
    image_name, prompt = SUBJECTS.get(model, DEFAULT_SUBJECT)
    bundles = {
        name: load_models(model, device=device, dtype=dtype)
        for name, dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16))
    }
    image = load_image(ROOT / "data" / "images" / image_name, bundles["float32"].image_size)[0].to(device)
    rows = []
    for r in residuals:
        reference = mapper_gradient(bundles["float32"], image, prompt, r, latent_elements=latent_elements)
        for label, name, scaled in (("float16", "float16", False), ("float16 + loss scaling", "float16", True),
                                    ("bfloat16", "bfloat16", False)):
            g = mapper_gradient(bundles[name], image, prompt, r, latent_elements=latent_elements, scaled=scaled)
            rows.append({"residual_rms": r, "precision": label,
                         "cosine_to_float32": F.cosine_similarity(g.float(), reference, dim=0).item(),
                         "zero_fraction": (g == 0).float().mean().item()})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="testbed", help="hub id, local folder, testbed or tiny (default testbed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--residuals", default="1e-2,1e-3,1e-4", help="comma list of residual RMS values")
    p.add_argument("--latent_elements", type=int, default=SD_LATENT_ELEMENTS,
                   help="latent size whose per-element gradient to emulate (default SD v1 at 512: 16384)")
    args = p.parse_args(argv)
    rows = compare(args.model, torch.device(args.device), tuple(float(x) for x in args.residuals.split(",")),
                   args.latent_elements)
    print(f"model {args.model}, gradient scale of a {args.latent_elements}-element latent")
    print("| residual RMS | precision | cosine to float32 gradient | exact zeros |\n|---:|---|---:|---:|")
    for row in rows:
        print(f"| {row['residual_rms']:g} | {row['precision']} | {row['cosine_to_float32']:.4f} | "
              f"{row['zero_fraction']:.1%} |")
    return rows


if __name__ == "__main__":
    main()
