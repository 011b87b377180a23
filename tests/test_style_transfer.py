"""Style transfer (the paper's §5.2.7): layers chosen by resolution, the injection's effect and clean-up, the
four surfaces' bad input as one line, and a real model folder run end to end across two processes."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import layouts
import numpy as np
import pytest
import torch
from PIL import Image

from stylediffusion import StyleDiffusionEditor
from stylediffusion.cli import main
from stylediffusion.errors import UserError
from stylediffusion.methods.attention_edits import (
    pnp_attention_layers,
    pnp_feature_module,
    transformer_layers,
)
from stylediffusion.style_transfer import (
    TransferOutput,
    attention_layers,
    decoder_downscales,
    feature_modules,
    transfer_options,
)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}
STYLE, CONTENT = ROOT / "data/images/testbed_red_triangle.png", ROOT / "data/images/testbed_yellow_circle.png"


@pytest.fixture(scope="module")
def editor(tiny):
    return StyleDiffusionEditor(tiny, progress=False)


@pytest.fixture(scope="module")
def style_inversion(editor):
    return editor.invert(STYLE, "a red triangle on a black background", num_inference_steps=3, num_inner_steps=1)


def test_layers_are_chosen_by_resolution_and_default_to_pnp(tiny):
    unet = tiny.unet
    assert decoder_downscales(unet) == [8, 4, 2, 1]  # SD1's decoder at a 64 latent: 8x8, 16x16, 32x32, 64x64
    assert feature_modules(unet, 4) == [pnp_feature_module(unet)]  # up_blocks[1].resnets[1], before the skip
    # PnP (pnp_utils.py) injects the ResNet's residual, conv2's output, not the block's output after the skip
    assert pnp_feature_module(unet) is unet.up_blocks[1].resnets[1].conv2
    assert attention_layers(unet, 4) == pnp_attention_layers(unet)
    assert attention_layers(unet, 8, "all") == {idx for idx, _ in transformer_layers(unet)}
    finer = [idx for idx, name in transformer_layers(unet) if name.startswith(("up_blocks.2.", "up_blocks.3."))]
    assert attention_layers(unet, 2) == set(finer[1:])  # latent/2 and finer, the first of them left out
    assert len(feature_modules(unet, 2, "finer")) == sum(len(b.resnets) for b in unet.up_blocks[2:])
    with pytest.raises(UserError, match="latent/8, latent/4, latent/2, latent/1"):
        feature_modules(unet, 16)


def test_transfer_output_injection_and_clean_up(editor, style_inversion):
    unet = editor.bundle.unet
    hooks_before = sum(len(m._forward_hooks) for m in unet.modules())
    content = Image.open(CONTENT)
    out = editor.transfer_style(style_inversion, content)
    side = editor.bundle.image_size
    assert isinstance(out, TransferOutput) and out.images[0].size == out.style_image.size == (side, side)
    assert out.grid().width > 3 * side and out.options == transfer_options({})
    assert sum(len(m._forward_hooks) for m in unet.modules()) == hooks_before  # the hooks went with the call
    assert unet._stylediffusion_state.controller is None
    # the content's features reach the transfer: with no injection the same call gives another picture
    off = editor.transfer_style(style_inversion, content, transfer_feature_fraction=0.0,
                                transfer_attention_fraction=0.0)
    assert not torch.equal(out.latents[0][1], off.latents[0][1])
    assert torch.equal(out.latents[0][0], off.latents[0][0])  # the content row follows its own trajectory


def test_api_bad_input_is_one_line(editor, style_inversion):
    ddim = editor.invert(STYLE, "a red triangle", method="ddim", num_inference_steps=3)
    cases = [
        (lambda: editor.transfer_style(style_inversion, None), "needs a content image"),
        (lambda: editor.transfer_style(ddim, CONTENT), "StyleDiffusion inversion of the style image"),
        (lambda: editor.transfer_style("inv.safetensors", CONTENT), "got str"),
        (lambda: editor.transfer_style(style_inversion, CONTENT, transfer_feature_fraction=2), "above its maximum"),
        (lambda: editor.transfer_style(style_inversion, CONTENT, transfer_typo=1), "not a style-transfer option"),
        (lambda: editor.transfer_style(replace(style_inversion, z_T=style_inversion.z_T[..., :4, :4]), CONTENT),
         "invert the style image at this model's size"),
    ]
    for call, needle in cases:
        with pytest.raises(UserError, match=needle) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra, needle", [
    (["--content_image", "missing.png"], "missing.png"),
    (["--content_image", str(CONTENT), "--inversion", "ddim"], "needs --inversion stylediffusion"),
    (["--content_image", str(CONTENT), "--target", "a cat"], "drop --is_train and --target"),
    (["--content_prompt", "a circle", "--target", "a cat"], "give --content_image too"),
    (["--content_image", str(CONTENT), "--method_option", "transfer_feature_layers=all"], "not one of"),
])
def test_cli_bad_input_is_one_line_and_exit_2(extra, needle, tmp_path, capsys):
    code = main(["--model", "tiny", "--image_path", str(STYLE), "--prompt", "a red triangle", "--outdir",
                 str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_real_layout_style_trained_in_one_process_transferred_in_another(tmp_path):
    """The authors' two steps on a folder laid out as the hub's: train the style (``--is_train True``), then a
    new process transfers it onto a content image without training again; outputs as an edit's."""
    model = layouts.build_folder("sd-v1-5", tmp_path / "sd-v1-5")
    encoder = layouts.build_image_encoder(tmp_path / "clip")
    common = ["--model", str(model), "--image_encoder", str(encoder), "--image_path", str(STYLE), "--prompt",
              "a red triangle on a black background", "--num_ddim_steps", "2", "--num_inner_steps", "1",
              "--device", "cpu", "--progress", "False"]

    def cli(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "edit_w_ptp_v_clip.py"), *common, *args],
            check=False,
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )

    train = cli("--is_train", "True")
    assert train.returncode == 0, train.stderr
    ckpt = next((tmp_path / "checkpoints").glob("*.safetensors"))
    before = ckpt.stat().st_mtime_ns
    transfer = cli("--content_image", str(CONTENT), "--content_prompt", "a yellow circle", "--outdir", "out",
                   "--method_option", "transfer_attention_fraction=0.3")
    assert transfer.returncode == 0, transfer.stderr
    assert "training it first" not in transfer.stdout and ckpt.stat().st_mtime_ns == before
    report = json.loads((tmp_path / "out" / "edit.json").read_text())
    assert report["edit"] == "style_transfer" and report["content_prompt"] == "a yellow circle"
    assert report["transfer_attention_fraction"] == 0.3 and report["transfer_feature_fraction"] == 0.8
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"edited.png", "reconstruction.png", "grid.png",
                                                              "edit.json"}
    assert np.asarray(Image.open(tmp_path / "out" / "edited.png")).std() > 0


def test_demo_section_transfers_the_inverted_style_and_refuses_bad_input(editor, tmp_path):
    from stylediffusion.app import DemoApp
    from stylediffusion.app_style_transfer import transfer

    app = DemoApp(editor, tmp_path / "cache")
    style, content, prompt = Image.open(STYLE).convert("RGB"), Image.open(CONTENT).convert("RGB"), "a red triangle"
    step1 = (style, prompt, "stylediffusion", 2, 1)
    with pytest.raises(UserError, match="press Invert first"):
        transfer(app, *step1, content)
    app.invert(*step1)
    with pytest.raises(UserError, match="no content image"):
        transfer(app, *step1, None)
    with pytest.raises(UserError, match="no style image"):
        transfer(app, None, prompt, "stylediffusion", 2, 1, content)
    result = transfer(app, *step1, content, "", 0.5, 0.25)
    report = json.loads(result.files[1].read_text())
    assert report["transfer_feature_fraction"] == 0.5 and report["transfer_attention_fraction"] == 0.25
    assert result.files[0].is_file() and result.grid.width > 3 * editor.bundle.image_size
    assert result.files[0].parent.parent == tmp_path / "cache" / "edits"  # under the cache's size bound
    from stylediffusion.demo_limits import ServiceLimits

    small = DemoApp(editor, tmp_path / "cache", limits=ServiceLimits(max_image_pixels=32 * 32, max_prompt_chars=40))
    for bad, needle in (({"content_image": Image.new("RGB", (64, 64))}, "--max_image_pixels"),
                        ({"content_prompt": "x" * 41}, "--max_prompt_chars"),
                        ({"feature_fraction": 1.5}, "transfer_feature_fraction"),
                        ({"attention_fraction": "nan"}, "transfer_attention_fraction")):
        args = {"content_image": content, "content_prompt": "", "feature_fraction": 0.5, "attention_fraction": 0.5,
                **bad}
        target = small if "content_image" in bad or "content_prompt" in bad else app
        with pytest.raises(UserError, match=needle) as err:
            transfer(target, *step1, **args)
        assert "\n" not in str(err.value)
    app.invert(style, prompt, "ddim", 2, 1)
    with pytest.raises(UserError, match="method='stylediffusion'"):
        transfer(app, style, prompt, "ddim", 2, 1, content)


def test_bench_reproduce_writes_content_style_transfer_grids(tmp_path):
    from stylediffusion.bench import reproduce

    args = ["--idx", "10", "--outdir", str(tmp_path), "--model", "tiny", "--num_ddim_steps", "2",
            "--num_inner_steps", "1", "--device", "cpu", "--content_image", str(CONTENT)]
    assert reproduce.main(args)["processed"] == 1
    grid = Image.open(tmp_path / reproduce.TRANSFER_LABEL / "case10_transfer.png")
    assert grid.width > 3 * reproduce.MIN_CELL
    assert reproduce.main(args)["processed"] == 0  # resumed: nothing left
    trained = sorted((tmp_path / "checkpoints").glob("*.safetensors"))
    other = ["--outdir", str(tmp_path / "other"), "--method_option", "transfer_feature_fraction=0.5"]
    assert reproduce.main([*args[:2], *other, *args[4:]])["processed"] == 1
    assert sorted((tmp_path / "other" / "checkpoints").glob("*.safetensors"))[0].name == trained[0].name  # same style
    with pytest.raises(UserError, match="missing.png"):
        reproduce.main([*args[:-1], str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match="needs --inversion stylediffusion"):
        reproduce.main([*args, "--inversion", "ddim"])
