"""The one inversion file format (``Inversion.save`` / ``load``) across its writers and readers: the
command line's file loads with ``Inversion.load`` and edits through the API, the API's file is used by
the command line, a partial written by one process resumes in another, and files of the earlier
layouts are refused with one line that says to train again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stylediffusion.models as models_module
import stylediffusion.results as results_module
from stylediffusion import Inversion, StyleDiffusionEditor
from stylediffusion.checkpoint import read_checkpoint, save_checkpoint
from stylediffusion.cli import main as cli_main
from stylediffusion.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
FAST = ["--model", "tiny", "--num_ddim_steps", "2", "--num_inner_steps", "1", "--progress", "False", "--device", "cpu"]


@pytest.fixture
def cli(tiny, monkeypatch, capsys):
    """The command line in this process on the session's tiny model: (exit code, stdout, stderr)."""
    real = models_module.load_models
    monkeypatch.setattr(models_module, "load_models",
                        lambda model, *a, **k: tiny if model == "tiny" else real(model, *a, **k))

    def run(*argv):
        code = cli_main([*FAST, *map(str, argv)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.fixture(scope="module")
def photo(noise_photo):
    return noise_photo


@pytest.fixture(scope="module")
def editor(tiny):
    return StyleDiffusionEditor(tiny, progress=False)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_cli_file_loads_with_inversion_load_and_edits_through_the_api(cli, editor, photo, tmp_path):
    path = tmp_path / "cli.safetensors"
    code, out, err = cli("--is_train", "True", "--image_path", photo, "--prompt", SOURCE, "--checkpoint", path)
    assert code == 0, err
    loaded = Inversion.load(path)
    assert loaded.method == "stylediffusion" and loaded.source == SOURCE and loaded.num_steps == 2
    assert torch.equal(loaded.image, editor._pixels(photo))  # the file holds the image it was trained for
    assert len(loaded.mappers) == 2 and loaded.metadata["trained_steps"] == 2
    # the same file through the method's checkpoint (as the command line reads it) gives the same edit
    through_checkpoint = editor.invert(photo, SOURCE, num_inference_steps=2, num_inner_steps=1, checkpoint=path)
    a = editor.edit(loaded, TARGET)
    b = editor.edit(through_checkpoint, TARGET)
    assert torch.equal(a.latents[0], b.latents[0])


@pytest.mark.parametrize("method,option", [("stylediffusion", []), ("nulltext", ["nulltext_iterations=1"])])
def test_api_file_is_used_by_the_cli(cli, editor, photo, tmp_path, method, option):
    options = dict(o.split("=") for o in option)
    inv = editor.invert(photo, SOURCE, method=method, num_inference_steps=2, num_inner_steps=1,
                        **{k: int(v) for k, v in options.items()})
    path = inv.save(tmp_path / "api.safetensors")
    before = path.read_bytes()
    extra = [a for o in option for a in ("--method_option", o)]
    code, out, err = cli("--image_path", photo, "--prompt", SOURCE, "--target", TARGET, "--inversion", method,
                         "--checkpoint", path, "--outdir", tmp_path / "out", *extra)
    assert code == 0, err
    assert "training" not in out and path.read_bytes() == before  # used, not trained again
    edited = np.asarray(Image.open(tmp_path / "out" / "edited.png"))
    assert np.array_equal(edited, np.asarray(editor.edit(inv, TARGET).images[0]))


def test_partial_written_by_one_process_resumes_in_another(editor, photo, tmp_path, monkeypatch):
    path = tmp_path / "inv.safetensors"
    partial = tmp_path / "inv.partial.safetensors"
    real_save = results_module.save_checkpoint

    def interrupted_after_first_step(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(results_module, "save_checkpoint", interrupted_after_first_step)
    with pytest.raises(KeyboardInterrupt):
        editor.invert(photo, SOURCE, num_inference_steps=3, num_inner_steps=1, checkpoint=path)
    monkeypatch.setattr(results_module, "save_checkpoint", real_save)
    assert partial.is_file() and not path.exists()
    _, meta = read_checkpoint(partial)
    assert meta["layout"] == results_module.LAYOUT and meta["complete"] is False and meta["trained_steps"] == 1
    with pytest.raises(UserError, match="unfinished inversion") as info:
        Inversion.load(partial)
    assert "\n" not in str(info.value)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "edit_w_ptp_v_clip.py"), *FAST, "--num_ddim_steps", "3",
                           "--is_train", "True", "--image_path", str(photo), "--prompt", SOURCE, "--checkpoint",
                           str(path)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resuming training from" in done.stdout and "1/3" in done.stdout, done.stdout
    assert path.is_file() and not partial.exists()
    full = editor.invert(photo, SOURCE, num_inference_steps=3, num_inner_steps=1)
    resumed = Inversion.load(path)
    for a, b in zip(full.mappers.state_dict().values(), resumed.mappers.state_dict().values()):
        assert torch.equal(a, b)


def old_files(folder: Path, editor, photo) -> dict[str, Path]:
    """Files as the earlier layouts wrote them: the command line's StyleDiffusion checkpoint (no layout),
    ``checkpointed``'s Null-text file (no layout, a "method"), and ``Inversion.save``'s inversion-v1."""
    inv = editor.invert(photo, SOURCE, method="ddim", num_inference_steps=2)
    ident = {"model_identity_version": 2, "image_sha256": "0" * 64, "prompt": SOURCE, "num_ddim_steps": 2,
             "model_id": "tiny", "model_fingerprint": editor.bundle.fingerprint}
    files = {"cli": ({"z_T": inv.z_T}, {**ident, "trained_steps": 2, "variant": "modulate"}),
             "checkpointed": ({"z0": inv.z0, "z_T": inv.z_T}, {**ident, "method": "nulltext", "settings": {}}),
             "inversion-v1": ({"z0": inv.z0, "z_T": inv.z_T}, {"layout": "inversion-v1", "method": "ddim",
                                                                "prompt": SOURCE, "num_ddim_steps": 2})}
    return {name: save_checkpoint(folder / f"{name}.safetensors", tensors, meta)
            for name, (tensors, meta) in files.items()}


def test_old_format_files_are_refused_with_one_line(cli, editor, photo, tmp_path):
    for name, path in old_files(tmp_path, editor, photo).items():
        with pytest.raises(UserError, match="old file format") as info:
            Inversion.load(path)
        assert "\n" not in str(info.value) and "train it again" in str(info.value)
        method = "nulltext" if name == "checkpointed" else "stylediffusion"
        with pytest.raises(UserError, match="old file format"):
            editor.invert(photo, SOURCE, method=method, num_inference_steps=2, num_inner_steps=1, checkpoint=path)
        for mode in (["--target", TARGET, "--outdir", tmp_path / "out"], ["--is_train", "True"]):
            code, out, err = cli("--image_path", photo, "--prompt", SOURCE, "--checkpoint", path, *mode)
            assert code == 2 and "old file format" in one_error_line(err) and "--retrain" in err
    # the line's advice works: --retrain trains it again in the current format
    path = tmp_path / "cli.safetensors"
    code, out, err = cli("--is_train", "True", "--retrain", "--image_path", photo, "--prompt", SOURCE,
                         "--checkpoint", path)
    assert code == 0, err
    assert Inversion.load(path).source == SOURCE


def test_demo_inverts_again_over_an_old_cache_file(editor, tmp_path):
    from stylediffusion.app import DemoApp

    app = DemoApp(editor, tmp_path)
    key = "0123456789abcdef01234567"
    save_checkpoint(tmp_path / f"{key}.safetensors", {"z_T": torch.zeros(1, 4, 8, 8)},
                    {"layout": "inversion-v1", "method": "ddim"})
    for suffix in ("upload", "input", "reconstruction"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{key}.{suffix}.png")
    (tmp_path / f"{key}.demo.json").write_text(json.dumps({"prompt": SOURCE, "method": "ddim", "num_inference_steps": 2,
                                                           "num_inner_steps": 1, "psnr": 20.0, "seconds": 1.0}))
    assert app.cached(key) is None  # not a hit: the next Invert writes the current format over it
    editor.invert(np.zeros((8, 8, 3)), SOURCE, method="ddim", num_inference_steps=2).save(
        tmp_path / f"{key}.safetensors"
    )
    assert app.cached(key).cached  # the same entry in the current format is one
