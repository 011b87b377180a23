"""StyleDiffusion's memory and FLOPs at SD v1.5 or SDXL size, from shapes alone (no GPU, no weights, no compute).

Builds the SD v1.5 architecture (configs in ``stylediffusion/configs/sd15``; ``--size sdxl``: SDXL
base 1.0 at 1024², ``stylediffusion/configs/sdxl``) on PyTorch's ``meta``
device, where tensors have shapes and dtypes but no data, and runs one training iteration of each
benchmark mode exactly as ``train_mapping_networks`` does (mapping network -> UNet with the learned
values and the mid-low attention recorder -> DDIM step -> latent MSE + attention loss -> backward).
It counts what stays resident during the backward pass:

- weights of the frozen models (UNet, text and image encoders in the mode's dtype, VAE in fp32),
- weight gradients (reference mode: the UNet's parameters require grad, as in the released code),
- activations saved for the backward pass (``torch.autograd.graph.saved_tensors_hooks``), counted
  once per storage and leaving out parameters.

Fused attention is emulated: on ``meta`` PyTorch would take SDPA's math path and materialise every
attention map, which a GPU's flash / memory-efficient kernels do not. Under a ``TorchFunctionMode``
each ``F.scaled_dot_product_attention`` call saves what those kernels save (q, k, v, output and the
per-row log-sum-exp). The reference mode computes explicit maps everywhere, so it saves them.

The result is a lower bound on ``torch.cuda.max_memory_allocated``: it leaves out the backward
pass's transient buffers (gradients of the activations being processed, kernel workspaces) and the
allocator's rounding. Compare with the GPU benchmark's measured peak when a GPU is available.

FLOPs: ``torch.utils.flop_counter`` on the same code paths (without the attention emulation: fused
kernels do the same matrix products): one training iteration (forward + backward; the reference
also computes weight gradients and re-runs the CLIP image encoder in every cross-attention layer),
one UNet call with learned values and one without. From them, the work of inversion (T plain
calls), training (I iterations + per step one plain and one learned call) and a P2Plus edit (per
step four rows, plus the reference's image encoder once per conditional call) for T=30, K=100, and
the time those FLOPs take at a given rate (a floor: no GPU reaches its peak rate).

    python benchmarks/sd15_training_cost.py
    python benchmarks/sd15_training_cost.py --size sdxl
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks import bench_models, cost_modes  # noqa: E402
from ptp_utils import BatchLayout, controlled, install_attention_control  # noqa: E402
from stylediffusion import training  # noqa: E402
from stylediffusion.ddim import DDIMSchedule  # noqa: E402
from stylediffusion.inversion import mapping_config  # noqa: E402
from stylediffusion.mapping import MappingNetworks  # noqa: E402
from stylediffusion.models import ModelBundle  # noqa: E402
from stylediffusion.sampling import predict  # noqa: E402

META = torch.device("meta")
GiB = 2 ** 30


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for a flash / memory-efficient SDPA kernel: saves q, k, v, out, logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedAttentionMemory(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return _FusedAttention.apply(q, k, v)
        return func(*args, **(kwargs or {}))


class SavedTensors:
    """Bytes saved for backward, once per storage, parameters left out, grouped by a short label."""

    def __init__(self, parameters: set[int]):
        self.parameters = parameters
        self.storages: dict[int, tuple[int, str]] = {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.parameters and key not in self.storages:
            label = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            self.storages[key] = (storage.nbytes(), label)
        return t

    @staticmethod
    def unpack(t):
        return t

    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    def largest(self, k: int = 3) -> list[tuple[str, int]]:
        by_label = defaultdict(int)
        for n, label in self.storages.values():
            by_label[label] += n
        return sorted(by_label.items(), key=lambda kv: -kv[1])[:k]


def estimate(mode: cost_modes.Mode, resolution: int = 512, num_steps: int = 30, num_inner_steps: int = 100,
             size: str = "sd15") -> dict:
    dtype = bench_models.DTYPES[mode.dtype]
    parts = (bench_models.sdxl_components if size == "sdxl" else bench_models.sd15_components)(META, 0, resolution)
    encoders = [k for k in ("text_encoder", "image_encoder", "text_encoder_2") if k in parts]
    for key in ("vae", "unet", *encoders):
        parts[key].requires_grad_(False).eval().to(dtype=torch.float32 if key == "vae" else dtype)
    bundle = ModelBundle(**parts, model_id=f"{size}-meta", image_encoder_id="vit-b16-meta", device=META, dtype=dtype,
                         untrained=True)
    if mode.unet_weight_grads:
        bundle.unet.requires_grad_(True)
    weights = sum(p.nbytes for name in ("unet", "vae", *encoders) for p in getattr(bundle, name).parameters())
    weight_grads = (
        sum(p.nbytes for p in bundle.unet.parameters()) if mode.unet_weight_grads else 0
    )  # grads in the weights' dtype
    parameters = {p.untyped_storage()._cdata for name in ("unet", "vae", *encoders)
                  for p in getattr(bundle, name).parameters()}

    latent = resolution // bundle.vae_scale
    z = torch.empty(1, 4, latent, latent, device=META)
    width = bundle.unet.config.cross_attention_dim  # SDXL: 768 + 1280, plus the pooled row (families.py)
    cond = torch.empty(1, bundle.tokenizer.model_max_length + int(bundle.family.pooled_row), width, device=META)
    vision = bundle.image_encoder.config
    features = torch.empty(1, (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size, device=META)
    schedule = DDIMSchedule(bundle.scheduler, num_steps)
    step = num_steps // 2
    mappers = MappingNetworks(mapping_config(bundle, features, cond, "modulate"), num_steps).to(META)
    mapping_bytes = sum(p.nbytes for p in mappers[step].parameters()) * 4  # weights, grads, two Adam moments

    # the reference maps the attention loss compares with: record them once (no grad)
    state = install_attention_control(bundle.unet)
    recorder = (cost_modes.ExplicitRecorder if mode.explicit_attention else training.CrossAttentionRecorder)(
        keep_grad=True
    )
    with torch.no_grad(), controlled(state, recorder):
        predict(bundle, schedule, z, step, cond, BatchLayout.single())
    reference = [m.detach() for m in recorder.maps.get(step, [])]
    if not reference:
        raise RuntimeError("no mid-low reference maps were recorded: the attention loss would be off")

    saved = SavedTensors(parameters)
    fused = FusedAttentionMemory() if not mode.explicit_attention else None
    cfg = training.TrainConfig()
    mapper = mappers[step].requires_grad_(True)
    eps_u = torch.empty_like(z)
    explicit = cost_modes.ExplicitEverywhere() if mode.explicit_attention else None
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), \
            (fused if fused is not None else contextlib.nullcontext()), controlled(state, explicit):
        # one inner iteration of the training loop, on shapes (its loss, then its backward pass)
        loss = training.iteration_loss(
            bundle,
            schedule,
            z,
            step,
            eps_u,
            mapper(features, cond),
            cond,
            torch.empty_like(z),
            reference,
            state,
            recorder,
            cfg,
        )
        loss.backward()
    flops = count_flops(bundle, mode, schedule, z, step, eps_u, mapper, features, cond, reference, state, recorder, cfg)
    iterations = bench_models.schedule_iterations(num_steps, num_inner_steps)
    phases = {"inversion": num_steps * flops["call_plain"],
              "training": iterations * flops["train_iteration"]
              + num_steps * (flops["call_plain"] + flops["call_learned"]),
              # per step one call of 4 rows (fast) or two of 2 (reference): four rows of UNet work, and the
              # reference's per-layer image encoder once for the conditional call
              "edit": num_steps * (4 * flops["call_plain"] + flops["call_learned"] - flops["call_plain"])}
    reference_bytes = sum(m.nbytes for m in reference)
    return {"mode": mode.name, "dtype": mode.dtype, "weights_bytes": weights, "weight_grad_bytes": weight_grads,
            "mid_low_maps": len(reference), "reference_map_bytes_per_step": reference_bytes,
            "saved_activation_bytes": saved.total(), "mapping_network_bytes": mapping_bytes,
            "total_bytes": weights + weight_grads + saved.total() + mapping_bytes,
            "largest_saved": saved.largest(), "flops": flops, "train_iterations": iterations, "phase_flops": phases}


def count_flops(
    bundle, mode, schedule, z, step, eps_u, mapper, features, cond, reference, state, recorder, cfg
) -> dict:
    """FLOPs of one training iteration and of one UNet call with / without learned values (one row)."""
    explicit = cost_modes.ExplicitEverywhere() if mode.explicit_attention else None
    image = torch.empty(1, 3, bundle.image_size, bundle.image_size, device=META)
    hooks = cost_modes.add_per_layer_image_encoder(bundle, image) if mode.image_encoder_per_layer else []

    def counted(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter, controlled(state, explicit):
            fn()
        return float(counter.get_total_flops())

    def train_iteration():
        loss = training.iteration_loss(bundle, schedule, z, step, eps_u, mapper(features, cond), cond,
                                       torch.empty_like(z), reference, state, recorder, cfg)
        loss.backward()

    try:
        out = {"train_iteration": counted(train_iteration)}
        with torch.no_grad():
            out["call_learned"] = counted(lambda: predict(bundle, schedule, z, step, cond, BatchLayout.single(),
                                                          values=mapper(features, cond)))
            out["call_plain"] = counted(lambda: predict(bundle, schedule, z, step, cond, BatchLayout.single()))
    finally:
        for h in hooks:
            h.remove()
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size",
        choices=("sd15", "sdxl"),
        default="sd15",
        help="sd15: SD v1.5 (stylediffusion/configs/sd15); sdxl: SDXL base 1.0 (stylediffusion/configs/sdxl)",
    )
    p.add_argument("--resolution", type=int, default=None, help="default 512 (sd15), 1024 (sdxl)")
    p.add_argument("--fast_dtype", choices=tuple(bench_models.DTYPES), default="bfloat16")
    p.add_argument("--tflops", type=float, default=800.0,
                   help="rate for the time floor of the fast mode's FLOPs (default 800: the H100's bf16 matmul rate "
                        "quoted in the issue)")
    args = p.parse_args(argv)
    modes = [cost_modes.reference_mode(), cost_modes.fast_mode(torch.device("cuda"), args.fast_dtype, False, False)]
    resolution = args.resolution or (1024 if args.size == "sdxl" else 512)
    rows = [estimate(m, resolution, size=args.size) for m in modes]
    name = "SDXL base 1.0" if args.size == "sdxl" else "SD v1.5"
    print(f"{name} architecture at {resolution}x{resolution}, one training iteration, meta device "
          f"(shapes only): memory resident during backward, GiB (a lower bound on the GPU's peak)")
    print("| mode | dtype | weights | UNet weight grads | saved activations | mapping net + Adam | total |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['dtype']} | {r['weights_bytes'] / GiB:.2f} | {r['weight_grad_bytes'] / GiB:.2f} | "
              f"{r['saved_activation_bytes'] / GiB:.2f} | {r['mapping_network_bytes'] / GiB:.3f} | "
              f"{r['total_bytes'] / GiB:.2f} |")
    print(f"mid-low cross-attention maps per step (the attention loss's reference A*_i, kept for all T steps): "
          f"{rows[1]['mid_low_maps']} maps, {rows[1]['reference_map_bytes_per_step'] / GiB:.3f} GiB per step, "
          f"{30 * rows[1]['reference_map_bytes_per_step'] / GiB:.2f} GiB for T=30")
    for r in rows:
        print(f"{r['mode']}: largest saved tensors: "
              + "; ".join(f"{label} {n / GiB:.2f} GiB" for label, n in r["largest_saved"]))
    print(f"\nFLOPs (T=30, K=100: {rows[0]['train_iterations']} training iterations), TFLOP")
    print("| mode | UNet call, plain | UNet call, learned values | training iteration | inversion | training | edit | "
          "train+edit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, ph = r["flops"], r["phase_flops"]
        print(f"| {r['mode']} | {f['call_plain'] / 1e12:.3f} | {f['call_learned'] / 1e12:.3f} | "
              f"{f['train_iteration'] / 1e12:.3f} | {ph['inversion'] / 1e12:.0f} | {ph['training'] / 1e12:.0f} | "
              f"{ph['edit'] / 1e12:.0f} | {(ph['training'] + ph['edit']) / 1e12:.0f} |")
    ref, fast = (r["phase_flops"] for r in rows)
    ratio = (ref['training'] + ref['edit']) / (fast['training'] + fast['edit'])
    print(
        f"reference / fast FLOPs, train+edit: {ratio:.2f}x; "
        f"fast mode at {args.tflops:g} TFLOP/s: inversion {fast['inversion'] / args.tflops / 1e12:.2f} s, training "
        f"{fast['training'] / args.tflops / 1e12:.2f} s, edit {fast['edit'] / args.tflops / 1e12:.2f} s (a floor)"
    )
    return rows


if __name__ == "__main__":
    main()
