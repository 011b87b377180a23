"""Command-line options shared by the benchmark runners, and what they turn into."""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch

from .. import validate
from ..files import writable_folder
from ..flags import add_settings, finite_float
from ..flags import method_options as parse_pairs
from ..identity import checkpoint_name
from ..methods import default_inversion, get_edit, get_inversion
from ..methods.registry import check_method_options
from ..models import check_device, load_models, resolve_dtype

logger = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    add_settings(g, "model", "image_encoder", "device", "dtype", "seed",
                 device={"help": "auto (this process's accelerate device: cuda:<local rank>, or cpu), cpu, cuda, ..."},
                 seed={"help": "torch seed, reset before every item (so sharding does not change results)"})
    g.add_argument("--timeout_hours", type=finite_float(above=0.0), default=48.0,
                   help="how long a finished process waits for the others at the final barrier")


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method (see 'python -m stylediffusion --list_methods')")
    add_settings(g, "inversion", "edit")
    g.add_argument("--method_name", default=None,
                   help="label of this configuration in the CSV and output folder (default <inversion>+<edit>)")
    add_settings(g, "num_ddim_steps", "num_inner_steps", "guidance_scale", "lr", "variant", "attention_loss",
                 "early_stop", "method_option", "progress",
                 num_ddim_steps={"help": "T (30 in the StyleDiffusion paper; PIE-Bench's other methods use 50)"},
                 progress={"default": False,
                           "help": "per-step progress bars (one log line per item is always printed)"})


def add_edit_args(p: argparse.ArgumentParser, where: str) -> None:
    g = p.add_argument_group(f"editing: unset values come from {where}")
    add_settings(g, "edit_type", "tau_v", "tau_c", "tau_s", "tau_u", "eq_params")


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
    device = str(check_device(device))
    # No cuDNN autotuning here (tune_backends): it may pick other kernels in each process, and the
    # shards of a run should compute what one process computes (docs/benchmarks.md).
    torch.backends.cudnn.benchmark = False
    bundle = load_models(args.model, args.image_encoder, device=device, dtype=resolve_dtype(args.dtype, device),
                         seed=args.seed)
    validate.num_ddim_steps(args.num_ddim_steps, bundle.scheduler)
    if bundle.untrained:
        logger.info("note: --model tiny has random, untrained weights: numbers show the mechanics, not real edits.")
    return bundle


def checkpoint_file(folder: Path, name: str, args, bundle, options: dict | None = None) -> Path:
    """Where the inversion of ``name`` lives; ``options``: the inversion's own options when the run's
    --method_option pairs hold others too (a style transfer's ``transfer_*``), default all of them."""
    return Path(folder) / checkpoint_name(name, bundle.label, args.num_ddim_steps, args.num_inner_steps,
                                          args.inversion, method_options(args) if options is None else options,
                                          trains_inner_steps=get_inversion(args.inversion).trains_inner_steps)


def method_options(args) -> dict:
    """``{"variant": ..., **--method_option pairs}``, parsed as the main CLI parses them."""
    return {"variant": args.variant, **parse_pairs(getattr(args, "method_option", None) or [])}
