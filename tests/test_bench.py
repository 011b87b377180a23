"""Benchmark runners: PIE-Bench mapping parsing, RLE masks, resumable runs, accelerate sharding, reports."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from stylediffusion.bench import pie, reproduce, sharding
from stylediffusion.bench.__main__ import main as bench_main
from stylediffusion.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TOK_DIR = ROOT / "stylediffusion" / "assets" / "clip_tokenizer"
FAST = ["--model", "tiny", "--num_ddim_steps", "3", "--num_inner_steps", "2", "--device", "cpu"]

# id -> (editing_type_id, original prompt, editing prompt, blended word, mask rectangle rows/cols of 512)
ENTRIES = {
    "000000000000": (
        "0",
        "a cat sitting on the grass",
        "a [dog] sitting on the grass",
        "cat dog",
        (100, 300, 150, 400),
    ),
    "000000000001": ("1", "a red car on a road", "a [blue] car on a road", "car car", (200, 400, 50, 250)),
    "111000000000": ("2", "a cup on a table", "a cup [of coffee] on a table", "", (0, 256, 0, 512)),
    "900000000000": ("9", "a photo of a house", "a [watercolor painting] of a house", "", (0, 512, 0, 512)),
}


def rect_rle(r0, r1, c0, c1, width=512):
    """Hand-written row-major RLE of a rectangle: one (start, length) run per row."""
    out = []
    for r in range(r0, r1):
        out += [r * width + c0, c1 - c0]
    return out


def make_pie(root: Path) -> tuple[Path, Path]:
    images = root / "annotation_images"
    mapping = {}
    rng = np.random.default_rng(0)
    for n, (key, (et, src, tgt, blend, rect)) in enumerate(ENTRIES.items()):
        rel = f"{pie.EDIT_TYPE_DIRS[et]}_x/{key}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        arr = (rng.random((64, 64, 3)) * 80 + 40 * n).astype(np.uint8)
        Image.fromarray(arr).save(images / rel)
        mapping[key] = {"image_path": rel, "original_prompt": src, "editing_prompt": tgt,
                        "editing_instruction": "edit it", "editing_type_id": et, "blended_word": blend,
                        "mask": rect_rle(*rect)}
    path = root / "mapping_file.json"
    path.write_text(json.dumps(mapping))
    return path, images


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Tiny random CLIP and DINO-shaped ViT saved as local folders (what --clip_model/--dino_model take)."""
    import transformers

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    transformers.CLIPTokenizer(str(TOK_DIR / "vocab.json"), str(TOK_DIR / "merges.txt")).save_pretrained(root / "clip")
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=2, image_size=32, patch_size=8),
                                add_pooling_layer=False)
    vit.save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def pie_data(tmp_path_factory):
    return make_pie(tmp_path_factory.mktemp("pie"))


def pie_args(pie_data, backbones, outdir):
    mapping, images = pie_data
    return ["--mapping_file", str(mapping), "--images", str(images), "--outdir", str(outdir), *FAST,
            "--clip_model", str(backbones[0]), "--dino_model", str(backbones[1])]


@pytest.fixture(scope="module")
def single_run(pie_data, backbones, tmp_path_factory):
    out = tmp_path_factory.mktemp("pie_out")
    stats = pie.main(pie_args(pie_data, backbones, out))
    return out, stats


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in pie.TIMING_COLUMNS} for r in rows]


# ----------------------------------------------------------------------------- parsing
def test_strip_brackets():
    assert pie.strip_brackets("a [cat] sitting") == "a cat sitting"
    assert pie.strip_brackets("a cup [of coffee] on a table") == "a cup of coffee on a table"
    assert pie.strip_brackets("[a]  photo [ of ] it") == "a photo of it"
    assert pie.strip_brackets("no brackets") == "no brackets"


def test_rle_decoding_against_hand_made_mask():
    # 4x6 image; runs (1, 2) and (8, 3) in row-major order: row 0 cols 1-2, row 1 cols 2-4
    expected = np.zeros((4, 6), np.uint8)
    expected[0, 1:3] = 1
    expected[1, 2:5] = 1
    got = pie.decode_rle([1, 2, 8, 3], (4, 6), border=False)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    # PIE-Bench's decoder also marks the 1-pixel border as edit region
    with_border = pie.decode_rle([1, 2, 8, 3], (4, 6), border=True)
    assert with_border[0].all() and with_border[-1].all() and with_border[:, 0].all() and with_border[:, -1].all()
    assert np.array_equal(with_border[1:-1, 1:-1], expected[1:-1, 1:-1])
    # a run past the end is clipped; the rectangle helper matches the decoder at 512x512
    assert pie.decode_rle([22, 100], (4, 6), border=False).reshape(-1)[22:].all()
    rect = pie.decode_rle(rect_rle(100, 300, 150, 400), border=False)
    assert rect[100:300, 150:400].all() and rect.sum() == 200 * 250
    # encode is decode's inverse
    m = (np.random.default_rng(1).random((16, 16)) > 0.6).astype(np.uint8)
    assert np.array_equal(pie.decode_rle(pie.encode_rle(m), (16, 16), border=False), m)
    with pytest.raises(UserError, match="odd"):
        pie.decode_rle([1, 2, 3], (4, 6))


def test_load_mapping_specs_and_errors(pie_data, tmp_path):
    mapping, images = pie_data
    entries = pie.load_mapping(mapping, images)
    assert [e.id for e in entries] == sorted(ENTRIES)
    assert entries[0].target == "a dog sitting on the grass" and entries[0].blended_word == ("cat", "dog")
    assert entries[2].blended_word is None
    assert [e.id for e in pie.load_mapping(mapping, images, limit=2)] == sorted(ENTRIES)[:2]
    assert [e.id for e in pie.load_mapping(mapping, images, editing_types=["9"])] == ["900000000000"]
    args = SimpleNamespace(guidance_scale=7.5, tau_u=0.5)
    specs = [pie.edit_spec(e, args) for e in entries]
    assert [s.edit_type for s in specs] == ["Replacement", "Replacement", "Refinement", "Refinement"]
    assert specs[0].blend_words == ("cat", "dog") and specs[0].tau_u == 0.5 and specs[0].tau_c == 0.6
    with pytest.raises(UserError, match="missing"):
        pie.load_mapping(mapping, tmp_path)


# ----------------------------------------------------------------------------- crash-safe files
def test_rowlog_drops_torn_row_and_merge_sorts_and_dedups(tmp_path):
    cols = ["id", "method", "v"]
    part = sharding.part_path(tmp_path / "parts", "results", 1)
    log = sharding.RowLog(part, cols)
    log.append({"id": "b", "method": "m", "v": "1"})
    with part.open("a") as f:
        f.write("c,m,2")  # a process killed mid-write: no newline
    assert [r["id"] for r in sharding.read_rows(part)] == ["b"]
    sharding.RowLog(part, cols).append({"id": "a", "method": "m", "v": "3,4"})  # reopening cuts the torn row
    assert part.read_text().count("\n") == 3
    final = tmp_path / "results.csv"
    sharding.write_csv_atomic(final, [{"id": "b", "method": "m", "v": "old"}], cols)
    rows = sharding.merge_parts(final, tmp_path / "parts", "results", cols, key=lambda r: (r["id"], r["method"]))
    assert [(r["id"], r["v"]) for r in rows] == [("a", "3,4"), ("b", "old")]
    assert not (tmp_path / "parts").exists() and read_csv(final) == rows
    assert sharding.Shard(1, 3).take(list(range(8))) == [1, 4, 7]


# ----------------------------------------------------------------------------- end to end
def test_pie_run_outputs_and_resume(single_run, pie_data, backbones):
    out, stats = single_run
    assert stats == {"processed": 4, "skipped": 0, "rank": 0, "world": 1}
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(pie.RESULT_COLUMNS)
    assert [r["id"] for r in rows] == sorted(ENTRIES)
    assert [r["edit_type"] for r in rows] == ["Replacement", "Replacement", "Refinement", "Refinement"]
    for r in rows:
        assert r["method"] == "stylediffusion+p2p"
        for k in ("structure_distance", "clip_whole", "clip_edited"):
            float(r[k])  # computed (tiny backbones)
        if r["id"] == "900000000000":  # the mask covers everything: PIE-Bench scores no background
            assert r["psnr"] == r["mse"] == r["ssim"] == "n/a" and "covers the whole image" in r["note"]
        else:
            assert float(r["psnr"]) > 0 and 0 < float(r["mse"]) < 1 and float(r["ssim"]) <= 1
        assert r["lpips"] == "n/a" or float(r["lpips"]) >= 0  # n/a without torchvision
        et = ENTRIES[r["id"]][0]
        assert (out / "stylediffusion+p2p" / pie.EDIT_TYPE_DIRS[et] / f"{r['id']}.png").is_file()
    md = (out / "summary.md").read_text()
    assert "Structure ×10³" in md and "| stylediffusion+p2p | 4 |" in md and "Edit type 9" in md
    summary = read_csv(out / "summary.csv")
    assert [(s["editing_type"], s["n"]) for s in summary] == [("0", "1"), ("1", "1"), ("2", "1"), ("9", "1"),
                                                              ("all", "4")]
    assert (out / "metrics_boxplots.png").stat().st_size > 0
    # resume: a second run does no new work and leaves everything as it was
    before = (out / "results.csv").read_text()
    img = out / "stylediffusion+p2p" / "0_random" / "000000000000.png"
    mtime = img.stat().st_mtime_ns
    again = pie.main(pie_args(pie_data, backbones, out))
    assert again["processed"] == 0 and again["skipped"] == 4
    assert (out / "results.csv").read_text() == before and img.stat().st_mtime_ns == mtime
    assert bench_main(["report", str(out)]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run_matches_single_process(single_run, pie_data, backbones, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU: 2 gloo processes, 2 items each."""
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "stylediffusion.bench", "pie",
           *pie_args(pie_data, backbones, out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "[rank 0/2]" in log and "[rank 1/2]" in log and "2 of the 4 remaining" in log
    single = read_csv(single_run[0] / "results.csv")
    assert without_timing(read_csv(out / "results.csv")) == without_timing(single)
    assert not (out / "parts").exists()
    assert sorted(p.name for p in (out / "stylediffusion+p2p").rglob("*.png")) == sorted(f"{k}.png" for k in ENTRIES)


def test_reproduce_grids_contact_sheet_and_resume(tmp_path):
    args = ["--idx", "1", "--outdir", str(tmp_path), "--model", "tiny", "--num_ddim_steps", "2",
            "--num_inner_steps", "1", "--device", "cpu", "--inversion", "ddim"]
    stats = reproduce.main(args)
    assert stats["processed"] == 2
    rows = read_csv(tmp_path / "reproduce.csv")
    assert [(r["case"], r["k"], r["edit_type"]) for r in rows] == [("1", "0", "Replacement"), ("1", "1", "Refinement")]
    for r in rows:
        grid = Image.open(tmp_path / r["grid"])
        assert grid.width > 3 * reproduce.MIN_CELL
    sheet = Image.open(tmp_path / "ddim+p2p" / "contact_sheet.png")
    assert sheet.height > 2 * reproduce.MIN_CELL
    assert reproduce.main(args)["processed"] == 0
    with pytest.raises(UserError, match="--idx 99"):
        reproduce.main(["--idx", "99", *args[2:]])


def test_interrupted_run_keeps_finished_rows_and_resumes(single_run, pie_data, backbones, tmp_path, monkeypatch):
    from stylediffusion.api import StyleDiffusionEditor

    real, calls = StyleDiffusionEditor.edit, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(StyleDiffusionEditor, "edit", interrupted)  # the runner edits through the API
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        pie.main(pie_args(pie_data, backbones, out))
    part = sharding.part_path(out / "parts", "results", 0)
    assert [r["id"] for r in sharding.read_rows(part)] == sorted(ENTRIES)[:2]
    assert not list(out.rglob(f"{sorted(ENTRIES)[2]}.png"))  # nothing of the image in progress
    monkeypatch.setattr(StyleDiffusionEditor, "edit", real)
    stats = pie.main(pie_args(pie_data, backbones, out))
    assert stats["processed"] == 2 and stats["skipped"] == 2
    assert without_timing(read_csv(out / "results.csv")) == without_timing(read_csv(single_run[0] / "results.csv"))


def test_method_options_parse_literals():
    from stylediffusion.bench import options

    args = SimpleNamespace(variant="modulate", method_option=["nulltext_iterations=5", "embedding=key", "x= 0.5"])
    assert options.method_options(args) == {"variant": "modulate", "nulltext_iterations": 5, "embedding": "key",
                                            "x": 0.5}
    with pytest.raises(UserError, match="KEY=VALUE"):
        options.method_options(SimpleNamespace(variant="modulate", method_option=["oops"]))
