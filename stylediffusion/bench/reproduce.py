"""Batch reproduction of the paper's figure-style grids from the data index.

For every row of ``data/stylediffusion_editing.csv`` (or the rows of the cases given by ``--idx``):
one labelled grid ``input | reconstruction | edit``, and a contact sheet stacking all of them.
Each case (image) is inverted once and shared by its rows. Outputs (``--outdir OUT``)::

    OUT/<method>/case<N>_edit<K>.png     one grid per index row (K counts the case's rows)
    OUT/<method>/contact_sheet.png       every grid of the index rows run so far, in index order
    OUT/reproduce.csv                    one row per grid (resumable; seconds are timing only)
    OUT/checkpoints/                     trained inversions, reused by a rerun
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .. import data_index
from ..api import StyleDiffusionEditor
from ..editing import EditSpec, build_controller
from ..errors import UserError
from ..files import writable_folder
from ..flags import ArgumentParser
from ..flags import method_options as parse_pairs
from ..image_io import check_image_readable, image_grid, save_atomic
from ..methods import get_edit
from ..methods.registry import check_method_options, default_inversion, split_method_options
from ..runner import started
from ..specs import asked_from
from ..style_transfer import STYLE_INVERSIONS, transfer_options
from . import options
from .sharding import RowLog, init_shard, merge_parts, part_path, resume

logger = logging.getLogger(__name__)

COLUMNS = ("case", "k", "method", "source", "target", "edit_type", "blend_words", "tau_v", "tau_c", "tau_s",
           "tau_u", "grid", "seconds")
MIN_CELL = 192  # grids of small models are upscaled to at least this many pixels per picture


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m stylediffusion.bench reproduce",
                                description="Figure-style grids (input | reconstruction | edit) for rows of the "
                                            "data index, and a contact sheet of all of them.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--idx", default=None, help="case numbers to run, comma-separated (default: every case)")
    p.add_argument("--data_dir", type=Path, default=None, help="folder holding the index CSVs and images")
    p.add_argument("--outdir", type=Path, required=True)
    options.add_model_args(p)
    options.add_method_args(p)
    options.add_edit_args(p, "the index row")
    g = p.add_argument_group("style transfer (Fig. 20): each case's image is the STYLE, one grid content | style | "
                             "transfer per case")
    g.add_argument("--content_image", type=Path, default=None, help="the content image of every transfer")
    g.add_argument("--content_prompt", default=None, help="its caption (default: the empty prompt)")
    return p


def _key(row: dict) -> tuple:
    return (row["method"], int(row["case"]), int(row["k"]))


def index_items(idx, data_dir) -> list[tuple[int, int, object]]:
    """(case, k, EditRow) for the selected cases, in index order; k numbers a case's rows from 0."""
    data_dir = Path(data_dir) if data_dir is not None else data_index.DEFAULT_DATA_DIR
    cases = None if idx is None else [_case(c) for c in str(idx).split(",") if c.strip()]
    rows = data_index.edit_rows(None, data_dir)
    if cases is not None:
        known = {r.case_number for r in rows}
        unknown = [c for c in cases if c not in known]
        if unknown:
            raise UserError(f"--idx {','.join(map(str, unknown))} not in the index (cases: "
                            f"{', '.join(map(str, sorted(known)))}).")
    items, counter = [], {}
    for r in rows:
        k = counter.get(r.case_number, 0)
        counter[r.case_number] = k + 1
        if cases is None or r.case_number in cases:
            items.append((r.case_number, k, r))
    return items


def _case(text: str) -> int:
    try:
        return int(text)
    except ValueError as err:
        raise UserError(f"--idx {text.strip()!r} is not a case number: pass numbers separated by commas.") from err


def row_spec(row, args):
    def pick(name):
        value = getattr(args, name, None)
        return getattr(row, name) if value is None else value

    return EditSpec(source=row.prompt, target=row.target, edit_type=pick("edit_type"), tau_v=pick("tau_v"),
                    tau_c=pick("tau_c"), tau_s=pick("tau_s"), tau_u=pick("tau_u"),
                    blend_words=tuple(row.blend_word) if row.blend_word else None, eq_params=pick("eq_params"),
                    guidance_scale=args.guidance_scale)


def labelled_grid(images, labels, title: str):
    """The three pictures side by side (upscaled to MIN_CELL if smaller), captions below, title above."""
    side = max(images[0].size[0], MIN_CELL)
    cells = [im.resize((side, side), Image.NEAREST if im.size[0] < side else Image.LANCZOS) for im in images]
    strip = image_grid(cells, labels, pad=6)
    lines = title.split("\n")
    head = 4 + 13 * len(lines)
    out = Image.new("RGB", (strip.width, strip.height + head), "white")
    draw = ImageDraw.Draw(out)
    for n, line in enumerate(lines):
        draw.text((6, 3 + 13 * n), line, fill="black")
    out.paste(strip, (0, head))
    return out


def contact_sheet(paths: list[Path], title: str):
    grids = [Image.open(p).convert("RGB") for p in paths]
    width = max(g.width for g in grids)
    sheet = Image.new("RGB", (width, 22 + sum(g.height for g in grids)), "white")
    ImageDraw.Draw(sheet).text((6, 5), title, fill="black")
    y = 22
    for g in grids:
        sheet.paste(g, (0, y))
        y += g.height
    return sheet


TRANSFER_LABEL = "stylediffusion+style_transfer"


def _check_transfer(args) -> None:
    """Style-transfer rows: the content image readable, the options known, before any model loads."""
    if args.inversion is None:
        args.inversion = default_inversion(None)
    if args.inversion not in STYLE_INVERSIONS:
        raise UserError(f"style transfer needs --inversion stylediffusion, not {args.inversion!r}.")
    check_image_readable(args.content_image)
    pairs = parse_pairs(args.method_option or [])
    transfer_options({k: v for k, v in pairs.items() if k.startswith("transfer_")})
    check_method_options({k: v for k, v in pairs.items() if not k.startswith("transfer_")}, args.inversion)
    writable_folder(args.outdir, "--outdir")


@asked_from("cli")
def run(args) -> dict:
    transfer = getattr(args, "content_image", None) is not None
    if transfer:
        _check_transfer(args)
    else:
        method_options = options.check_method(args)
    items = index_items(args.idx, args.data_dir)
    if transfer:  # one transfer per case: its image is the style
        items = [it for it in items if it[1] == 0]

    for spec in (row_spec(r, args) for _, _, r in items):
        spec.validate()
        if not transfer:
            get_edit(args.edit, args.inversion).check(spec, method_options)  # e.g. ELITE's files and placeholder
    shard = init_shard(args.device, args.timeout_hours)
    method = TRANSFER_LABEL if transfer else options.method_label(args)
    out = Path(args.outdir)
    manifest, parts = out / "reproduce.csv", out / "parts"
    started()  # files are written from here on: Ctrl-C keeps the finished rows
    done = resume(shard, manifest, parts, "reproduce", COLUMNS, _key)
    todo = [it for it in items if (method, it[0], it[1]) not in done]
    cases = sorted({c for c, _, _ in todo})
    my_cases = shard.take(cases)  # a case's rows stay together: one inversion serves all of them
    mine = [it for it in todo if it[0] in my_cases]
    logger.info(f"{shard.tag} {method}: {len(items)} index rows, {len(items) - len(todo)} already done, "
        f"{len(mine)} rows ({len(my_cases)} cases) on this process ({shard.device})")
    if mine:
        process = _process_transfer if transfer else _process
        process(args, mine, method, shard, part_path(parts, "reproduce", shard.rank))
    shard.barrier()
    if shard.is_main:
        rows = merge_parts(manifest, parts, "reproduce", COLUMNS, _key)
        mine_rows = [r for r in rows if r["method"] == method and (Path(args.outdir) / r["grid"]).is_file()]
        if mine_rows:
            sheet = out / options.safe_dirname(method) / "contact_sheet.png"
            save_atomic(contact_sheet([out / r["grid"] for r in mine_rows], f"{method}: {len(mine_rows)} edits"),
                        sheet)
            logger.info(f"wrote {sheet}")
    shard.barrier()
    return {"processed": len(mine), "skipped": len(items) - len(todo), "rank": shard.rank, "world": shard.world}


def _process(args, mine, method: str, shard, part: Path) -> None:
    bundle = options.load_bundle(args, shard.device)
    T = args.num_ddim_steps
    for _, _, row in mine:  # word-level problems before any training
        build_controller(row_spec(row, args), bundle.tokenizer, T)
    editor = StyleDiffusionEditor(bundle, progress=args.progress)
    inversion_options, edit_options = split_method_options(options.method_options(args), args.inversion, args.edit)
    writer = RowLog(part, COLUMNS)
    folder = options.safe_dirname(method)
    tag = " (untrained model)" if bundle.untrained else ""
    for case in sorted({c for c, _, _ in mine}):
        rows = [(k, r) for c, k, r in mine if c == case]
        first = rows[0][1]
        ckpt = options.checkpoint_file(Path(args.outdir) / "checkpoints", f"case{case}", args, bundle)
        t0 = time.perf_counter()
        inverted = editor.invert(first.image_path, first.prompt, method=args.inversion, num_inference_steps=T,
                                 num_inner_steps=args.num_inner_steps, guidance_scale=args.guidance_scale,
                                 lr=args.lr, attention_loss=args.attention_loss, early_stop=args.early_stop,
                                 checkpoint=ckpt, seed=args.seed, **inversion_options)
        inv_seconds = time.perf_counter() - t0
        logger.info(f"{shard.tag} case {case}: {args.inversion} inversion in {inv_seconds:.1f}s")
        for k, row in rows:
            spec = row_spec(row, args)
            t1 = time.perf_counter()
            out = editor.edit(inverted, spec, method=args.edit, **edit_options)
            pics = [out.input_image, out.reconstruction, out.images[0]]
            title = (f"case {case} #{k} [{method}]: '{spec.source}' -> '{spec.target}'\n{spec.edit_type}, "
                     f"tau_v {spec.tau_v}, tau_c {spec.tau_c}, tau_s {spec.tau_s}, tau_u {spec.tau_u}"
                     + (f", blend {' '.join(spec.blend_words)}" if spec.blend_words else "")
                     + (f", eq {spec.eq_params}" if spec.eq_params else ""))
            rel = Path(folder) / f"case{case}_edit{k}.png"
            save_atomic(labelled_grid(pics, ["input", "reconstruction" + tag, "edit"], title),
                        Path(args.outdir) / rel)
            seconds = time.perf_counter() - t1 + (inv_seconds if k == rows[0][0] else 0.0)
            writer.append({"case": case, "k": k, "method": method, "source": spec.source, "target": spec.target,
                           "edit_type": spec.edit_type, "blend_words": " ".join(spec.blend_words or ()),
                           "tau_v": spec.tau_v, "tau_c": spec.tau_c, "tau_s": spec.tau_s, "tau_u": spec.tau_u,
                           "grid": rel.as_posix(), "seconds": f"{seconds:.3f}"})
            logger.info(f"{shard.tag} case {case} #{k}: '{spec.target}' -> {rel}")


def _process_transfer(args, mine, method: str, shard, part: Path) -> None:
    """Fig. 20-like grids: content | style | transfer, the style trained (or loaded) per case."""
    bundle = options.load_bundle(args, shard.device)
    editor = StyleDiffusionEditor(bundle, progress=args.progress)
    pairs = options.method_options(args)
    transfer = {k: v for k, v in pairs.items() if k.startswith("transfer_")}
    inversion_options, _ = split_method_options({k: v for k, v in pairs.items() if k not in transfer},
                                                args.inversion)
    writer = RowLog(part, COLUMNS)
    folder = options.safe_dirname(method)
    for case, _, row in mine:
        # named by the inversion's options only: another transfer setting reuses the trained style
        ckpt = options.checkpoint_file(Path(args.outdir) / "checkpoints", f"case{case}", args, bundle,
                                       {"variant": args.variant, **inversion_options})
        t0 = time.perf_counter()
        inverted = editor.invert(
            row.image_path,
            row.prompt,
            method=args.inversion,
            num_inference_steps=args.num_ddim_steps,
            num_inner_steps=args.num_inner_steps,
            guidance_scale=args.guidance_scale,
            lr=args.lr,
            attention_loss=args.attention_loss,
            early_stop=args.early_stop,
            checkpoint=ckpt,
            seed=args.seed,
            **inversion_options,
        )
        out = editor.transfer_style(inverted, args.content_image, args.content_prompt,
                                    guidance_scale=args.guidance_scale, style_reconstruction=False, **transfer)
        title = (f"case {case} [{method}]: style '{row.prompt}', content {args.content_image.name}"
                 + (f" ('{args.content_prompt}')" if args.content_prompt else ""))
        rel = Path(folder) / f"case{case}_transfer.png"
        save_atomic(labelled_grid([out.input_image, out.style_image, out.images[0]], ["content", "style", "transfer"],
                                  title), Path(args.outdir) / rel)
        writer.append({"case": case, "k": 0, "method": method, "source": row.prompt,
                       "target": f"style transfer onto {args.content_image.name}", "edit_type": "", "blend_words": "",
                       "tau_v": "", "tau_c": "", "tau_s": "", "tau_u": "", "grid": rel.as_posix(),
                       "seconds": f"{time.perf_counter() - t0:.3f}"})
        logger.info(f"{shard.tag} case {case}: style transfer -> {rel}")


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))
