"""Command-line options shared by the benchmark runners, and what they turn into."""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch

from .. import validate
from ..defaults import EDIT_TYPES, GUIDANCE_SCALE, LEARNING_RATE, NUM_DDIM_STEPS, NUM_INNER_STEPS, VARIANT, VARIANTS
from ..arguments import (check_num_steps, count_at_least, finite_float, fraction_or_dict, guidance_float, literal,
                         lr_float, seed_int, str2bool)
from ..arguments import method_options as parse_pairs
from ..files import writable_folder
from ..identity import checkpoint_name
from ..methods import default_inversion, get_edit, get_inversion
from ..methods.registry import check_method_options
from ..models import DEFAULT_MODEL, DTYPE_NAMES, check_device, load_models, resolve_dtype

logger = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or local diffusers folder; 'testbed' = bundled test-bed model, 'tiny' = untrained")
    g.add_argument("--image_encoder", default=None, help="CLIP vision tower (hub id or folder) for StyleDiffusion")
    g.add_argument("--device", default="auto",
                   help="auto (this process's accelerate device: cuda:<local rank>, or cpu), cpu, cuda, ...")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="dtype of the frozen models (auto: bfloat16 on GPUs with native bf16, float16 on older "
                        "GPUs, float32 on the CPU)")
    g.add_argument("--seed", type=seed_int, default=0, help="torch seed, reset before every item (so sharding "
                   "does not change results)")
    g.add_argument("--timeout_hours", type=finite_float(above=0.0), default=48.0,
                   help="how long a finished process waits for the others at the final barrier")


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method (see 'python -m stylediffusion --list_methods')")
    g.add_argument("--inversion", default=None, help="default: the edit's own (spdinv for elite, else stylediffusion)")
    g.add_argument("--edit", default="p2p")
    g.add_argument("--method_name", default=None,
                   help="label of this configuration in the CSV and output folder (default <inversion>+<edit>)")
    g.add_argument("--num_ddim_steps", type=count_at_least(1), default=NUM_DDIM_STEPS, help="T (30 in the StyleDiffusion paper; PIE-Bench's other methods use 50)")
    g.add_argument("--num_inner_steps", type=count_at_least(1), default=NUM_INNER_STEPS, help="K: StyleDiffusion inner iterations at the first step")
    g.add_argument("--guidance_scale", type=guidance_float, default=GUIDANCE_SCALE)
    g.add_argument("--lr", type=lr_float, default=LEARNING_RATE)
    g.add_argument("--variant", choices=VARIANTS, default=VARIANT)
    g.add_argument("--attention_loss", type=str2bool, default=True, metavar="True|False")
    g.add_argument("--early_stop", type=str2bool, default=True, metavar="True|False")
    g.add_argument("--method_option", action="append", default=[], metavar="KEY=VALUE",
                   help="method-specific option passed to the method (repeatable), e.g. nulltext_iterations=10 "
                        "(see --list_methods)")
    g.add_argument("--progress", type=str2bool, default=False, metavar="True|False",
                   help="per-step progress bars (one log line per item is always printed)")


def add_edit_args(p: argparse.ArgumentParser, where: str) -> None:
    g = p.add_argument_group(f"editing: unset values come from {where}")
    g.add_argument("--edit_type", choices=EDIT_TYPES, default=None)
    g.add_argument("--tau_v", type=float, default=None)
    g.add_argument("--tau_c", type=fraction_or_dict, default=None)
    g.add_argument("--tau_s", type=float, default=None)
    g.add_argument("--tau_u", type=float, default=None)
    g.add_argument("--eq_params", type=literal, default=None)


def method_label(args) -> str:
    return args.method_name or f"{args.inversion}+{args.edit}"


def safe_dirname(text: str) -> str:
    """A method label as one folder name: other characters become ``_``; no leading dots (``..``)."""
    name = re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_.")[:validate.MAX_COMPONENT_BYTES] or "method"
    return validate.safe_component(name, "--method_name")


def check_method(args) -> dict:
    """Unknown names or combinations, method options they do not take, and an output folder that cannot
    be written fail before any model is loaded; an unnamed inversion becomes the edit's default. Returns
    the checked ``--method_option`` values."""
    if args.inversion is None:
        args.inversion = default_inversion(args.edit)
    get_inversion(args.inversion)
    get_edit(args.edit, args.inversion)

    checked = check_method_options(parse_pairs(args.method_option or []), args.inversion, args.edit)
    writable_folder(args.outdir, "--outdir")
    if getattr(args, "checkpoint_dir", None) is not None:
        writable_folder(args.checkpoint_dir, "--checkpoint_dir")
    return checked


def load_bundle(args, device: str):
    device = str(check_device(device, "--device"))
    # No cuDNN autotuning here (tune_backends): it may pick other kernels in each process, and the
    # shards of a run should compute what one process computes (docs/benchmarks.md).
    torch.backends.cudnn.benchmark = False
    bundle = load_models(args.model, args.image_encoder, device=device, dtype=resolve_dtype(args.dtype, device),
                         seed=args.seed)
    check_num_steps(args.num_ddim_steps, bundle.scheduler)
    if bundle.untrained:
        logger.info("note: --model tiny has random, untrained weights: numbers show the mechanics, not real edits.")
    return bundle


def checkpoint_file(folder: Path, name: str, args, bundle, options: dict | None = None) -> Path:
    """Where the inversion of ``name`` lives; ``options``: the inversion's own options when the run's
    --method_option pairs hold others too (a style transfer's ``transfer_*``), default all of them."""
    return Path(folder) / checkpoint_name(name, bundle.label, args.num_ddim_steps, args.num_inner_steps,
                                          args.inversion, method_options(args) if options is None else options)


def method_options(args) -> dict:
    """``{"variant": ..., **--method_option pairs}``, parsed as the main CLI parses them."""
    return {"variant": args.variant, **parse_pairs(getattr(args, "method_option", None) or [])}