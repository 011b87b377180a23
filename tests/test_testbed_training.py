"""Test-bed training options of issue 13 (no real training: untrained tiny components, a step or two):
context-free text encodings, object-weighted losses, the decoder fine-tune from an exported folder,
and exports that keep the latent and text spaces the UNet was trained in."""

import json

import numpy as np
import pytest
import torch
from test_testbed_attention import _init_folder

from benchmarks.testbed_training import components, export, loop, losses, stages, train
from benchmarks.testbed_training import evaluate as E
from stylediffusion.testbed import model as M
from stylediffusion.testbed import world as W


def _encode(te, caption):
    ids = loop.tokenize(M.build_tokenizer(), [caption])
    with torch.no_grad():
        return te(input_ids=ids).last_hidden_state[0]


def test_truncated_text_encoder_keeps_embeddings_and_drops_context():
    torch.manual_seed(0)
    te = M.build_text_encoder().eval()
    te0 = M.truncate_text_encoder(te, 0)
    assert te0.config.num_hidden_layers == 0 and M.truncate_text_encoder(te, 2).config.num_hidden_layers == 2
    # token 3 is "triangle" in both captions; only the word before it differs
    red, blue = _encode(te, "a red triangle"), _encode(te, "a blue triangle")
    assert not torch.allclose(red[3], blue[3])            # the full tower mixes "red" into "triangle"
    red0, blue0 = _encode(te0, "a red triangle"), _encode(te0, "a blue triangle")
    assert torch.equal(red0[3], blue0[3])                 # context-free: the same encoding
    assert not torch.allclose(red0[2], blue0[2])
    # the embeddings are the trained ones, not fresh ones
    sd, sd0 = te.state_dict(), te0.state_dict()
    for k, v in sd0.items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(ValueError):
        M.truncate_text_encoder(te, 4)


def test_object_loss_weights_mark_the_cells_that_hold_an_object():
    scene = W.make_scene([("red", "square", None, (8, 8))], "black")
    w = losses.object_loss_weights([scene], (16, 16), 5.0, dilate=0)
    assert w.shape == (1, 1, 16, 16)
    obj = scene.objects[0]
    x0, y0, x1, y1 = obj.bbox
    cells = w[0, 0]
    assert set(torch.unique(cells).tolist()) == {1.0, 5.0}
    assert cells[y0 // 2, x0 // 2] == 5.0 and cells[(y1 - 1) // 2, (x1 - 1) // 2] == 5.0
    assert cells[15, 15] == 1.0 and cells[0, 15] == 1.0
    assert int((cells == 5.0).sum()) == len({(y // 2, x // 2) for y, x in zip(*np.nonzero(obj.mask))})
    exact = losses.object_loss_weights([scene], (32, 32), 5.0, dilate=0)[0, 0]   # the pixel grid (decoder)
    assert torch.equal(exact == 5.0, torch.from_numpy(obj.mask))
    grown = losses.object_loss_weights([scene], (32, 32), 5.0, dilate=1)[0, 0]
    assert int((grown == 5.0).sum()) > int(obj.mask.sum()) and bool((grown == 5.0)[torch.from_numpy(obj.mask)].all())


def test_background_words_target_the_pixels_outside_the_objects():
    tok = M.build_tokenizer()
    # a background colour equal to an object's ("blue") must still be told apart by position
    scene = W.make_scene([("blue", "star", "small", (8, 8)), ("red", "circle", None, (22, 22))], "blue")
    assert scene.caption == "a small blue star and a red circle on a blue background"
    objects_only = losses.object_word_targets(scene, {}, tok)
    with_bg = losses.object_word_targets(scene, {}, tok, background=True)
    assert len(objects_only) == 4 and len(with_bg) == 5
    for (idx, mask), (idx2, mask2) in zip(objects_only, with_bg):
        assert idx == idx2 and np.array_equal(mask, mask2)
    ids = tok(scene.caption).input_ids
    (bg_tokens, outside), = with_bg[4:]
    assert bg_tokens == [11] and tok.decode([ids[11]]) == "blue"       # not token 3, the star's "blue"
    union = scene.objects[0].mask | scene.objects[1].mask
    assert np.array_equal(outside, ~union)
    # two background words ("striped gray") each target the same pixels
    striped = W.make_scene([("green", "cross", "large", (16, 16))], "striped gray")
    words = losses.object_word_targets(striped, {}, tok, background=True)[2:]
    ids = tok(striped.caption).input_ids
    assert [tok.decode([ids[i] for i in idx]) for idx, _ in words] == ["striped", "gray"]
    assert all(np.array_equal(m, ~striped.objects[0].mask) for _, m in words)
    assert E.background_word_positions(striped) == [6, 7]


def test_each_pure_cell_reads_its_own_words_and_the_share_loss_measures_that():
    tok = M.build_tokenizer()
    # a square of half-width 0.7 * 6.5 = 4.55 px around (12, 12) covers pixels 8..16: 8x8 cells 2..3 (4 px
    # each) lie inside it; a background equal to the object's colour is still told apart by position
    scene = W.make_scene([("blue", "square", None, (12, 12))], "blue")
    targets = losses.object_word_targets(scene, {}, tok, background=True)
    ids = tok(scene.caption).input_ids
    n_tok = 77
    select, valid = losses.pixel_word_targets(scene, targets, 8, n_tok)
    cells = select.reshape(8, 8, n_tok)
    inside = [(y, x) for y in (2, 3) for x in (2, 3)]
    for y, x in inside:
        assert valid[y * 8 + x] and [tok.decode([ids[i]]) for i in np.nonzero(cells[y, x])[0]] == ["blue", "square"]
        assert np.nonzero(cells[y, x])[0].tolist() == [2, 3]
    assert np.nonzero(cells[0, 7])[0].tolist() == [6]                   # background "blue", not token 2
    assert not valid[1 * 8 + 2] and not cells[1, 2].any()               # a cell half on the object: left out
    assert valid.sum() == 4 + np.count_nonzero(E.cell_fractions(~scene.objects[0].mask, (8, 8)) >= 0.99)
    # the loss: 0 when every pure cell puts all its mass on its words, 1 - share otherwise
    perfect = torch.zeros(1, 2, 64, n_tok)
    perfect[0, :, torch.from_numpy(valid)] = torch.from_numpy(select[valid]).float() / \
        torch.from_numpy(select[valid]).float().sum(-1, keepdim=True)
    perfect[0, :, torch.from_numpy(~valid), 0] = 1.0
    one = torch.ones(1)
    assert losses.attention_share_loss([perfect], [scene], [0], [targets], one).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, 2, 64, n_tok), 1.0 / n_tok)
    expected = 1.0 - (4 * 2 + (valid.sum() - 4) * 1) / valid.sum() / n_tok   # 2 words inside, 1 outside
    assert losses.attention_share_loss([uniform], [scene], [0], [targets], one).item() == pytest.approx(expected)
    half = losses.attention_share_loss([uniform], [scene], [0], [targets], 0.5 * one)
    assert half.item() == pytest.approx(expected / 2)


def test_weighted_mse_is_mse_when_unweighted_and_keeps_its_scale():
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(losses.weighted_mse(a, b, ones), torch.nn.functional.mse_loss(a, b))
    assert torch.allclose(losses.weighted_mse(a, b, 3 * ones), losses.weighted_mse(a, b, ones))
    w = ones.clone()
    w[..., :4] = 9.0                                     # the left half counts 9x
    err = (a - b) ** 2
    expected = (9 * err[..., :4].sum() + err[..., 4:].sum()) / (9 * err[..., :4].numel() + err[..., 4:].numel())
    assert torch.allclose(losses.weighted_mse(a, b, w), expected)


def _run(argv):
    assert train.main(argv) == 0


def test_decoder_finetune_from_a_folder_keeps_the_encoder_and_exports(tmp_path):
    init, run, dst = tmp_path / "init", tmp_path / "run", tmp_path / "model"
    _init_folder(init)
    _run(["--stage", "vae_decoder", "--init-from", str(init), "--out", str(run), "--steps", "2",
          "--batch", "2", "--object-weight", "4", "--texture-phase", "random"])
    meta = json.loads((run / "vae_decoder.json").read_text())
    assert meta["step"] == 2 and meta["extra"]["object_weight"] == 4.0
    assert meta["extra"]["texture_phase"] == "random" and meta["extra"]["texture_phase_from_step"] == [[0, "random"]]
    _run(["--stage", "export", "--out", str(run), "--model-dir", str(dst)])   # init folder read from the run
    from diffusers import AutoencoderKL

    before = AutoencoderKL.from_pretrained(init / "vae").state_dict()
    after = AutoencoderKL.from_pretrained(dst / "vae").state_dict()
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before if k.startswith("decoder.")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (init / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    info = json.loads((dst / "testbed.json").read_text())
    assert info["training"]["vae_decoder_finetunes"][-1]["steps"] == 2
    assert info["training"]["vae_decoder_finetunes"][-1]["texture_phase"] == "random"
    assert "_name_or_path" not in json.loads((dst / "vae" / "config.json").read_text())  # no local path shipped
    # a UNet run started from the exported folder sees the same latent space: the hashes agree
    exported_hashes = components.frozen_parts_from_folder(str(dst))[3]
    assert exported_hashes["vae_encoder"] == components.frozen_parts_from_folder(str(init))[3]["vae_encoder"]
    # another encoder in the starting folder is refused, on resume and on export
    torch.manual_seed(5)
    M.build_vae().save_pretrained(init / "vae")
    with pytest.raises(SystemExit, match="error:"):
        train.main(["--stage", "vae_decoder", "--init-from", str(init), "--out", str(run), "--steps", "3",
                "--batch", "2", "--resume"])
    with pytest.raises(SystemExit, match="error:"):
        export.export(str(run), str(tmp_path / "other"))


def test_unet_run_with_context_free_text_exports_that_text_encoder(tmp_path):
    init, run, dst = tmp_path / "init", tmp_path / "run", tmp_path / "model"
    _init_folder(init)
    M.build_unet().save_pretrained(init / "unet")
    _run(["--stage", "unet", "--init-from", str(init), "--out", str(run), "--steps", "1", "--batch", "2",
          "--text-layers", "0", "--object-weight", "5", "--attn-weight", "0.3", "--attn-background",
          "--attn-share-weight", "0.1", "--texture-phase", "random", "--texture-weight", "2"])
    meta = json.loads((run / "unet.json").read_text())
    assert meta["extra"]["text_layers"] == 0 and meta["extra"]["object_weight"] == 5.0
    assert meta["extra"]["attn_background"] is True and meta["extra"]["attn_share_weight"] == 0.1
    assert meta["extra"]["texture_phase"] == "random" and meta["extra"]["texture_phase_from_step"] == [[0, "random"]]
    assert meta["extra"]["texture_weight"] == 2 and meta["extra"]["texture_weight_from_step"] == [[0, 2]]
    assert len(meta["attn_share_losses"]) == 1 and 0.0 < meta["attn_share_losses"][0] < 1.0
    # a starting folder whose config names where it was read from: the export names no local path
    cfg = json.loads((init / "vae" / "config.json").read_text())
    (init / "vae" / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(init / "vae")}))
    _run(["--stage", "export", "--out", str(run), "--model-dir", str(dst)])
    assert "_name_or_path" not in json.loads((dst / "vae" / "config.json").read_text())
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(dst / "text_encoder")
    assert te.config.num_hidden_layers == 0
    assert torch.equal(_encode(te, "a red triangle")[3], _encode(te, "a blue triangle")[3])
    # resuming with another number of layers is refused
    with pytest.raises(SystemExit, match="error:"):
        train.main(["--stage", "unet", "--init-from", str(init), "--out", str(run), "--steps", "2", "--batch", "2",
                "--text-layers", "1", "--resume"])


def test_texture_weight_draws_striped_and_checkered_that_many_times_as_often():
    assert stages.training_backgrounds(1) == W.BACKGROUND_NAMES
    names = stages.training_backgrounds(3)
    assert names.count("striped gray") == 3 and names.count("checkered") == 3
    assert all(names.count(n) == 1 for n in ("black", "gray", "blue", "gradient"))
    rng = np.random.default_rng(0)
    drawn = [W.sample_scene(rng, backgrounds=names).background.name for _ in range(2000)]
    share = sum(n in ("striped gray", "checkered") for n in drawn) / len(drawn)
    assert abs(share - 6 / 10) < 0.04                     # 2 of 6 (0.33) with the default
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "unet", "--texture-weight", "0", "--out", "unused"])
    assert e.value.code == 2


def test_the_installed_package_never_imports_the_training_code():
    """Training and measuring the test-bed model live in benchmarks/ (not installed): a package module that
    imported them would fail in every installed copy, so none may, even inside a function."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "stylediffusion"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(package)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] == "benchmarks"]
    assert not offenders
