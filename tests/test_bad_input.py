"""Hostile and unlucky input, table-driven: every case must end with exit code 2 (or ``UserError`` from
Python), exactly one stderr line starting with ``error:``, no traceback, and no file created, changed
or deleted outside the run's own output folders (a listing of the whole test tree is compared
before and after). The classes are those of docs/reliability.md; ``CASES`` counts them.

Most cases fail before any model loads. The ones that need the model get the session's tiny model
(``load_models`` is patched to hand it out instead of rebuilding it); a few representative cases
and the Ctrl-C case run the real command line in a subprocess.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import stylediffusion.models as models_module
from stylediffusion import validate
from stylediffusion.bench import pie
from stylediffusion.bench.__main__ import main as bench_main
from stylediffusion.checkpoint import read_checkpoint
from stylediffusion.cli import main as cli_main
from stylediffusion.errors import UserError
from stylediffusion.image_io import load_image

ROOT = Path(__file__).resolve().parent.parent
T_FAST = ["--num_ddim_steps", "2", "--num_inner_steps", "1"]
FAST = ["--model", "tiny", *T_FAST, "--progress", "False", "--device", "cpu"]
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
EDIT_COLUMNS = "case_number,prompt,image_path,target,blend_word,eq_params,tau_v,tau_c,tau_s,tau_u,edit_type"


# ----------------------------------------------------------------------------- the world the cases run in
def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (a decompression bomb: Pillow refuses it on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def write_index(folder: Path, edit_rows: list[str], prompt_rows: list[str] | None = None, raw: bytes | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    shutil.copy(WORLD.photo, folder / "images" / "photo.png")
    (folder / "stylediffusion_prompts.csv").write_text(
        "case_number,prompt,image_path\n" + "\n".join(prompt_rows or [f"0,{SOURCE},images/photo.png"]) + "\n")
    if raw is not None:
        (folder / "stylediffusion_editing.csv").write_bytes(raw)
    else:
        (folder / "stylediffusion_editing.csv").write_text(EDIT_COLUMNS + "\n" + "\n".join(edit_rows) + "\n")
    return folder


GOOD_ROW = f"0,{SOURCE},images/photo.png,{TARGET},,,0.5,0.6,0.6,0.0,Replacement"
GOOD_ENTRY = {"image_path": "0_random/000.png", "original_prompt": SOURCE, "editing_prompt": "a photo of a [dog]",
              "editing_instruction": "make it a dog", "editing_type_id": "0", "blended_word": "cat dog",
              "mask": [0, 10, 512 * 5, 40]}


def mapping_file(d: Path, entries: dict | None = None, raw: bytes | None = None) -> Path:
    path = d / "mapping.json"
    path.write_bytes(raw if raw is not None else json.dumps(entries).encode())
    return path


def entry(**changes) -> dict:
    e = dict(GOOD_ENTRY)
    for key, value in changes.items():
        if value is KeyError:
            del e[key]
        else:
            e[key] = value
    return {"000": e}


WORLD = SimpleNamespace()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    """Files every case may use (never changed by a case), and one trained tiny-model checkpoint."""
    root = tmp_path_factory.mktemp("bad_input")
    WORLD.root = root
    WORLD.tiny = tiny
    rng = np.random.default_rng(0)
    WORLD.photo = root / "photo.png"
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(WORLD.photo)
    WORLD.bomb = root / "bomb.png"
    png_header_only(WORLD.bomb, 30_000, 30_000)
    WORLD.text = root / "notes.png"
    WORLD.text.write_text("not a picture")
    WORLD.truncated = root / "truncated.png"
    WORLD.truncated.write_bytes(WORLD.photo.read_bytes()[:120])
    WORLD.data = write_index(root / "data", [GOOD_ROW])
    WORLD.pie_images = root / "pie_images"
    (WORLD.pie_images / "0_random").mkdir(parents=True)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(WORLD.pie_images / "0_random" / "000.png")
    WORLD.victim = root / "victim.safetensors"  # a file outside every output folder: must survive every case
    WORLD.victim.write_bytes(b"precious")
    # a model folder whose weights are pickles: refused, never loaded
    WORLD.pickled = root / "pickled_model"
    testbed = ROOT / "stylediffusion" / "assets" / "testbed_model"
    for src in testbed.rglob("*"):
        dst = WORLD.pickled / src.relative_to(testbed)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif src.suffix == ".safetensors":
            dst.with_name(dst.name.replace(".safetensors", ".bin")).write_bytes(b"pickle")
        elif src.suffix in (".json", ".txt"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    with pytest.MonkeyPatch.context() as mp:
        patch_tiny(mp, tiny)
        WORLD.checkpoint = root / "good.safetensors"
        code = cli_main(FAST + ["--is_train", "True", "--image_path", str(WORLD.photo), "--prompt", SOURCE,
                                "--checkpoint", str(WORLD.checkpoint)])
        assert code == 0 and WORLD.checkpoint.is_file()
    return WORLD


def patch_tiny(monkeypatch, tiny):
    real = models_module.load_models

    def load(model, *args, **kwargs):
        return tiny if model == "tiny" else real(model, *args, **kwargs)
    monkeypatch.setattr(models_module, "load_models", load)


def damaged_checkpoint(d: Path, tensors=None, meta=None, header=None) -> Path:
    """A copy of the world's good checkpoint with tensors/metadata changed by the given functions."""
    with safe_open(str(WORLD.checkpoint), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = json.loads(f.metadata()["stylediffusion"])
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    path = d / "inv.safetensors"
    save_file(t, str(path), metadata={"stylediffusion": header if header is not None else json.dumps(m)})
    return path


def nan_first_mapper(t):
    key = next(k for k in t if k.startswith("mappers."))
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("nan")


# ----------------------------------------------------------------------------- argument builders
def direct(d, *extra):
    return [*FAST, "--image_path", str(WORLD.photo), "--prompt", SOURCE, "--target", TARGET,
            "--outdir", str(d / "out"), "--checkpoint_dir", str(d / "ck"), *extra]


def with_checkpoint(d, path, *extra):
    return direct(d, "--checkpoint", str(path), *extra)


def indexed(d, rows=None, raw=None, *extra):
    data = write_index(d / "data", rows or [GOOD_ROW], raw=raw)
    return [*FAST, "--data_dir", str(data), "--idx", "0", "--outdir", str(d / "out"), "--checkpoint_dir",
            str(d / "ck"), *extra]


def pie_args(d, mapping=None, *extra):
    return ["pie", "--mapping_file", str(mapping or mapping_file(d, entry())), "--images", str(WORLD.pie_images),
            "--outdir", str(d / "out"), *FAST[:-4], "--device", "cpu", "--clip_model", "none", "--dino_model", "none",
            "--lpips", "False", *extra]


def reproduce_args(d, *extra):
    return ["reproduce", "--data_dir", str(WORLD.data), "--outdir", str(d / "out"), *FAST[:-4], "--device", "cpu",
            *extra]


# (id, class, runner, builder): runner "cli"/"bench" take argv from builder(d); "python" calls builder(d)
# and expects a UserError.
CASES = [
    # --- names built from data or flags must stay inside their folder
    ("pie_id_dotdot_slash", "escape", "bench", lambda d: pie_args(d, mapping_file(d, {"../../escaped": GOOD_ENTRY}))),
    ("pie_id_with_slash", "escape", "bench", lambda d: pie_args(d, mapping_file(d, {"a/b": GOOD_ENTRY}))),
    ("pie_id_dotdot", "escape", "bench", lambda d: pie_args(d, mapping_file(d, {"..": GOOD_ENTRY}))),
    ("pie_id_nul", "escape", "bench", lambda d: pie_args(d, mapping_file(d, {"a\u0000b": GOOD_ENTRY}))),
    ("pie_edit_type_escape", "escape", "bench",
     lambda d: pie_args(d, mapping_file(d, entry(editing_type_id="../../x")))),
    ("option_value_path_with_retrain", "escape", "cli",
     lambda d: direct(d, "--method_option", f"embedding=../../{WORLD.victim.stem}", "--retrain")),
    ("option_variant_path", "escape", "cli", lambda d: direct(d, "--method_option", "variant=../x", "--retrain")),
    ("safe_component_dotdot", "escape", "python", lambda d: validate.safe_component("..", "a name")),
    ("safe_component_absolute", "escape", "python", lambda d: validate.safe_component("/etc/passwd", "a name")),
    ("path_leaves_folder", "escape", "python", lambda d: validate.inside(d / "ck", d / "ck" / ".." / "x", "a file")),
    # --- pickles
    ("model_with_only_pickles", "pickle", "cli",
     lambda d: direct(d, "--model", str(WORLD.pickled), "--is_train", "True")),
    # --- a checkpoint's content is validated before it is used
    ("checkpoint_nan_z_T", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, tensors=lambda t: t.update(z_T=t["z_T"] * float("nan"))))),
    ("checkpoint_nan_mapper", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, tensors=nan_first_mapper))),
    ("checkpoint_z_T_shape", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, tensors=lambda t: t.update(z_T=torch.zeros(1, 4, 3, 3))))),
    ("checkpoint_z_T_dtype", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, tensors=lambda t: t.update(z_T=t["z_T"].double())))),
    ("checkpoint_steps_word", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, meta=lambda m: m.update(trained_steps="two")))),
    ("checkpoint_mapping_config_list", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, meta=lambda m: m.update(mapping_config=[1, 2])))),
    ("checkpoint_mapping_width_word", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, meta=lambda m: m["mapping_config"].update(text_width="wide")))),
    ("checkpoint_unknown_variant", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, meta=lambda m: m.update(variant="sideways")))),
    ("checkpoint_metadata_not_object", "checkpoint", "cli",
     lambda d: with_checkpoint(d, damaged_checkpoint(d, header="[1, 2, 3]"))),
    ("checkpoint_truncated", "checkpoint", "cli",
     lambda d: with_checkpoint(d, (d / "t.safetensors", (d / "t.safetensors").write_bytes(
         WORLD.checkpoint.read_bytes()[:200]))[0])),
    ("checkpoint_read_nan_python", "checkpoint", "python",
     lambda d: read_checkpoint(damaged_checkpoint(d, tensors=lambda t: t.update(z_T=t["z_T"] * float("inf"))))),
    # --- prompts
    ("empty_prompt", "prompt", "cli", lambda d: direct(d, "--prompt", "")),
    ("blank_prompt", "prompt", "cli", lambda d: direct(d, "--prompt", "   ")),
    ("blank_target", "prompt", "cli", lambda d: direct(d, "--target", " \t ")),
    ("blank_prompt_training", "prompt", "cli", lambda d: direct(d, "--prompt", "  ", "--is_train", "True")),
    ("control_char_prompt", "prompt", "cli", lambda d: direct(d, "--prompt", "a cat\x1b[2J")),
    # --- malformed or oversized literals in flags
    ("tau_c_unclosed_dict", "literal", "cli", lambda d: direct(d, "--tau_c", "{'default_': 0.6,")),
    ("eq_params_unclosed", "literal", "cli", lambda d: direct(d, "--eq_params", "{'words': ['cat'], 'values': [2]")),
    ("eq_params_huge", "literal", "cli", lambda d: direct(d, "--eq_params", "[" * 200_000)),
    ("tau_c_deep_nesting", "literal", "cli", lambda d: direct(d, "--tau_c", "(" * 4000 + "0.5" + ")" * 4000)),
    ("eq_params_call", "literal", "cli", lambda d: direct(d, "--eq_params", "__import__('os').system('true')")),
    ("tau_c_word", "literal", "cli", lambda d: direct(d, "--tau_c", "'half'")),
    ("blend_word_numbers", "literal", "cli", lambda d: direct(d, "--blend_word", "(1, 2)")),
    ("blend_word_one_word", "literal", "cli", lambda d: direct(d, "--blend_word", "cat")),
    ("blend_word_unclosed", "literal", "cli", lambda d: direct(d, "--blend_word", "('cat', 'dog'")),
    # --- numbers: finite, positive, in range
    ("lr_nan", "number", "cli", lambda d: direct(d, "--lr", "nan")),
    ("lr_negative", "number", "cli", lambda d: direct(d, "--lr", "-0.01")),
    ("lr_zero", "number", "cli", lambda d: direct(d, "--lr", "0")),
    ("guidance_nan", "number", "cli", lambda d: direct(d, "--guidance_scale", "nan")),
    ("guidance_inf", "number", "cli", lambda d: direct(d, "--guidance_scale", "inf")),
    ("guidance_absurd", "number", "cli", lambda d: direct(d, "--guidance_scale", "1e9")),
    ("reweight_absurd", "number", "cli", lambda d: direct(d, "--eq_params", "{'words': ['dog'], 'values': [1e6]}")),
    ("reweight_inf", "number", "cli", lambda d: direct(d, "--eq_params", "{'words': ['dog'], 'values': [1e999]}")),
    ("reweight_shape", "number", "cli", lambda d: direct(d, "--eq_params", "[1, 2, 3]")),
    ("ddim_steps_zero", "number", "cli", lambda d: direct(d, "--num_ddim_steps", "0")),
    ("ddim_steps_above_scheduler", "number", "cli", lambda d: direct(d, "--num_ddim_steps", "1001")),
    ("inner_steps_negative", "number", "cli", lambda d: direct(d, "--num_inner_steps", "-3")),
    ("ddim_steps_word", "number", "cli", lambda d: direct(d, "--num_ddim_steps", "ten")),
    ("seed_negative", "number", "cli", lambda d: direct(d, "--seed", "-1")),
    ("seed_overflow", "number", "cli", lambda d: direct(d, "--seed", str(2**70))),
    ("tau_v_nan", "number", "cli", lambda d: direct(d, "--tau_v", "nan")),
    ("tau_s_above_one", "number", "cli", lambda d: direct(d, "--tau_s", "2")),
    ("tau_c_word_above_one", "number", "cli", lambda d: direct(d, "--tau_c", "{'default_': 0.6, 'dog': 7}")),
    ("tau_c_number_key", "number", "cli", lambda d: direct(d, "--tau_c", "{1: 0.5}")),
    ("boolean_word", "number", "cli", lambda d: direct(d, "--is_train", "maybe")),
    ("edit_type_unknown", "number", "cli", lambda d: direct(d, "--edit_type", "Sideways")),
    # --- method options: declared by each method, typed, in range
    ("option_typo", "option", "cli",
     lambda d: direct(d, "--inversion", "ddim", "--edit", "sdedit", "--method_option", "sdedit_strengh=0.6")),
    ("option_word_for_number", "option", "cli",
     lambda d: direct(d, "--inversion", "ddim", "--edit", "sdedit", "--method_option", "sdedit_strength=strong")),
    ("option_out_of_range", "option", "cli",
     lambda d: direct(d, "--inversion", "ddim", "--edit", "sdedit", "--method_option", "sdedit_strength=5")),
    ("option_bad_boolean", "option", "cli",
     lambda d: direct(d, "--inversion", "nulltext", "--method_option", "nulltext_attention_loss=maybe")),
    ("option_fraction_for_int", "option", "cli",
     lambda d: direct(d, "--inversion", "generated", "--edit", "p2p", "--method_option", "generated_seed=1.5")),
    ("option_other_methods", "option", "cli", lambda d: direct(d, "--method_option", "nulltext_iterations=3")),
    ("option_not_key_value", "option", "cli", lambda d: direct(d, "--method_option", "strength")),
    ("option_huge_value", "option", "cli", lambda d: direct(d, "--method_option", "embedding=" + "x" * 20_000)),
    # --- images
    ("image_bomb", "image", "cli", lambda d: direct(d, "--image_path", str(WORLD.bomb))),
    ("image_is_folder", "image", "cli", lambda d: direct(d, "--image_path", str(WORLD.root / "data"))),
    ("image_not_picture", "image", "cli", lambda d: direct(d, "--image_path", str(WORLD.text))),
    ("image_truncated", "image", "cli", lambda d: direct(d, "--image_path", str(WORLD.truncated))),
    ("image_bomb_python", "image", "python",
     lambda d: load_image(WORLD.bomb, 32)),
    # --- the index files
    ("index_case_word", "index", "cli", lambda d: indexed(d, [GOOD_ROW.replace("0,", "zero,", 1)])),
    ("index_not_utf8", "index", "cli",
     lambda d: indexed(d, raw=(EDIT_COLUMNS + "\n0,a caf\xe9,x,y,,,.5,.6,.6,0,Replacement\n").encode("latin-1"))),
    ("index_field_too_large", "index", "cli",
     lambda d: indexed(d, raw=(EDIT_COLUMNS + "\n0,\"" + "a" * 200_000 + "\"\n").encode())),
    ("index_literal_malformed", "index", "cli", lambda d: indexed(d, [GOOD_ROW.replace(",,,", ",,\"{'words': [\",")])),
    ("index_empty_prompt", "index", "cli", lambda d: indexed(d, [GOOD_ROW.replace(SOURCE, " ")])),
    ("index_empty_target", "index", "cli", lambda d: indexed(d, [GOOD_ROW.replace(TARGET, "")])),
    ("index_missing_cells", "index", "cli", lambda d: indexed(d, [f"0,{SOURCE},images/photo.png"])),
    ("index_tau_word", "index", "cli", lambda d: indexed(d, [GOOD_ROW.replace("0.5,", "half,", 1)])),
    ("index_tau_out_of_range", "index", "cli", lambda d: indexed(d, [GOOD_ROW.replace("0.5,", "5,", 1)])),
    ("index_blend_number", "index", "cli", lambda d: indexed(d, [GOOD_ROW.replace(",,,", ",7,,", 1)])),
    ("index_missing_column", "index", "cli",
     lambda d: indexed(d, raw=b"case_number,prompt\n0,a photo of a cat\n")),
    ("index_case_not_there", "index", "cli", lambda d: indexed(d, None, None, "--idx", "99")),
    # --- PIE-Bench mapping files and runner flags
    ("pie_entry_string", "pie", "bench", lambda d: pie_args(d, mapping_file(d, {"000": "just a string"}))),
    ("pie_entry_list", "pie", "bench", lambda d: pie_args(d, mapping_file(d, {"000": [1, 2]}))),
    ("pie_mapping_list", "pie", "bench", lambda d: pie_args(d, mapping_file(d, raw=b"[1, 2]"))),
    ("pie_missing_image_path", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(image_path=KeyError)))),
    ("pie_image_path_number", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(image_path=5)))),
    ("pie_empty_prompt", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(original_prompt="  ")))),
    ("pie_brackets_only_prompt", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(editing_prompt="[ ]")))),
    ("pie_blended_word_list", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(blended_word=["a"])))),
    ("pie_rle_odd", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(mask=[0, 10, 20])))),
    ("pie_rle_negative", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(mask=[-5, 10])))),
    ("pie_rle_word", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(mask=[0, "ten"])))),
    ("pie_rle_overflow", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(mask=[2**70, 2**70])))),
    ("pie_rle_float", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(mask=[0.5, 10])))),
    ("pie_rle_object", "pie", "bench", lambda d: pie_args(d, mapping_file(d, entry(mask={"counts": "x"})))),
    ("pie_rle_python", "pie", "python", lambda d: pie.decode_rle([2**63 + 5, 3])),
    ("pie_json_invalid", "pie", "bench", lambda d: pie_args(d, mapping_file(d, raw=b"{\"000\": "))),
    ("pie_json_not_utf8", "pie", "bench", lambda d: pie_args(d, mapping_file(d, raw=b"{\"\xff\xfe\": 1}"))),
    ("pie_json_deep", "pie", "bench", lambda d: pie_args(d, mapping_file(d, raw=b"[" * 200_000 + b"]" * 200_000))),
    ("pie_limit_negative", "pie", "bench", lambda d: pie_args(d, None, "--limit", "-1")),
    ("pie_limit_zero", "pie", "bench", lambda d: pie_args(d, None, "--limit", "0")),
    ("pie_limit_python", "pie", "python",
     lambda d: pie.load_mapping(mapping_file(d, entry()), WORLD.pie_images, limit=-1)),
    ("pie_tau_c_out_of_range", "pie", "bench", lambda d: pie_args(d, None, "--tau_c", "1.5")),
    ("pie_tau_u_negative", "pie", "bench", lambda d: pie_args(d, None, "--tau_u", "-0.2")),
    ("pie_guidance_nan", "pie", "bench", lambda d: pie_args(d, None, "--guidance_scale", "nan")),
    ("pie_option_typo", "pie", "bench", lambda d: pie_args(d, None, "--method_option", "embeding=key")),
    ("pie_outdir_is_file", "pie", "bench",
     lambda d: [a if a != str(d / "out") else str(WORLD.photo) for a in pie_args(d)]),
    # --- reproduce and the bench entry point
    ("reproduce_tau_s", "runner", "bench", lambda d: reproduce_args(d, "--tau_s", "3")),
    ("reproduce_idx_words", "runner", "bench", lambda d: reproduce_args(d, "--idx", "a,b")),
    ("reproduce_idx_missing", "runner", "bench", lambda d: reproduce_args(d, "--idx", "99")),
    ("reproduce_bad_index", "runner", "bench",
     lambda d: [*reproduce_args(d), "--data_dir", str(write_index(d / "data", [], raw=b"\xff\xfe\x00bad"))]),
    ("reproduce_steps_zero", "runner", "bench", lambda d: reproduce_args(d, "--num_ddim_steps", "0")),
    ("bench_unknown_command", "runner", "bench", lambda d: ["piee", "--outdir", str(d / "out")]),
    ("bench_report_no_results", "runner", "bench", lambda d: ["report", str(d)]),
    # --- the Python API raises the same UserError
    ("api_blank_prompt", "api", "python", lambda d: api_editor().invert(WORLD.photo, "   ", method="ddim")),
    ("api_bomb_image", "api", "python", lambda d: api_editor().invert(WORLD.bomb, SOURCE, method="ddim")),
    ("api_option_typo", "api", "python",
     lambda d: api_editor().invert(WORLD.photo, SOURCE, method="ddim", num_inference_steps=2, ddim_bogus=1)),
    ("api_load_nan_inversion", "api", "python",
     lambda d: __import__("stylediffusion").Inversion.load(
         damaged_checkpoint(d, tensors=lambda t: t.update(z_T=t["z_T"] * float("nan"))))),
    # --- file-system faults found before any work
    ("outdir_is_file", "disk", "cli", lambda d: direct(d, "--outdir", str(WORLD.photo))),
    ("outdir_under_file", "disk", "cli", lambda d: direct(d, "--outdir", str(WORLD.photo / "sub"))),
    ("checkpoint_is_folder", "disk", "cli", lambda d: direct(d, "--checkpoint", str(WORLD.root / "data"))),
    ("checkpoint_dir_is_file", "disk", "cli", lambda d: direct(d, "--checkpoint_dir", str(WORLD.victim))),
]


def api_editor():
    from stylediffusion import StyleDiffusionEditor

    return StyleDiffusionEditor(WORLD.tiny, progress=False)


def listing(root: Path, skip: list[Path]) -> dict:
    """Every file under ``root`` (outside ``skip``) with its size and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def assert_one_error_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case_id,kind,runner,build", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, kind, runner, build, world, tiny, tmp_path, capsys, monkeypatch):
    patch_tiny(monkeypatch, tiny)
    d = world.root / "runs" / case_id
    d.mkdir(parents=True)
    monkeypatch.chdir(d)
    own = [d / "out", d / "ck"]
    if runner == "python":
        skip = [d]  # the case's folder holds the files it makes to fail with
        before = listing(world.root, skip)
        with pytest.raises(UserError) as info:
            build(d)
        assert "\n" not in str(info.value)
    else:
        argv = build(d)
        skip = own
        before = listing(world.root, skip)
        main = cli_main if runner == "cli" else bench_main
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse
            code = stop.code
        captured = capsys.readouterr()
        assert code == 2, captured.err[-3000:]
        assert_one_error_line(captured.err)
    assert listing(world.root, skip) == before
    for folder in own:  # nothing half-written in the run's own folders either
        assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))


def test_case_table_covers_every_class():
    counts = {}
    for _, kind, _, _ in CASES:
        counts[kind] = counts.get(kind, 0) + 1
    print("bad-input cases per class:", counts, "total", len(CASES))
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert set(counts) >= {"escape", "pickle", "checkpoint", "prompt", "literal", "number", "option", "image",
                           "index", "pie", "runner", "api", "disk"}


# ----------------------------------------------------------------------------- faults while writing
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_checkpoint_keeps_last_partial(world, tiny, tmp_path, capsys, monkeypatch):
    """The final checkpoint cannot be written: one line, exit 2, no temporary file, the partial kept."""
    import stylediffusion.checkpoint as ckpt_module

    patch_tiny(monkeypatch, tiny)
    real_save = ckpt_module.save_file
    calls = []

    def save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 1:  # the partial after step 1 of 2 is written; the final file is not
            return real_save(tensors, path, metadata=metadata)
        Path(path).write_bytes(b"half")  # what a full disk leaves: part of a file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(ckpt_module, "save_file", save)
    ck = tmp_path / "ck"
    code = cli_main([*FAST, "--is_train", "True", "--image_path", str(world.photo), "--prompt", SOURCE,
                     "--checkpoint_dir", str(ck)])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_error_line(err)
    assert "disk is full" in err
    names = sorted(p.name for p in ck.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    assert [n for n in names if n.endswith(".partial.safetensors")], names  # the last good partial
    assert not [n for n in names if n.endswith(".safetensors") and ".partial." not in n], names


def test_disk_full_while_saving_image(world, tiny, tmp_path, capsys, monkeypatch):
    patch_tiny(monkeypatch, tiny)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if not isinstance(fp, (str, os.PathLike)):  # in-memory buffers are not the disk
            return real_save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code = cli_main(direct(tmp_path, "--inversion", "ddim", "--outdir", str(out)))
    err = capsys.readouterr().err
    assert code == 2
    assert_one_error_line(err)
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


@pytest.fixture
def mounted(tmp_path):
    """A small tmpfs (root only): yields a mount function; everything is unmounted afterwards."""
    mounts = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
        mounts.append(point)
        return point
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], capture_output=True, check=False)


def test_real_disk_full_and_read_only_folder(world, tiny, tmp_path, capsys, monkeypatch, mounted):
    patch_tiny(monkeypatch, tiny)
    full = mounted("full", "size=12k")
    code = cli_main([*FAST, "--is_train", "True", "--image_path", str(world.photo), "--prompt", SOURCE,
                     "--checkpoint_dir", str(full)])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_error_line(err)
    assert not [p.name for p in full.iterdir() if p.name.endswith(".tmp")]
    read_only = mounted("ro", "ro,size=64k")
    code = cli_main(direct(tmp_path, "--outdir", str(read_only / "out")))
    err = capsys.readouterr().err
    assert code == 2
    assert_one_error_line(err)
    assert "read-only" in err


# ----------------------------------------------------------------------------- what used to go silently wrong
def test_corrupt_partial_does_not_block_training(world, tiny, tmp_path, capsys, monkeypatch):
    """A damaged partial inversion is set aside with a note and training starts again (it used to
    stop every run until deleted by hand)."""
    patch_tiny(monkeypatch, tiny)
    ck = tmp_path / "inv.safetensors"
    partial = tmp_path / "inv.partial.safetensors"
    partial.write_bytes(b"\x00" * 100)
    code = cli_main([*FAST, "--is_train", "True", "--image_path", str(world.photo), "--prompt", SOURCE,
                     "--checkpoint", str(ck)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"ignoring {partial}" in captured.out and "training from the first step" in captured.out
    assert ck.is_file() and not partial.exists()


def test_exif_orientation_and_16_bit_images(tmp_path):
    from stylediffusion.image_io import load_image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, as stored
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    pixels, notes = load_image(tmp_path / "phone.jpg", 20)
    assert any("EXIF orientation" in n for n in notes)
    red = pixels[0, 0] > 0.5  # shown upright: the red half is on top (20 wide, 40 tall, centre-cropped)
    top, bottom = red[:10].float().mean(), red[10:].float().mean()
    assert top > 0.9 and bottom < 0.1, (top, bottom)
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels, notes = load_image(tmp_path / "deep.png", 32)
    assert any("8 bits" in n for n in notes)
    values = (pixels[0, 0] + 1) * 127.5
    assert float(values.min()) < 2 and float(values.max()) > 253 and 100 < float(values.mean()) < 155


def test_pie_mask_checked_before_any_image_is_written(world, tmp_path, capsys):
    bad = {"000": GOOD_ENTRY, "001": dict(GOOD_ENTRY, mask=[1, 2, 3])}
    code = bench_main(pie_args(tmp_path, mapping_file(tmp_path, bad)))
    assert code == 2 and "mapping entry '001'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the real command lines
def _spawn(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_subprocess_one_line_and_ctrl_c_during_start_up(world, tmp_path):
    """Real processes, run side by side: stderr holds the error line and nothing else (no library
    progress bar or warning, also once the model has loaded); Ctrl-C while the libraries load is one
    line and exit 130. (Three processes: each pays torch's import time.)"""
    before = listing(world.root, [])
    cases = {
        "model_loaded": ["edit_w_ptp_v_clip.py", *direct(tmp_path / "c", "--num_ddim_steps", "5000")],
        "bench": ["-m", "stylediffusion.bench", *pie_args(tmp_path, mapping_file(tmp_path, entry(mask=[0, 1, 2])))],
        "interrupted": ["-m", "stylediffusion", *direct(tmp_path / "d")],
    }
    procs = {name: _spawn(args, ROOT if args[0].endswith(".py") else tmp_path) for name, args in cases.items()}
    # interrupt while torch is being loaded (its library mapped into the process): start-up proper
    maps = Path(f"/proc/{procs['interrupted'].pid}/maps")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and procs["interrupted"].poll() is None:
        if not maps.exists() or "libtorch" in maps.read_text(errors="replace"):
            break
        time.sleep(0.05)
    procs["interrupted"].send_signal(signal.SIGINT)
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err)
    for name in ("model_loaded", "bench"):
        code, _, err = results[name]
        assert code == 2, (name, err[-2000:])
        assert_one_error_line(err)
    code, _, err = results["interrupted"]
    assert code == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err[-2000:]
    assert listing(world.root, []) == before
    assert not (tmp_path / "d" / "out").exists() and not (tmp_path / "d" / "ck").exists()
