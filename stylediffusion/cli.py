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
from .defaults import TAU_C, TAU_S, TAU_U, TAU_V
from .editing import EditSpec, build_controller, default_edit_type
from .encoders import check_prompt_length
from .errors import UserError
from .files import atomic_write_text, writable_file, writable_folder
from .flags import ArgumentParser, add_elite_arguments, add_settings, elite_options, method_options, str2bool
from .identity import checkpoint_name
from .image_io import check_image_readable, image_grid, save_atomic
from .methods import default_inversion, describe_methods, get_edit, get_inversion
from .methods.registry import check_method_options, split_method_options
from .models import check_device, load_models, quiet_libraries, resolve_dtype, tune_backends
from .results import refuse_old_format
from .runner import exit_code, package_notes_on_stdout, started
from .specs import asked_from
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
    add_settings(g, "prompt", "target")
    g.add_argument("--outdir", type=Path, default=Path("outputs"), help="where images and reports are written")

    g = p.add_argument_group("models")
    add_settings(g, "model", "image_encoder")
    g.add_argument("--vae", default=None,
                   help="a VAE hub id or folder in place of the model's (e.g. madebyollin/sdxl-vae-fp16-fix), run in "
                        "--dtype; without it the model's own VAE runs in float32 (SDXL's overflows in float16)")
    g.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="pixels to run at (default: the model's: 512 for SD 1.x, 1024 for SDXL); images are resized to it",
    )
    add_settings(g, "device", "dtype", "seed")

    g = p.add_argument_group("inversion (training)")
    add_settings(g, "num_ddim_steps", "num_inner_steps", "guidance_scale", "lr", "variant", "attention_loss",
                 "early_stop")
    g.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="inversion file (default: <checkpoint_dir>/<case>_<model>_T<T>.safetensors)",
    )
    g.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints"))
    g.add_argument("--retrain", action="store_true", help="train again even if a matching checkpoint exists")

    g = p.add_argument_group(
        "editing (Prompt-to-Prompt + P2Plus); unset values come from the index row or the README defaults"
    )
    add_settings(g, "edit_type", "tau_v", "tau_c", "tau_s", "tau_u", "blend_word", "eq_params", "inversion", "edit",
                 "method_option")
    g.add_argument("--list_methods", action="store_true", help="list the registered inversions and edits, and exit")
    add_settings(g, "progress")
    add_elite_arguments(p)

    g = p.add_argument_group(
        "style transfer (the paper's §5.2.7): --image_path/--prompt (or --idx) are the STYLE image"
    )
    g.add_argument("--content_image", type=Path, default=None,
                   help="style-transfer mode: the image whose structure is kept (no --target needed); options as "
                        "--method_option transfer_feature_fraction=0.8 ... (docs/method.md)")
    g.add_argument(
        "--content_prompt", default=None, help="caption of the content image (default: the empty prompt, as PnP)"
    )
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
    return check_device(name)


def checkpoint_path(args, job: Job, model_label: str, options: dict | None = None) -> Path:
    """``--checkpoint``, or ``<checkpoint_dir>/<identity.checkpoint_name(...)>``."""
    if args.checkpoint is not None:
        return args.checkpoint
    return args.checkpoint_dir / checkpoint_name(job.name, model_label, args.num_ddim_steps, args.num_inner_steps,
                                                 args.inversion, options,
                                                 trains_inner_steps=get_inversion(args.inversion).trains_inner_steps)


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
    validate.num_ddim_steps(args.num_ddim_steps, bundle.scheduler)
    return bundle


@dataclass
class RunPlan:
    """What a run does, checked before any model loads: its jobs, and the method options split by method."""

    jobs: list[Job]
    edit: str | None  # None when only training
    options: dict  # --variant and the --method_option pairs: they name the inversion's checkpoint
    inversion_options: dict  # those the inversion declares (--variant reaches StyleDiffusion only)
    edit_options: dict  # those the edit declares, and the --elite_* flags (which do not name the checkpoint)


def check_run(args) -> RunPlan:
    """Everything the flags, the index and the files say is checked here, before any model loads and before
    anything is written or deleted; an unnamed --inversion becomes the edit's own."""
    edit = None if args.is_train else args.edit
    if args.inversion is None:
        args.inversion = default_inversion(edit)
    get_inversion(args.inversion)  # an unknown name fails here, before anything loads
    if edit is not None:
        get_edit(edit, args.inversion)
    jobs = resolve_jobs(args)
    options = {"variant": args.variant, **check_method_options(method_options(args.method_option), args.inversion,
                                                                edit)}
    # the --elite_* flags are edit options: they do not name the inversion's checkpoint
    flag_options = check_method_options(elite_options(args), args.inversion, edit)
    for job in jobs:
        if job.image_path is not None:
            check_image_readable(job.image_path)
        for spec in job.edits:
            spec.validate()
            get_edit(args.edit, args.inversion).check(spec, {**options, **flag_options})
    check_output_paths(args, jobs)
    inversion_options, edit_options = split_method_options(options, args.inversion, edit)
    return RunPlan(jobs, edit, options, inversion_options, {**edit_options, **flag_options})


def check_words(jobs: list[Job], tokenizer, num_steps: int) -> None:
    """Word-level problems (too long, unknown blend word, unequal word counts...), before any training."""
    for job in jobs:
        check_prompt_length(tokenizer, job.prompt)
        for spec in job.edits:
            check_prompt_length(tokenizer, spec.target)
            build_controller(spec, tokenizer, num_steps)


@asked_from("cli")
def run(args) -> list[Path]:
    """Train, or edit (training first where needed), every job the flags name; returns the files written."""
    if getattr(args, "content_image", None) is not None:
        return run_style_transfer(args)
    if getattr(args, "content_prompt", None) is not None:
        raise UserError("--content_prompt describes the --content_image of a style transfer: give --content_image too.")
    plan = check_run(args)
    bundle = load_bundle(args)
    check_words(plan.jobs, bundle.tokenizer, args.num_ddim_steps)
    editor = StyleDiffusionEditor(bundle, progress=args.progress)
    started()  # from here on files are written: Ctrl-C keeps what is finished (see runner.exit_code)
    written: list[Path] = []
    for job in plan.jobs:
        written += run_job(args, plan, job, editor)
    return written


def job_checkpoint(args, job: Job, model_label: str, options: dict) -> Path | None:
    """The job's inversion file (deleted first with --retrain); None when --is_train finds it trained."""
    T = args.num_ddim_steps
    ckpt = checkpoint_path(args, job, model_label, options)
    if args.checkpoint is None:  # a name built from data and flags must not leave its folder
        validate.inside(args.checkpoint_dir, ckpt, "the checkpoint")
    if args.retrain and ckpt.is_file():  # only now: every input above has been checked
        ckpt.unlink()
    if args.is_train and ckpt.is_file():
        refuse_old_format(ckpt)  # an old file is not "already trained": it cannot be read
        logger.info(f"{ckpt} is already trained (use --retrain to train again)")
        return None
    if not ckpt.is_file() and args.inversion == "stylediffusion":
        logger.info(f"no trained inversion at {ckpt}: training it first (T={T}, K={args.num_inner_steps})"
            if not args.is_train else f"training the inversion (T={T}, K={args.num_inner_steps}) -> {ckpt}")
    return ckpt


def invert_job(args, editor, job: Job, ckpt: Path, options: dict):
    """The job's inversion with the run's settings: trained (resumed from a partial file) or loaded from ``ckpt``."""
    return editor.invert(job.image_path, job.prompt, method=args.inversion, num_inference_steps=args.num_ddim_steps,
                         num_inner_steps=args.num_inner_steps, guidance_scale=args.guidance_scale, checkpoint=ckpt,
                         seed=args.seed, lr=args.lr, attention_loss=args.attention_loss, early_stop=args.early_stop,
                         **options)


def run_job(args, plan: RunPlan, job: Job, editor) -> list[Path]:
    """One image: its inversion (the editor logs what reading the image changed), then each of its edits;
    returns the files written."""
    bundle = editor.bundle
    ckpt = job_checkpoint(args, job, bundle.label, plan.options)
    if ckpt is None:
        return []
    t0 = time.perf_counter()
    inverted = invert_job(args, editor, job, ckpt, plan.inversion_options)
    logger.info(f"{args.inversion} inversion ready in {time.perf_counter() - t0:.1f}s"
        + (f" ({ckpt})" if ckpt.is_file() else ""))
    written = [ckpt] if ckpt.is_file() else []
    for k, spec in enumerate(job.edits):
        outdir = args.outdir if len(job.edits) == 1 else args.outdir / f"{job.name}_edit{k}"
        written += edit_job(args, editor, inverted, spec, plan.edit_options, outdir)
    return written


def edit_job(args, editor, inverted, spec, options: dict, outdir: Path) -> list[Path]:
    """One edit of an inversion, its files written to ``outdir``."""
    out = editor.edit(inverted, spec, method=args.edit, **options)
    written = save_edit_outputs(outdir, out, editor.bundle, args.num_ddim_steps, args.inversion, args.edit)
    logger.info(f"edit '{spec.source}' -> '{spec.target}' ({args.inversion} + {args.edit}, {spec.edit_type}) "
        f"in {out.seconds:.1f}s -> {outdir}")
    return written


def check_style_transfer(args) -> tuple[Job, dict, dict]:
    """A style transfer's flags and files, checked before any model loads: the style image's job, the
    inversion's options (they name its checkpoint) and the ``transfer_*`` options."""
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
    check_image_readable(args.content_image)
    style_args = argparse.Namespace(**{**vars(args), "is_train": True})
    job = resolve_jobs(style_args)[0]
    check_image_readable(job.image_path)
    pairs = method_options(args.method_option)
    transfer = transfer_options({k: v for k, v in pairs.items() if k.startswith("transfer_")})
    options = {"variant": args.variant, **check_method_options(
        {k: v for k, v in pairs.items() if not k.startswith("transfer_")}, args.inversion)}
    check_output_paths(argparse.Namespace(**{**vars(args), "is_train": False}), [job])
    return job, options, transfer


@asked_from("cli")
def run_style_transfer(args) -> list[Path]:
    """Style-transfer mode: train (or load) the style image's StyleDiffusion inversion as an edit would, then
    transfer it onto --content_image; writes an edit's files (edited.png = the transfer)."""
    job, options, transfer = check_style_transfer(args)
    bundle = load_bundle(args)
    T = args.num_ddim_steps
    editor = StyleDiffusionEditor(bundle, progress=args.progress)
    started()
    ckpt = checkpoint_path(args, job, bundle.label, options)
    if args.checkpoint is None:
        validate.inside(args.checkpoint_dir, ckpt, "the checkpoint")
    if args.retrain and ckpt.is_file():
        ckpt.unlink()
    if not ckpt.is_file():
        logger.info(
            f"no trained inversion of the style image at {ckpt}: training it first (T={T}, K={args.num_inner_steps})"
        )
    t0 = time.perf_counter()
    inverted = invert_job(args, editor, job, ckpt, options)
    logger.info(f"style inversion ready in {time.perf_counter() - t0:.1f}s ({ckpt})")
    out = editor.transfer_style(inverted, args.content_image, args.content_prompt,
                                guidance_scale=args.guidance_scale, **transfer)
    written = [ckpt] + save_transfer_outputs(args.outdir, out, bundle, T, args.content_image, job.image_path)
    logger.info(
        f"style transfer of '{job.image_path}' onto '{args.content_image}' in {out.seconds:.1f}s -> {args.outdir}"
    )
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
    report = {
        "inversion": inversion,
        "edit": edit,
        "source": spec.source,
        "target": spec.target,
        "edit_type": spec.edit_type,
        "tau_v": spec.tau_v,
        "tau_c": spec.tau_c,
        "tau_s": spec.tau_s,
        "tau_u": spec.tau_u,
        "blend_words": spec.blend_words,
        "eq_params": spec.eq_params,
        "guidance_scale": spec.guidance_scale,
        "num_ddim_steps": T,
        "model": bundle.model_id,
        "untrained_model": bundle.untrained,
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "edit_seconds": round(out.seconds, 3),
    }
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
