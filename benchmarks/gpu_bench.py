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
``--size sd15`` / ``sdxl``: SD v1.5's / SDXL base 1.0's architecture with seeded random weights (timing
does not depend on the weights, and real ones cannot reach the GPU machine; SDXL at 1024 px by default);
``--size tiny``: ``load_models('tiny')``, for CPU regression figures in seconds; ``--size testbed``: the
project's trained test-bed model. The builders: benchmarks/bench_models.py; the two cost structures:
benchmarks/cost_modes.py. The half-precision check is its own program: benchmarks/precision_check.py.

Run ``python benchmarks/gpu_bench.py --help``; see benchmarks/README.md and docs/performance.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from dataclasses import asdict, dataclass
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
from benchmarks.cost_modes import (  # noqa: E402
    ExplicitEverywhere,
    Mode,
    add_per_layer_image_encoder,
    fast_mode,
    recorder_for,
    reference_mode,
)
from ptp_utils import COND, UNCOND, BatchLayout, controlled, install_attention_control  # noqa: E402
from stylediffusion.ddim import DDIMSchedule, guided  # noqa: E402
from stylediffusion.editing import EditSpec, build_controller, run_edit, value_steps_for  # noqa: E402
from stylediffusion.encoders import clip_image_features, encode_latent, encode_prompts  # noqa: E402
from stylediffusion.inversion import mapping_config  # noqa: E402
from stylediffusion.mapping import MappingNetworks  # noqa: E402
from stylediffusion.models import ModelBundle  # noqa: E402
from stylediffusion.sampling import ddim_inversion, predict  # noqa: E402
from stylediffusion.training import TrainConfig, train_mapping_networks  # noqa: E402

NOMINAL_SD15_FLOPS = 0.8e12  # one SD v1.5 UNet forward, one 512x512 sample (64x64 latent)
PHASES = ("inversion", "training", "edit")
MODE_NAMES = ("reference", "fast")
SOURCE_PROMPT, TARGET_PROMPT = "a photo of a cat sitting on the grass", "a photo of a dog sitting on the grass"
# Issue targets (SD v1.5 at 512x512, one H100, T=30, K=100).
TARGETS = {"speedup_train_edit_min": 5.0, "fast_total_seconds_max": 10.0, "fast_edit_seconds_max": 1.5,
           "fast_training_peak_gb_max": 8.0}


def compile_regions(unet) -> int:
    """Regional torch.compile: ResNet blocks and feed-forwards (no Python attention state inside)."""
    import torch._dynamo.config as dynamo_config
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D

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
        self.image_handle = (
            image_encoder.register_forward_pre_hook(self._image_hook) if image_encoder is not None else None
        )

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
    image = torch.nn.functional.interpolate(
        torch.rand(1, 3, size // 8, size // 8, generator=g) * 2 - 1,
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    ).to(bundle.device)
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

    def timed(name):
        records[name] = {}
        if counter is not None:
            counter.reset()
        return phase_timer(device, records[name])

    with controlled(state, explicit):
        with timed("inversion"):
            trajectory = ddim_inversion(bundle, schedule, inputs.z0, inputs.cond, progress=False,
                                        recorder=recorder_for(mode.explicit_attention))
        if counter is not None:
            records["inversion"].update(counter.snapshot())
        with timed("training"):
            reports = train_mapping_networks(bundle, schedule, trajectory, inputs.features, inputs.cond, inputs.uncond,
                                             mappers, cfg, progress=False,
                                             recorder=recorder_for(mode.explicit_attention, keep_grad=True))
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


def prepare_mode(mode: Mode, args, device: torch.device) -> tuple[ModelBundle, Inputs, dict, list]:
    """The mode's model and inputs, its cost-structure hooks, and the untimed facts (load time, FLOPs per call)."""
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
    out = {"settings": asdict(mode), "load_seconds": time.perf_counter() - t_load,
           "measured_unet_flops_per_row": measured, "compiled_modules": compiled, "phases": {}}
    return bundle, inputs, out, handles


def add_rates(out: dict, flops: float | None) -> dict:
    """Per phase: ms per UNet call, nominal FLOPs and TFLOP/s; per mode: totals, peak memory, TFLOP/s.
    Called again once the per-row FLOP count is known (measured in the first mode)."""
    phases = out["phases"]
    for rec in phases.values():
        rec["ms_per_unet_call"] = 1e3 * rec["seconds"] / max(rec["calls"], 1)
        work = rec["rows_forward"] + 3 * rec["rows_forward_backward"]
        rec["nominal_flops"] = work * flops if flops else None
        rec["tflops_per_s"] = rec["nominal_flops"] / rec["seconds"] / 1e12 if flops else None
    out["total_seconds"] = sum(phases[p]["seconds"] for p in PHASES)
    out["train_edit_seconds"] = phases["training"]["seconds"] + phases["edit"]["seconds"]
    out["total_cpu_seconds"] = sum(phases[p]["cpu_seconds"] for p in PHASES)
    out["train_edit_cpu_seconds"] = phases["training"]["cpu_seconds"] + phases["edit"]["cpu_seconds"]
    peaks = [phases[p]["peak_memory_bytes"] for p in PHASES]
    out["peak_memory_bytes"] = max(peaks) if all(p is not None for p in peaks) else None
    total_flops = sum(phases[p]["nominal_flops"] or 0 for p in PHASES)
    out["tflops_per_s"] = total_flops / out["total_seconds"] / 1e12 if flops else None
    return out


def run_mode(mode: Mode, args, device: torch.device, num_steps: int, num_inner_steps: int, flops_override: float | None,
             log=print) -> dict:
    """One mode: an untimed warm-up (unless --no_warmup), then the three timed and counted phases."""
    bundle, inputs, out, handles = prepare_mode(mode, args, device)
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
    add_rates(out, flops_override if flops_override is not None else out["measured_unet_flops_per_row"])
    phases = out["phases"]
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
        return (
            m["phases"][key]["seconds"]
            if key in PHASES
            else m["train_edit_seconds" if key == "train+edit" else "total_seconds"]
        )

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
        "speedup_train_edit": (
            results["ratios"]["train+edit"],
            results["ratios"]["train+edit"] >= TARGETS["speedup_train_edit_min"],
        ),
        "fast_total_seconds": (fast["total_seconds"], fast["total_seconds"] <= TARGETS["fast_total_seconds_max"]),
        "fast_edit_seconds": (
            fast["phases"]["edit"]["seconds"],
            fast["phases"]["edit"]["seconds"] <= TARGETS["fast_edit_seconds_max"],
        ),
        "fast_training_peak_gb": (
            None if peak is None else peak / 1e9,
            None if peak is None else peak / 1e9 <= TARGETS["fast_training_peak_gb_max"],
        ),
    }
    return {"applicable": applicable, "targets": TARGETS,
            "checks": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()}}




# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--modes", default="reference,fast", help="comma-separated subset of reference,fast")
    p.add_argument("--fast_dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the frozen models in fast mode (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="fast mode: regional torch.compile of the UNet")
    p.add_argument("--channels_last", action="store_true", help="fast mode: UNet in channels_last memory format")
    p.add_argument("--flops_per_unet", type=float, default=None,
                   help="FLOPs per UNet forward per sample (default 0.8e12 for sd15 at 512, else measured)")
    p.add_argument("--no_warmup", action="store_true", help="skip the short untimed warm-up run of each mode")
    p.add_argument("--fail_fast", action="store_true", help="stop at the first failing mode instead of reporting it")
    if "--check_precision" in argv:
        p.error("--check_precision is its own program now: python benchmarks/precision_check.py with the same "
                "flags, without --check_precision")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODE_NAMES)
    if unknown:
        p.error(f"unknown --modes {sorted(unknown)} (choose from {', '.join(MODE_NAMES)})")
    return args


def select_modes(args, device: torch.device) -> dict[str, Mode]:
    """The --modes to run, in the order given."""
    modes = {
        "reference": reference_mode(),
        "fast": fast_mode(device, args.fast_dtype, args.compile, args.channels_last),
    }
    return {name: modes[name] for name in args.modes}


def run_modes(modes: dict[str, Mode], args, device: torch.device, results: dict, log=print) -> None:
    """Each mode in turn into ``results``; a failing one is reported under ``failed_modes`` (--fail_fast: raised)."""
    flops = results["flops_per_unet_row_used"]
    for name, mode in modes.items():
        try:
            results["modes"][name] = run_mode(mode, args, device, results["num_ddim_steps"],
                                              results["num_inner_steps"], flops, log=log)
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
            add_rates(results["modes"][name], flops)


def compare_modes(results: dict, device: torch.device, log=print) -> None:
    """Ratios (wall clock; CPU time on a CPU), the two edits' agreement and the issue's targets."""
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


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.size = args.size or default_size(device)
    args.resolution = resolve_resolution(args.size, args.resolution)
    num_steps, num_inner_steps = resolve_schedule(args)
    modes = select_modes(args, device)
    flops = args.flops_per_unet
    if flops is None and args.size == "sd15" and args.resolution == 512:
        flops = NOMINAL_SD15_FLOPS
    results = {**run_metadata(device, args.size, args.resolution), "num_ddim_steps": num_steps,
               "num_inner_steps": num_inner_steps, "train_iterations": schedule_iterations(num_steps, num_inner_steps),
               "flops_per_unet_row_used": flops, "modes": {}, "failed_modes": {}}
    log(f"StyleDiffusion benchmark: {args.size} at {args.resolution}px on {results['device_name']} ({device}), "
        f"T={num_steps}, K={num_inner_steps} ({results['train_iterations']} training iterations)")
    run_modes(modes, args, device, results, log)
    if not results["modes"]:
        write_json(args.out, results)
        raise SystemExit("every mode failed: " + "; ".join(f"{k}: {v}" for k, v in results["failed_modes"].items()))
    log("")
    log(detail_table(results))
    if {"reference", "fast"} <= set(results["modes"]):
        compare_modes(results, device, log)
    for m in results["modes"].values():
        m.pop("edit_latents", None)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
