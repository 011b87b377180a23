"""The command line: a train-then-edit run, and every bad input giving one line, exit 2, no files."""
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylediffusion.cli import build_parser, main, str2bool

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "tiny", "--num_ddim_steps", "3", "--num_inner_steps", "1", "--progress", "False"]


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    arr = (rng.random((80, 80, 3)) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(arr).save(path)
    return path


def run_cli(args, tmp_path, capsys):
    out, ck = tmp_path / "out", tmp_path / "ck"
    code = main(list(args) + ["--outdir", str(out), "--checkpoint_dir", str(ck)])
    captured = capsys.readouterr()
    return code, captured, out, ck


def assert_clean_failure(code, captured, out, ck, *needles):
    assert code == 2
    lines = [line for line in captured.err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() or not any(out.rglob("*"))
    assert not ck.exists() or not any(ck.rglob("*"))


def test_boolean_flags_are_words():
    assert str2bool("False") is False and str2bool("True") is True
    args = build_parser().parse_args(["--is_train", "False"])
    assert args.is_train is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--is_train", "maybe"])


def test_train_then_edit_on_tiny_model(tmp_path, capsys):
    start = time.perf_counter()
    code, captured, out, ck = run_cli(
        ["--model", "tiny", "--idx", "0", "--num_ddim_steps", "10", "--num_inner_steps", "5", "--progress", "False"],
        tmp_path, capsys)
    seconds = time.perf_counter() - start
    print(f"train-then-edit T=10 K=5 on tiny: {seconds:.1f}s")
    assert code == 0, captured.err
    assert "training it first" in captured.out and "untrained" in captured.out
    assert len(list(ck.glob("*.safetensors"))) == 1 and len(list(ck.glob("*.json"))) == 1
    for edit_dir in ("case0_edit0", "case0_edit1"):
        for name in ("edited.png", "reconstruction.png", "grid.png", "attention_maps.png", "edit.json"):
            assert (out / edit_dir / name).is_file(), name
    assert seconds < 60
    # second run: loads instead of training
    code, captured, _, _ = run_cli(["--model", "tiny", "--idx", "0", "--num_ddim_steps", "10", "--num_inner_steps", "5",
                                    "--progress", "False"], tmp_path, capsys)
    assert code == 0 and "training it first" not in captured.out and "inversion ready" in captured.out


def test_direct_mode_converts_and_says_so(tmp_path, capsys):
    gray = tmp_path / "gray.png"
    Image.fromarray((np.arange(60 * 90) % 255).reshape(60, 90).astype(np.uint8), mode="L").save(gray)
    code, captured, out, _ = run_cli(FAST + ["--image_path", str(gray), "--prompt", "a photo of a cat",
                                             "--target", "a photo of a dog"], tmp_path, capsys)
    assert code == 0, captured.err
    assert "converted to RGB" in captured.out and "centre-cropped" in captured.out
    assert captured.out.count("centre-cropped") == 1  # said once: by the editor that reads the image
    assert (out / "edited.png").is_file()
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(rgba)
    code, captured, _, _ = run_cli(FAST + ["--is_train", "True", "--image_path", str(rgba), "--prompt", "a red square"],
                                   tmp_path, capsys)
    assert code == 0 and "alpha" in captured.out


@pytest.mark.parametrize("extra,needles", [
    (["--image_path", "missing.png", "--prompt", "a cat", "--target", "a dog"], ["does not exist"]),
    (["--target", "a photo of a big dog", "--edit_type", "Replacement"], ["equal word counts"]),
    (["--target", "a photo of a dog", "--blend_word", "cat horse"], ["horse"]),
    (["--target", "a photo of a dog", "--eq_params", "{'words': ['zebra'], 'values': [2]}"], ["zebra"]),
    (["--target", "a photo of a dog", "--tau_c", "1.5"], ["tau_c", "[0, 1]"]),
    (["--target", "a photo of a dog", "--tau_u", "-0.1"], ["tau_u"]),
    (["--idx", "99"], ["--idx 99"]),
    (["--model", "nobody/no-such-model", "--is_train", "True"], ["cannot load", "--model"]),
    (["--inversion", "nosuch"], ["unknown --inversion"]),
])
def test_bad_input_is_one_line_and_exit_2(extra, needles, photo, tmp_path, capsys):
    args = list(FAST)
    if "--target" in extra and "--image_path" not in extra:
        args += ["--image_path", str(photo), "--prompt", "a photo of a cat"]
    if "--model" in extra:
        args = [a for a in args if a not in ("--model", "tiny")]
    assert_clean_failure(*run_cli(args + extra, tmp_path, capsys), *needles)


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    assert_clean_failure(*run_cli(FAST + ["--image_path", str(bad), "--prompt", "a cat", "--target", "a dog"],
                                  tmp_path, capsys), "cannot be read")


def test_checkpoint_for_another_prompt_or_corrupt(photo, tmp_path, capsys):
    ck_file = tmp_path / "inv.safetensors"
    base = FAST + ["--image_path", str(photo), "--checkpoint", str(ck_file)]
    code, captured, _, _ = run_cli(base + ["--is_train", "True", "--prompt", "a photo of a cat"], tmp_path, capsys)
    assert code == 0, captured.err
    code, captured, out, _ = run_cli(base + ["--prompt", "a photo of a bird", "--target", "a photo of a dog"],
                                     tmp_path, capsys)
    assert code == 2 and "different source prompt" in captured.err and not out.exists()
    ck_file.write_bytes(b"\x00" * 64)
    code, captured, out, _ = run_cli(base + ["--prompt", "a photo of a cat", "--target", "a photo of a dog"],
                                     tmp_path, capsys)
    assert code == 2 and ("corrupt" in captured.err or "metadata" in captured.err) and not out.exists()


def test_nan_loss_is_reported(photo, tmp_path, capsys):
    code, captured, out, ck = run_cli(FAST + ["--image_path", str(photo), "--prompt", "a cat", "--is_train", "True",
                                              "--num_inner_steps", "5", "--early_stop", "False", "--lr", "1e25"],
                                      tmp_path, capsys)
    assert code == 2 and "loss became" in captured.err
    assert not any(p.name.endswith(".safetensors") and "partial" not in p.name for p in ck.rglob("*"))


def test_list_methods(capsys):
    assert main(["--list_methods"]) == 0
    out = capsys.readouterr().out
    assert "stylediffusion" in out and "p2p" in out


def test_method_options_and_other_inversions_from_the_cli(photo, tmp_path, capsys):
    from stylediffusion.cli import method_options
    from stylediffusion.errors import UserError

    assert method_options(["sdedit_strength=0.6", "embedding=key_value", "flag=True"]) == {
        "sdedit_strength": 0.6, "embedding": "key_value", "flag": True}
    with pytest.raises(UserError):
        method_options(["no-equals-sign"])
    base = FAST + ["--image_path", str(photo), "--prompt", "a photo of a cat", "--target", "a photo of a dog"]
    code, captured, out, ck = run_cli(base + ["--inversion", "directinv"], tmp_path, capsys)
    assert code == 0, captured.err
    assert [p.name for p in ck.glob("*.safetensors")] == ["photo_tiny-seed-0_T3_directinv.safetensors"]
    assert (out / "edited.png").is_file()
    code, captured, out, ck = run_cli(base + ["--inversion", "ddim", "--edit", "sdedit",
                                              "--method_option", "sdedit_strength=0.6"], tmp_path, capsys)
    assert code == 0, captured.err


def test_generated_image_editing_needs_no_image(tmp_path, capsys):
    code, captured, out, _ = run_cli(
        FAST
        + [
            "--inversion",
            "generated",
            "--edit",
            "fpe",
            "--prompt",
            "a photo of a cat",
            "--target",
            "a photo of a dog",
            "--method_option",
            "generated_seed=3",
        ],
        tmp_path,
        capsys,
    )
    assert code == 0, captured.err
    assert (out / "grid.png").is_file() and (out / "edited.png").is_file()


def test_dtype_auto_and_float16_training(photo, tmp_path, capsys):
    """auto: bfloat16 on CUDA, float32 on the CPU; float16 trains (loss-scaled) and edits from the CLI."""
    import json

    import torch

    from stylediffusion.models import resolve_dtype

    assert build_parser().parse_args([]).dtype == "auto"
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    code, captured, out, _ = run_cli(FAST + ["--image_path", str(photo), "--prompt", "a photo of a cat",
                                             "--target", "a photo of a dog"], tmp_path, capsys)
    assert code == 0, captured.err
    assert json.loads((out / "edit.json").read_text())["dtype"] == "float32"
    code, captured, out, _ = run_cli(
        FAST
        + [
            "--dtype",
            "float16",
            "--image_path",
            str(photo),
            "--prompt",
            "a photo of a cat",
            "--target",
            "a photo of a dog",
        ],
        tmp_path / "half",
        capsys,
    )
    assert code == 0, captured.err
    assert json.loads((out / "edit.json").read_text())["dtype"] == "float16"
