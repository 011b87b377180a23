"""Command line: train a StyleDiffusion inversion for an image, or edit it (training it first if needed).

Compatible with the authors' README (``--is_train True --idx 2 --num_inner_steps 20``), plus a direct
mode (``--image_path --prompt --target --outdir``) and the model/device options of current diffusers.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data_index, validate
from .api import StyleDiffusionEditor
from .arguments import (MAX_SEED, ArgumentParser, _check_image_readable, add_elite_arguments,  # noqa: F401
                        check_num_steps, count_at_least, elite_options, finite_float, fraction_or_dict,
                        guidance_float, literal, lr_float, method_options, seed_int, str2bool)
from .defaults import (EDIT_TYPES, GUIDANCE_SCALE, LEARNING_RATE, NUM_DDIM_STEPS, NUM_INNER_STEPS, TAU_C, TAU_S, TAU_U,
                       TAU_V, VARIANT, VARIANTS)
from .editing import EditSpec, build_controller, default_edit_type
from .encoders import check_prompt_length
from .errors import UserError
from .files import atomic_write_text, writable_file, writable_folder
from .identity import checkpoint_name
from .image_io import image_grid, load_image, save_atomic
from .methods import default_inversion, describe_methods, get_edit, get_inversion
from .methods.registry import check_method_options, split_method_options
from .models import (DEFAULT_IMAGE_ENCODER, DEFAULT_MODEL, DTYPE_NAMES, check_device, load_models, quiet_libraries,
                     resolve_dtype, tune_backends)
from .runner import exit_code, package_notes_on_stdout, started
from .style_transfer import STYLE_INVERSIONS, transfer_options

logger = logging.getLogger(__spec__.name)  # run with -m, __name__ is "__main__": the logger stays under stylediffusion

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="edit_w_ptp_v_clip.py",
        description="StyleDiffusion: prompt-embedding inversion and P2Plus editing of real images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("what to do")
    g.add_argument("--is_train", type=str2bool, default=False, metavar="True|False",
                   help="train the inversion only (True) or edit, training first if needed (False)")
    g.add_argument("--idx", type=int, default=None, help="case_number of a row of the data index (default 0)")
    g.add_argument("--data_dir", type=Path, default=None, help="folder holding the index CSVs and images")
    g.add_argument("--image_path", type=Path, help="direct mode: the image to invert/edit")
    g.add_argument("--prompt", help="direct mode: caption of the image (source prompt)")
    g.add_argument("--target", help="direct mode: the edited prompt")
    g.add_argument("--outdir", type=Path, default=Path("outputs"), help="where images and reports are written")

    g = p.add_argument_group("models")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or local diffusers folder; 'testbed' = bundled test-bed model, 'tiny' = untrained")
    g.add_argument("--image_encoder", default=None,
                   help=f"CLIP vision tower, hub id or folder (default: the model's image_encoder/ or {DEFAULT_IMAGE_ENCODER})")
    g.add_argument("--vae", default=None,
                   help="a VAE hub id or folder in place of the model's (e.g. madebyollin/sdxl-vae-fp16-fix), run in "
                        "--dtype; without it the model's own VAE runs in float32 (SDXL's overflows in float16)")
    g.add_argument("--image_size", type=int, default=None,
                   help="pixels to run at (default: the model's: 512 for SD 1.x, 1024 for SDXL); images are resized to it")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="dtype of the frozen UNet and encoders (auto: bfloat16 on GPUs that compute it natively, compute "
                        "capability 8.0+; float16 with loss scaling on older GPUs; float32 on the CPU; "
                        "mapping networks, DDIM math and losses always run in float32)")
    g.add_argument("--seed", type=seed_int, default=0, help=f"0 .. {MAX_SEED}")

    g = p.add_argument_group("inversion (training)")
    g.add_argument("--num_ddim_steps", type=count_at_least(1), default=NUM_DDIM_STEPS,
                   help="T (at most the scheduler's num_train_timesteps, 1000 for SD)")
    g.add_argument("--num_inner_steps", type=count_at_least(1), default=NUM_INNER_STEPS, help="K: iterations at the first step, K_i = ceil(K e^-0.1i)")
    g.add_argument("--guidance_scale", type=guidance_float, default=GUIDANCE_SCALE, help=f"w, in [0, {validate.MAX_GUIDANCE:g}]")
    g.add_argument("--lr", type=lr_float, default=LEARNING_RATE, help="Adam learning rate at step 0 (decays as 1 - i/100)")
    g.add_argument("--variant", choices=VARIANTS, default=VARIANT,
                   help="mapping network: released code's c*gamma+beta (modulate) or the paper's direct value (replace)")
    g.add_argument("--attention_loss", type=str2bool, default=True, metavar="True|False")
    g.add_argument("--early_stop", type=str2bool, default=True, metavar="True|False")
    g.add_argument("--checkpoint", type=Path, default=None, help="inversion file (default: <checkpoint_dir>/<case>_<model>_T<T>.safetensors)")
    g.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"))
    g.add_argument("--retrain", action="store_true", help="train again even if a matching checkpoint exists")

    g = p.add_argument_group("editing (Prompt-to-Prompt + P2Plus); unset values come from the index row or the README defaults")
    g.add_argument("--edit_type", choices=EDIT_TYPES, default=None)
    g.add_argument("--tau_v", type=float, default=None, help=f"fraction of steps the target uses the learned values ({TAU_V})")
    g.add_argument("--tau_c", type=fraction_or_dict, default=None, help=f"cross-attention replacement fraction or per-word dict ({TAU_C})")
    g.add_argument("--tau_s", type=float, default=None, help=f"self-attention replacement fraction, conditional branch ({TAU_S})")
    g.add_argument("--tau_u", type=float, default=None, help=f"P2Plus: self-attention replacement in the unconditional branch ({TAU_U})")
    g.add_argument("--blend_word", default=None, help="LocalBlend words: \"cat tiger\" or \"('cat', 'tiger')\"")
    g.add_argument("--eq_params", type=literal, default=None, help="re-weighting: \"{'words': ['red'], 'values': [2]}\"")
    g.add_argument("--inversion", default=None,
                   help="inversion method (see --list_methods; default: the edit's own, spdinv for --edit elite, "
                        "else stylediffusion)")
    g.add_argument("--edit", default="p2p", help="edit method (see --list_methods)")
    g.add_argument("--method_option", action="append", default=[], metavar="KEY=VALUE",
                   help="method-specific option, repeatable (e.g. sdedit_strength=0.6, embedding=key_value, "
                        "generated_seed=3); see --list_methods and docs/methods.md")
    g.add_argument("--list_methods", action="store_true", help="list the registered inversions and edits, and exit")
    g.add_argument("--progress", type=str2bool, default=True, metavar="True|False", help="show progress bars")
    add_elite_arguments(p)

    g = p.add_argument_group("style transfer (the paper's §5.2.7): --image_path/--prompt (or --idx) are the STYLE image")
    g.add_argument("--content_image", type=Path, default=None,
                   help="style-transfer mode: the image whose structure is kept (no --target needed); options as "
                        "--method_option transfer_feature_fraction=0.8 ... (docs/method.md)")
    g.add_argument("--content_prompt", default=None, help="caption of the content image (default: the empty prompt, as PnP)")
    return p


@dataclass
class Job:
    """One image with its source prompt, and the edits to make of it (empty when only training)."""

    name: str
    image_path: Path | None  # None for a generation (--inversion generated)
    prompt: str
    edits: list  # list[EditSpec]


def _blend_words(value) -> tuple[str, str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.strip()
        value = validate.literal(value, "--blend_word") if value.startswith(("(", "[")) else tuple(value.split())
    return validate.blend_words(value)


def _spec(args, source: str, target: str, row=None):
    def pick(name, default):
        value = getattr(args, name)
        if value is not None:
            return value
        return getattr(row, name) if row is not None and getattr(row, name) is not None else default

    edit_type = pick("edit_type", None)
    if edit_type is None:
        edit_type = default_edit_type(source, target)
    blend = args.blend_word if args.blend_word is not None else (row.blend_word if row is not None else None)
    return EditSpec(source=source, target=target, edit_type=edit_type, tau_v=pick("tau_v", TAU_V),
                    tau_c=pick("tau_c", TAU_C), tau_s=pick("tau_s", TAU_S), tau_u=pick("tau_u", TAU_U),
                    blend_words=_blend_words(blend), eq_params=pick("eq_params", None),
                    guidance_scale=args.guidance_scale)


def resolve_jobs(args) -> list[Job]:
    data_dir = args.data_dir or data_index.DEFAULT_DATA_DIR
    if args.inversion == "generated":
        if not args.prompt or (not args.is_train and not args.target):
            raise UserError("--inversion generated edits a generation: give --prompt (and --target to edit); "
                            "the seed is --method_option generated_seed=N.")
        validate.prompt(args.prompt, "--prompt")
        edits = [] if args.is_train else [_spec(args, args.prompt, args.target)]
        return [Job("generated", None, args.prompt, edits)]
    if args.image_path is not None or args.prompt is not None:
        if args.image_path is None or args.prompt is None:
            raise UserError("direct mode needs both --image_path and --prompt (the caption of the image).")
        edits = []
        if not args.is_train:
            if not args.target:
                raise UserError("editing needs --target (the edited prompt), or use --is_train True to only train.")
            edits = [_spec(args, args.prompt, args.target)]
        validate.prompt(args.prompt, "--prompt")
        name = validate.safe_component(args.image_path.stem, "the --image_path file name")
        return [Job(name, args.image_path, args.prompt, edits)]
    idx = 0 if args.idx is None else args.idx
    if args.is_train:
        row = data_index.image_row(idx, data_dir)
        return [Job(f"case{idx}", row.image_path, row.prompt, [])]
    rows = data_index.edit_rows(idx, data_dir)
    if args.target is not None:
        validate.prompt(args.target, "--target")
    edits = [_spec(args, r.prompt, args.target or r.target, r) for r in rows]
    if args.target:  # one explicit target replaces the index's edits
        edits = edits[:1]
    return [Job(f"case{idx}", rows[0].image_path, rows[0].prompt, edits)]


def _device(name: str):
    return check_device(name, "--device")


def checkpoint_path(args, job: Job, model_label: str, options: dict | None = None) -> Path:
    """``--checkpoint``, or ``<checkpoint_dir>/<identity.checkpoint_name(...)>``."""
    if args.checkpoint is not None:
        return args.checkpoint
    return args.checkpoint_dir / checkpoint_name(job.name, model_label, args.num_ddim_steps, args.num_inner_steps,
                                                 args.inversion, options)


def check_output_paths(args, jobs: list[Job]) -> None:
    """Where this run writes: refused before any work when a file stands where a folder must be (or the
    other way round) or the place is read-only."""
    if not args.is_train:
        writable_folder(args.outdir, "--outdir")
    if args.checkpoint is not None:
        if args.checkpoint.is_dir():
            raise UserError(f"--checkpoint '{args.checkpoint}' is a folder: pass a file name, or pass the folder "
                            f"as --checkpoint_dir.")
        if args.retrain or not args.checkpoint.is_file():
            writable_file(args.checkpoint, "--checkpoint")
    elif args.inversion not in ("ddim", "generated"):  # these two store nothing
        writable_folder(args.checkpoint_dir, "--checkpoint_dir")


def load_bundle(args):
    """Seed, device and the model of a run; T checked against its scheduler."""
    torch.manual_seed(args.seed)
    device = _device(args.device)
    tune_backends(device)
    bundle = load_models(args.model, args.image_encoder, device=device, dtype=resolve_dtype(args.dtype, device),
                         seed=args.seed, vae=args.vae, image_size=args.image_size)
    if bundle.family.pooled_row or args.vae:  # say which VAE runs in which dtype where it matters (families.py)
        logger.info(f"model: {bundle.family.describe(bundle)}")
    if bundle.untrained:
        logger.info("note: --model tiny has random, untrained weights: outputs show the mechanics, not real edits.")
    check_num_steps(args.num_ddim_steps, bundle.scheduler)
    return bundle


def run(args) -> list[Path]:
    if getattr(args, "content_image", None) is not None:
        return run_style_transfer(args)
    if getattr(args, "content_prompt", None) is not None:
        raise UserError("--content_prompt describes the --content_image of a style transfer: give --content_image too.")

    # Everything the flags, the index and the files say is checked here, before any model loads and
    # before anything is written or deleted.
    if args.inversion is None:
        args.inversion = default_inversion(None if args.is_train else args.edit)
    get_inversion(args.inversion)  # an unknown name fails here, before anything loads
    if not args.is_train:
        get_edit(args.edit, args.inversion)
    jobs = resolve_jobs(args)
    options = {"variant": args.variant, **check_method_options(method_options(args.method_option), args.inversion,
                                                                None if args.is_train else args.edit)}
    # the --elite_* flags are edit options: they do not name the inversion's checkpoint
    flag_options = check_method_options(elite_options(args), args.inversion, None if args.is_train else args.edit)
    for job in jobs:
        if job.image_path is not None:
            _check_image_readable(job.image_path)
        for spec in job.edits:
            spec.validate()
            get_edit(args.edit, args.inversion).check(spec, {**options, **flag_options})
    check_output_paths(args, jobs)
    bundle = load_bundle(args)
    T = args.num_ddim_steps
    for job in jobs:  # word-level problems (too long, unknown blend word, unequal word counts...) before any training
        check_prompt_length(bundle.tokenizer, job.prompt)
        for spec in job.edits:
            check_prompt_length(bundle.tokenizer, spec.target)
            build_controller(spec, bundle.tokenizer, T)
    editor = StyleDiffusionEditor(bundle, progress=args.progress)
    # each method gets the options it declares (--variant reaches StyleDiffusion only)
    inversion_options, edit_options = split_method_options(options, args.inversion,
                                                           None if args.is_train else args.edit)
    edit_options.update(flag_options)
    started()  # from here on files are written: Ctrl-C keeps what is finished (see runner.exit_code)
    written: list[Path] = []
    for job in jobs:
        notes = [] if job.image_path is None else load_image(job.image_path, bundle.image_size)[1]
        for note in notes:
            logger.info(f"note: {note}")
        ckpt = checkpoint_path(args, job, bundle.label, options)
        if args.checkpoint is None:  # a name built from data and flags must not leave its folder
            validate.inside(args.checkpoint_dir, ckpt, "the checkpoint")
        if args.retrain and ckpt.is_file():  # only now: every input above has been checked
            ckpt.unlink()
        if args.is_train and ckpt.is_file():
            logger.info(f"{ckpt} is already trained (use --retrain to train again)")
            continue
        if not ckpt.is_file() and args.inversion == "stylediffusion":
            logger.info(f"no trained inversion at {ckpt}: training it first (T={T}, K={args.num_inner_steps})"
                if not args.is_train else f"training the inversion (T={T}, K={args.num_inner_steps}) -> {ckpt}")
        t0 = time.perf_counter()
        inverted = editor.invert(job.image_path, job.prompt, method=args.inversion, num_inference_steps=T,
                                 num_inner_steps=args.num_inner_steps, guidance_scale=args.guidance_scale,
                                 checkpoint=ckpt, seed=args.seed, lr=args.lr, attention_loss=args.attention_loss,
                                 early_stop=args.early_stop, **inversion_options)
        logger.info(f"{args.inversion} inversion ready in {time.perf_counter() - t0:.1f}s"
            + (f" ({ckpt})" if ckpt.is_file() else ""))
        if ckpt.is_file():
            written.append(ckpt)
        for k, spec in enumerate(job.edits):
            out = editor.edit(inverted, spec, method=args.edit, **edit_options)
            outdir = args.outdir if len(job.edits) == 1 else args.outdir / f"{job.name}_edit{k}"
            written += save_edit_outputs(outdir, out, bundle, T, args.inversion, args.edit)
            logger.info(f"edit '{spec.source}' -> '{spec.target}' ({args.inversion} + {args.edit}, {spec.edit_type}) "
                f"in {out.seconds:.1f}s -> {outdir}")
    return written


def run_style_transfer(args) -> list[Path]:
    """Style-transfer mode: train (or load) the style image's StyleDiffusion inversion as an edit would, then
    transfer it onto --content_image; writes an edit's files (edited.png = the transfer)."""
    if args.inversion is None:
        args.inversion = default_inversion(None)
    if args.inversion not in STYLE_INVERSIONS:
        raise UserError(f"style transfer needs --inversion stylediffusion (the style's learned values), not "
                        f"{args.inversion!r}.")
    if args.is_train or args.target is not None:
        raise UserError("--content_image is a style transfer: drop --is_train and --target (the style image is "
                        "--image_path with its --prompt).")
    if args.content_prompt is not None:
        validate.prompt(args.content_prompt, "--content_prompt")
    _check_image_readable(args.content_image)
    style_args = argparse.Namespace(**{**vars(args), "is_train": True})
    job = resolve_jobs(style_args)[0]
    _check_image_readable(job.image_path)
    given = method_options(args.method_option)
    transfer = transfer_options({k: v for k, v in given.items() if k.startswith("transfer_")})
    options = {"variant": args.variant, **check_method_options(
        {k: v for k, v in given.items() if not k.startswith("transfer_")}, args.inversion)}
    check_output_paths(argparse.Namespace(**{**vars(args), "is_train": False}), [job])
    bundle = load_bundle(args)
    T = args.num_ddim_steps
    editor = StyleDiffusionEditor(bundle, progress=args.progress)
    started()
    for path in (job.image_path, args.content_image):  # both are centre-cropped and resized to the model's size
        for note in load_image(path, bundle.image_size)[1]:
            logger.info(f"note: {note}")
    ckpt = checkpoint_path(args, job, bundle.label, options)
    if args.checkpoint is None:
        validate.inside(args.checkpoint_dir, ckpt, "the checkpoint")
    if args.retrain and ckpt.is_file():
        ckpt.unlink()
    if not ckpt.is_file():
        logger.info(f"no trained inversion of the style image at {ckpt}: training it first (T={T}, K={args.num_inner_steps})")
    t0 = time.perf_counter()
    inverted = editor.invert(job.image_path, job.prompt, method=args.inversion, num_inference_steps=T,
                             num_inner_steps=args.num_inner_steps, guidance_scale=args.guidance_scale,
                             checkpoint=ckpt, seed=args.seed, lr=args.lr, attention_loss=args.attention_loss,
                             early_stop=args.early_stop, **options)
    logger.info(f"style inversion ready in {time.perf_counter() - t0:.1f}s ({ckpt})")
    out = editor.transfer_style(inverted, args.content_image, args.content_prompt,
                                guidance_scale=args.guidance_scale, **transfer)
    written = [ckpt] + save_transfer_outputs(args.outdir, out, bundle, T, args.content_image, job.image_path)
    logger.info(f"style transfer of '{job.image_path}' onto '{args.content_image}' in {out.seconds:.1f}s -> {args.outdir}")
    return written


def save_transfer_outputs(outdir: Path, out, bundle, T: int, content_image: Path, style_image: Path) -> list[Path]:
    """A transfer's files, named as an edit's: edited.png (the transfer), reconstruction.png (the style's own
    reconstruction), grid.png (content | style | transfer) and edit.json."""
    files = {"edited.png": out.images[0], "reconstruction.png": out.reconstruction, "grid.png": out.grid()}
    paths = []
    for name, img in files.items():
        save_atomic(img, outdir / name)
        paths.append(outdir / name)
    spec = out.specs[0]
    report = {"inversion": "stylediffusion", "edit": "style_transfer", "source": spec.target,
              "content_image": str(content_image), "style_image": str(style_image),
              "content_prompt": spec.source, "style_prompt": spec.target, **out.options,
              "guidance_scale": spec.guidance_scale, "num_ddim_steps": T, "model": bundle.model_id,
              "untrained_model": bundle.untrained, "dtype": str(bundle.dtype).removeprefix("torch."),
              "edit_seconds": round(out.seconds, 3)}
    atomic_write_text(outdir / "edit.json", json.dumps(report, indent=2) + "\n")
    return paths + [outdir / "edit.json"]


def save_edit_outputs(outdir: Path, out, bundle, T: int, inversion: str = "stylediffusion",
                      edit: str = "p2p") -> list[Path]:
    """The files of one edit (an ``api.EditOutput`` of one target): edited.png, reconstruction.png, grid.png,
    attention_maps.png (edits that record the maps) and edit.json."""
    spec, recon, edited = out.specs[0], out.reconstruction, out.images[0]
    tag = " (untrained model)" if bundle.untrained else ""
    files = {
        "edited.png": edited,
        "reconstruction.png": recon,
        "grid.png": image_grid([out.input_image, recon, edited], ["input", "reconstruction" + tag, "edit"]),
    }
    if out.attention_maps is not None:
        files["attention_maps.png"] = out.attention_maps
    paths = []
    for name, img in files.items():
        save_atomic(img, outdir / name)
        paths.append(outdir / name)
    report = {"inversion": inversion, "edit": edit, "source": spec.source, "target": spec.target, "edit_type": spec.edit_type, "tau_v": spec.tau_v,
              "tau_c": spec.tau_c, "tau_s": spec.tau_s, "tau_u": spec.tau_u, "blend_words": spec.blend_words,
              "eq_params": spec.eq_params, "guidance_scale": spec.guidance_scale, "num_ddim_steps": T,
              "model": bundle.model_id, "untrained_model": bundle.untrained,
              "dtype": str(bundle.dtype).removeprefix("torch."), "edit_seconds": round(out.seconds, 3)}
    atomic_write_text(outdir / "edit.json", json.dumps(report, indent=2) + "\n")
    return paths + [outdir / "edit.json"]


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        quiet_libraries()
        args = build_parser().parse_args(argv)
        with package_notes_on_stdout():
            if args.list_methods:
                logger.info(describe_methods())
                return 0
            run(args)
        return 0

    return exit_code(body, "interrupted: nothing half-written is kept; a partially trained inversion resumes "
                           "on the next run.")

if __name__ == "__main__":
    sys.exit(main())
