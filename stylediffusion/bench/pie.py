"""PIE-Bench (Ju et al., "PnP Inversion", 2023) runner: any registered inversion x edit, PIE-Bench metrics.

``mapping_file.json`` is a dict keyed by image id; each entry holds ``image_path`` (relative to the
images folder), ``original_prompt``, ``editing_prompt`` (square brackets mark the edited words),
``editing_instruction``, ``editing_type_id`` ("0".."9"), ``blended_word`` ("cat dog" or "") and
``mask``: a run-length encoding of the edit region over the 512x512 image (see ``decode_rle``).

Outputs (``--outdir OUT``)::

    OUT/results.csv                     one row per (image id, method); resumable
    OUT/<method>/<editing_type>/<id>.png   the edited image (written atomically)
    OUT/summary.md, summary.csv         tables laid out like PIE-Bench's (per edit type and overall)
    OUT/metrics_boxplots.png            distributions of structure distance / PSNR / LPIPS per method
    OUT/metrics_unavailable.json        per method, why a metric column is n/a
    OUT/parts/                          per-process part files while a run is in progress
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import metrics as M
from .. import seq_aligner, validate
from ..api import StyleDiffusionEditor
from ..defaults import TAU_C, TAU_S, TAU_U, TAU_V
from ..editing import EditSpec, build_controller, default_edit_type
from ..errors import UserError
from ..files import atomic_write_text
from ..flags import ArgumentParser, count_at_least, str2bool
from ..image_io import load_image, save_atomic
from ..methods.registry import split_method_options
from ..metrics import DEFAULT_CLIP, DEFAULT_DINO
from ..runner import started
from ..specs import asked_from
from . import options
from .report import METRICS, NA, write_reports
from .report import read_reasons as _read_reasons
from .sharding import RowLog, init_shard, merge_parts, part_path, resume

logger = logging.getLogger(__name__)

PIE_SIZE = (512, 512)
RESULT_COLUMNS = ("id", "editing_type_id", "method", "edit_type", *METRICS, "note", "seconds")
TIMING_COLUMNS = ("seconds",)
EDIT_TYPE_DIRS = {
    "0": "0_random", "1": "1_change_object", "2": "2_add_object", "3": "3_delete_object",
    "4": "4_change_attribute_content", "5": "5_change_attribute_pose", "6": "6_change_attribute_color",
    "7": "7_change_attribute_material", "8": "8_change_background", "9": "9_change_style",
}


# ----------------------------------------------------------------------------- mapping file
def strip_brackets(prompt: str) -> str:
    """``"a [cat] sitting"`` -> ``"a cat sitting"`` (brackets removed, whitespace collapsed)."""
    return " ".join(re.sub(r"[\[\]]", " ", prompt).split())


def decode_rle(rle, shape: tuple[int, int] = PIE_SIZE, border: bool = True) -> np.ndarray:
    """PIE-Bench mask RLE -> ``uint8`` array ``shape`` with 1 = edit region.

    ``rle`` is a flat list ``[start, length, start, length, ...]`` of runs of ones over the image
    flattened in **row-major** order (index = row * width + column). That is the order PIE-Bench's
    own decoder implies: it fills a flat array and calls numpy's ``reshape(512, 512)``, whose default
    is C (row-major) order, unlike COCO's column-major RLE. Runs past the end are clipped.

    ``border=True`` also sets the outermost pixel ring to 1, as PIE-Bench's decoder does "to avoid
    annotation errors in boundary"; background metrics (on ``1 - mask``) then ignore the image border.
    Keep it on to compare with published numbers.
    """
    h, w = shape
    values = check_rle(rle, shape=shape)
    flat = np.zeros(h * w, dtype=np.uint8)
    for k in range(0, len(values), 2):  # Python ints: a huge start or length cannot overflow
        start, length = values[k], values[k + 1]
        flat[min(start, h * w) : min(start + length, h * w)] = 1
    mask = flat.reshape(h, w)
    if border:
        mask[0, :] = mask[-1, :] = 1
        mask[:, 0] = mask[:, -1] = 1
    return mask


def check_rle(rle, what: str = "mask RLE", shape: tuple[int, int] = PIE_SIZE) -> list[int]:
    """A mask RLE as a flat list of ints (start, length pairs), or a UserError: no negative value and
    no run starting beyond the image's pixel count (a run that ends past the image is clipped; the
    values are Python ints, so no size can overflow).

    Used when the mapping file is read, so that a malformed mask stops the run before any image is
    written, and again by ``decode_rle``."""
    if rle is None:
        return []
    if not isinstance(rle, (list, tuple)):
        raise UserError(f"{what} is {type(rle).__name__}, not a list of start, length numbers.")
    bad = next((v for v in rle if isinstance(v, bool) or not isinstance(v, (int, np.integer))), None)
    if bad is not None:
        raise UserError(f"{what} holds {validate._short(bad)}, not a whole number.")
    if len(rle) % 2:
        raise UserError(f"{what} has an odd number of values ({len(rle)}): expected start, length pairs.")
    values = [int(v) for v in rle]
    if any(v < 0 for v in values):
        raise UserError(f"{what} holds a negative start or length.")
    pixels = shape[0] * shape[1]
    outside = [start for start in values[::2] if start > pixels]
    if outside:
        raise UserError(f"{what} has a run starting at {outside[0]}, beyond the {pixels} pixels of a "
                        f"{shape[0]}x{shape[1]} mask.")
    return values


def encode_rle(mask: np.ndarray) -> list[int]:
    """Inverse of ``decode_rle(border=False)``: runs of ones of the row-major flattened mask."""
    flat = (np.asarray(mask).reshape(-1) != 0).astype(np.int8)
    edges = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


@dataclass
class PieEntry:
    id: str
    image_path: Path
    source: str
    target: str
    instruction: str
    editing_type_id: str
    blended_word: tuple[str, ...] | None
    mask_rle: list | None

    @property
    def type_dir(self) -> str:
        return EDIT_TYPE_DIRS.get(self.editing_type_id, f"{self.editing_type_id}_type")


def load_mapping(mapping_file: Path, images: Path, limit: int | None = None, editing_types=None,
                 ids=None) -> list[PieEntry]:
    """Entries sorted by id, optionally filtered by edit type / id, then cut to the first ``limit``."""
    mapping_file = Path(mapping_file)
    if not mapping_file.is_file():
        raise UserError(f"mapping file '{mapping_file}' does not exist: pass PIE-Bench's mapping_file.json.")
    try:
        data = json.loads(mapping_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"mapping file '{mapping_file}' is not UTF-8 text (byte {e.start}).") from e
    except (json.JSONDecodeError, RecursionError, MemoryError) as e:
        raise UserError(f"mapping file '{mapping_file}' is not valid JSON: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"mapping file '{mapping_file}' must be a JSON object keyed by image id.")
    entries = [_entry(str(key), data[key], Path(images)) for key in sorted(data)]
    if editing_types:
        wanted = {str(t) for t in editing_types}
        entries = [e for e in entries if e.editing_type_id in wanted]
    if ids:
        wanted = {str(i) for i in ids}
        entries = [e for e in entries if e.id in wanted]
    if limit is not None:
        entries = entries[:validate.number(limit, "--limit", minimum=1, integer=True)]
    missing = [e for e in entries if not e.image_path.is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the mapping file are missing under --images "
                        f"(first: '{missing[0].image_path}'): pass the folder that holds PIE-Bench's "
                        f"annotation_images.")
    return entries


def _entry(key: str, e, images: Path) -> PieEntry:
    """One mapping entry, every field checked: the id and edit type become file and folder names, so
    they must stay inside the output folder; the mask is checked before anything is written."""
    where = f"mapping entry {validate._short(key)}"
    validate.safe_component(key, f"{where}: the image id")
    if not isinstance(e, dict):
        raise UserError(f"{where} is {type(e).__name__}, not an object with image_path, prompts and mask.")
    missing = [k for k in ("image_path", "original_prompt", "editing_prompt") if k not in e]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}.")
    if not isinstance(e["image_path"], str) or not e["image_path"].strip():
        raise UserError(f"{where}: image_path {validate._short(e['image_path'])} is not a file path.")
    source = strip_brackets(validate.prompt(e["original_prompt"], f"{where}: original_prompt"))
    target = strip_brackets(validate.prompt(e["editing_prompt"], f"{where}: editing_prompt"))
    for text, name in ((source, "original_prompt"), (target, "editing_prompt")):
        validate.prompt(text, f"{where}: {name} without its brackets")
    type_id = e.get("editing_type_id", "0")
    if isinstance(type_id, bool) or not isinstance(type_id, (str, int)):
        raise UserError(f"{where}: editing_type_id {validate._short(type_id)} is not an id like \"1\".")
    type_id = validate.safe_component(str(type_id), f"{where}: editing_type_id")
    blend = e.get("blended_word") or ""
    if not isinstance(blend, str):
        raise UserError(f"{where}: blended_word {validate._short(blend)} is not text like \"cat dog\".")
    instruction = e.get("editing_instruction", "")
    check_rle(e.get("mask"), f"{where}: mask")
    return PieEntry(key, images / e["image_path"], source, target, instruction if isinstance(instruction, str) else "",
                    type_id, tuple(blend.split()) or None, e.get("mask"))


def edit_spec(entry: PieEntry, args):
    """EditSpec of one entry: Replacement when the prompts have as many words, else Refinement; the
    blend words from ``blended_word``; README taus unless overridden by flags."""
    def pick(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    blend = entry.blended_word if entry.blended_word and len(entry.blended_word) == 2 else None
    if not getattr(args, "blend", True):
        blend = None
    return EditSpec(source=entry.source, target=entry.target,
                    edit_type=pick("edit_type", default_edit_type(entry.source, entry.target)),
                    tau_v=pick("tau_v", TAU_V), tau_c=pick("tau_c", TAU_C), tau_s=pick("tau_s", TAU_S),
                    tau_u=pick("tau_u", TAU_U), blend_words=blend, eq_params=pick("eq_params", None),
                    guidance_scale=args.guidance_scale)


def _usable_spec(spec, tokenizer, T: int) -> tuple[object, list[str]]:
    """The spec, or a fallback when its words do not fit the prompts (as in a few PIE-Bench entries
    whose blended word is not literally in the prompt): drop the blend words, then use Refinement."""
    notes = []
    candidates = [spec]
    if spec.blend_words:
        candidates.append(replace(spec, blend_words=None))
    if spec.edit_type == "Replacement":
        candidates.append(replace(spec, blend_words=None, edit_type="Refinement"))
    last = None
    for k, cand in enumerate(candidates):
        try:
            build_controller(cand, tokenizer, T)
        except UserError as e:
            last = e
            continue
        if k:
            notes.append(f"fallback ({last}): blend words {cand.blend_words}, {cand.edit_type}")
        return cand, notes
    raise last


# ----------------------------------------------------------------------------- metrics
def load_metric_backbones(args, device: str) -> tuple[dict, dict]:
    """Backbones for ``metrics.evaluate_pair``, loaded once; a missing one is logged and its metrics
    become n/a (with the reason in ``metrics_unavailable.json``) instead of stopping the run."""
    backbones, reasons = {}, {}
    uses = {"clip": ("clip_whole", "clip_edited"), "dino": ("structure_distance",)}
    for kind, flag, name in (("clip", "--clip_model", args.clip_model), ("dino", "--dino_model", args.dino_model)):
        if not name or str(name).lower() == "none":
            reasons.update({m: f"disabled ({flag} none)" for m in uses[kind]})
            continue
        try:
            backbones[kind] = M.load_backbone(kind, name, device)
        except UserError as e:
            logger.info(f"warning: {e} -> {', '.join(uses[kind])} n/a in this run")
            reasons.update({m: str(e) for m in uses[kind]})
    if args.lpips:
        backbones["lpips"] = args.lpips_net
    return backbones, reasons


def _attention_map(maps, spec, tokenizer):
    """The source blend word's averaged mid-low cross-attention map (h, w), for NS-LPIPS, from an edit's
    (prompts, queries, tokens) maps."""
    if maps is None or not spec.blend_words:
        return None
    idx = seq_aligner.word_token_indices(spec.source, spec.blend_words[0], tokenizer)
    if not idx:
        return None
    m = maps[0][:, idx].float().mean(-1)
    side = int(round(m.shape[0] ** 0.5))
    return m.reshape(side, side).cpu() if side * side == m.shape[0] else None


def _cell(value) -> str:
    if isinstance(value, float):
        return repr(value) if value != value or value in (float("inf"), float("-inf")) else format(value, ".8g")
    return NA


# ----------------------------------------------------------------------------- runner
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m stylediffusion.bench pie",
                                description="Run an inversion x edit method over PIE-Bench and score it.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--mapping_file", type=Path, required=True, help="PIE-Bench's mapping_file.json")
    g.add_argument("--images", type=Path, required=True, help="folder the entries' image_path are relative to")
    g.add_argument("--outdir", type=Path, required=True)
    g.add_argument("--limit", type=count_at_least(1), default=None, help="only the first N ids (sorted)")
    g.add_argument("--editing_types", default=None, help="comma-separated editing_type_id values to keep")
    g.add_argument("--ids", default=None, help="comma-separated image ids to keep")
    g.add_argument("--mask_border", type=str2bool, default=True, metavar="True|False",
                   help="count the 1-pixel image border as edit region, as PIE-Bench's decoder does")
    g.add_argument("--blend", type=str2bool, default=True, metavar="True|False",
                   help="LocalBlend with the entry's blended_word (PnP Inversion's StyleDiffusion script used none)")
    g.add_argument("--checkpoint_dir", type=Path, default=None,
                   help="keep each image's trained inversion here (default: not kept)")
    options.add_model_args(p)
    options.add_method_args(p)
    options.add_edit_args(p, "PIE-Bench (word counts decide Replacement/Refinement) and the README defaults")
    g = p.add_argument_group("metrics")
    g.add_argument("--clip_model", default=DEFAULT_CLIP, help="CLIP for the CLIP scores (hub id, folder or none)")
    g.add_argument(
        "--dino_model", default=DEFAULT_DINO, help="DINO ViT for structure distance (hub id, folder or none)"
    )
    g.add_argument("--lpips", type=str2bool, default=True, metavar="True|False", help="compute LPIPS / NS-LPIPS")
    g.add_argument("--lpips_net", choices=("alex", "vgg", "squeeze"), default="squeeze",
                   help="LPIPS backbone (PIE-Bench: squeeze; NS-LPIPS always uses alex, as the authors' script)")
    g.add_argument("--report", type=str2bool, default=True, metavar="True|False",
                   help="write summary.md / summary.csv / plots at the end")
    return p


def _split(text: str | None):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _key(row: dict) -> tuple:
    return (row["id"], row["method"])


@asked_from("cli")
def run(args) -> dict:
    """Run (or resume) the benchmark; returns ``{"processed": n, "skipped": n, "rank": r, "world": w}``."""
    options.check_method(args)
    entries = load_mapping(args.mapping_file, args.images, args.limit, _split(args.editing_types), _split(args.ids))
    for entry in entries:  # taus, guidance, re-weighting: the checks the CLI makes, before any model loads
        edit_spec(entry, args).validate()
    shard = init_shard(args.device, args.timeout_hours)
    method = options.method_label(args)
    out = Path(args.outdir)
    results, parts = out / "results.csv", out / "parts"
    started()  # files are written from here on: Ctrl-C keeps the finished rows
    done = resume(shard, results, parts, "results", RESULT_COLUMNS, _key)
    todo = [e for e in entries if (e.id, method) not in done]
    mine = shard.take(todo)
    logger.info(f"{shard.tag} {method}: {len(entries)} entries, {len(entries) - len(todo)} already done, "
        f"{len(mine)} of the {len(todo)} remaining on this process ({shard.device})")
    reasons: dict = {}
    if mine:
        reasons = _process(args, mine, method, shard, part_path(parts, "results", shard.rank))
    shard.barrier()
    if shard.is_main:
        rows = merge_parts(results, parts, "results", RESULT_COLUMNS, _key)
        if reasons:
            _merge_reasons(out / "metrics_unavailable.json", {method: reasons})
        if args.report:
            for path in write_reports(out, rows):
                logger.info(f"wrote {path}")
    shard.barrier()
    return {"processed": len(mine), "skipped": len(entries) - len(todo), "rank": shard.rank, "world": shard.world}


def _merge_reasons(path: Path, reasons: dict) -> None:
    merged = {**_read_reasons(path), **reasons}
    atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")


def _process(args, mine: list[PieEntry], method: str, shard, part: Path) -> dict:
    bundle = options.load_bundle(args, shard.device)
    backbones, reasons = load_metric_backbones(args, str(bundle.device))
    editor = StyleDiffusionEditor(bundle, progress=args.progress)
    inversion_options, edit_options = split_method_options(options.method_options(args), args.inversion, args.edit)
    T = args.num_ddim_steps
    writer = RowLog(part, RESULT_COLUMNS)
    method_dir = Path(args.outdir) / options.safe_dirname(method)
    for n, entry in enumerate(mine):
        t0 = time.perf_counter()
        notes = load_image(entry.image_path, bundle.image_size)[1]
        mask = decode_rle(entry.mask_rle, PIE_SIZE, args.mask_border) if entry.mask_rle else None  # before any write
        if entry.blended_word and len(entry.blended_word) != 2:
            notes.append(f"blended_word {' '.join(entry.blended_word)!r} is not two words: no LocalBlend")
        row = {"id": entry.id, "editing_type_id": entry.editing_type_id, "method": method}
        try:
            spec, fallback = _usable_spec(edit_spec(entry, args), bundle.tokenizer, T)
            notes += fallback
        except UserError as e:
            row.update({k: NA for k in METRICS}, edit_type="", note=f"skipped: {e}",
                       seconds=f"{time.perf_counter() - t0:.3f}")
            writer.append(row)
            logger.info(f"{shard.tag} {entry.id}: skipped ({e})")
            continue
        ckpt = (options.checkpoint_file(args.checkpoint_dir, entry.id, args, bundle)
                if args.checkpoint_dir is not None else None)
        # seeded per item (invert's seed): results do not depend on which process runs it
        inv = editor.invert(entry.image_path, spec.source, method=args.inversion, num_inference_steps=T,
                            num_inner_steps=args.num_inner_steps, guidance_scale=args.guidance_scale, lr=args.lr,
                            attention_loss=args.attention_loss, early_stop=args.early_stop, checkpoint=ckpt,
                            seed=args.seed, **inversion_options)
        out = editor.edit(inv, spec, method=args.edit, **edit_options)
        seconds = time.perf_counter() - t0
        edited, source = out.images[0], out.input_image
        save_atomic(edited, method_dir / entry.type_dir / f"{entry.id}.png")
        if mask is None:
            notes.append("no mask: background metrics over the whole image")
        scores = M.evaluate_pair(source, edited, edit_mask=mask, target_prompt=spec.target, backbones=backbones,
                                 attention_map=_attention_map(out.cross_attention[0], spec, bundle.tokenizer),
                                 device=str(bundle.device))
        if not args.lpips:
            scores["lpips"] = scores["ns_lpips"] = M.MetricUnavailable("--lpips False")
        for k, v in scores.items():  # why a whole column is n/a (missing backbone or library)
            if isinstance(v, M.MetricUnavailable) and k not in reasons and "attention map" not in v.reason:
                reasons[k] = v.reason
        # per-image gaps, as in PIE-Bench's evaluation: no background / no edit region -> not scored
        if mask is not None and mask.all():
            scores.update({k: NA for k in ("psnr", "lpips", "mse", "ssim")})
            notes.append("the edit mask covers the whole image: no background metrics")
        if mask is not None and not mask.any():
            scores["clip_edited"] = NA
            notes.append("empty edit mask: no edit-region CLIP score")
        row.update({k: _cell(scores.get(k)) for k in METRICS}, edit_type=spec.edit_type, note="; ".join(notes),
                   seconds=f"{seconds:.3f}")
        writer.append(row)
        logger.info(f"{shard.tag} {n + 1}/{len(mine)} {entry.id} ({entry.type_dir}) {spec.edit_type} "
            f"'{spec.target}' in {seconds:.1f}s")
    return reasons


def main(argv=None) -> dict:
    return run(build_parser().parse_args(argv))
