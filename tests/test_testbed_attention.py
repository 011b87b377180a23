"""Attention localisation on the test bed: the mass-inside-the-object measure and the training loss
that pulls object words' cross-attention onto their objects (hand-made maps, tiny UNet, no training)."""

import numpy as np
import pytest
import torch

from benchmarks.testbed_training import components, export, losses
from benchmarks.testbed_training import evaluate as E
from benchmarks.testbed_training.stage_files import save_training_stage
from stylediffusion.testbed import model as M
from stylediffusion.testbed import world as W


def test_cell_fractions_counts_pixels_per_cell():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True      # the whole top-left cell of a 2x2 grid
    mask[4:6, 4:8] = True    # half of the bottom-right cell
    np.testing.assert_allclose(E.cell_fractions(mask, (2, 2)), [[1.0, 0.0], [0.0, 0.5]])
    with pytest.raises(ValueError):
        E.cell_fractions(mask, (3, 3))


def test_attention_mass_inside_on_hand_made_maps():
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True                      # exactly cell (1, 1) of a 4x4 grid
    on_object = np.zeros((4, 4))
    on_object[1, 1] = 5.0
    assert E.attention_mass_inside(on_object, mask) == pytest.approx(1.0)
    elsewhere = np.zeros((4, 4))
    elsewhere[3, 3] = 1.0
    assert E.attention_mass_inside(elsewhere, mask) == pytest.approx(0.0)
    split = np.zeros((4, 4))
    split[1, 1], split[0, 0] = 3.0, 1.0          # 3/4 of the mass on the object
    assert E.attention_mass_inside(split, mask) == pytest.approx(0.75)
    assert E.attention_mass_inside(np.ones((4, 4)), mask) == pytest.approx(64 / 1024)
    half = np.zeros((32, 32), bool)
    half[8:12, 8:16] = True                      # half of cell (1, 1)
    assert E.attention_mass_inside(on_object, half) == pytest.approx(0.5)
    assert E.attention_mass_inside(np.zeros((4, 4)), mask) == 0.0


def test_object_disc_is_the_dilated_disc_around_the_centre():
    scene = W.make_scene((("red", "cross", None, (16, 16)),), "black")
    obj = scene.objects[0]
    disc = E.object_disc(obj, 32, dilate=2.0)
    # centre (16, 16) is a pixel corner: pixel 23 (centre 23.5) is 7.5 px away, pixel 25 is 9.5 px away
    assert disc[16, 16] and disc[16, 23] and not disc[16, 25] and not disc[16, 6]   # r = 6.5 + 2 = 8.5 px
    assert (disc | ~obj.mask).all()              # the object lies inside its disc
    assert E.object_disc(obj, 32, dilate=0.0).sum() < disc.sum()


def test_object_words_are_found_by_position_not_by_name():
    scene = W.make_scene((("green", "square", "small", (8, 8)), ("blue", "star", None, (23, 23))), "blue")
    assert scene.caption == "a small green square and a blue star on a blue background"
    assert E.object_word_positions(scene, 0) == (2, 3)
    assert E.object_word_positions(scene, 1) == (6, 7)   # not the background's "blue" (word 10)


def _probs(batch, grid, tokens=77):
    return torch.full((batch, 2, grid * grid, tokens), 1.0 / tokens)


def test_attention_inside_loss_zero_on_the_object_and_one_minus_share_when_uniform():
    disc = np.zeros((32, 32), bool)
    disc[0:16, 0:16] = True                      # top-left quarter = cell (0, 0) of a 2x2 grid
    probs = _probs(2, 2)
    probs[0, :, :, 5] = 0.0
    probs[0, :, 0, 5] = 0.9                      # row 0, token 5: all its mass in cell (0, 0)
    weights = torch.ones(2)
    on = losses.attention_inside_loss([probs], [0], [[5]], [disc], weights[:1])
    assert on.item() == pytest.approx(0.0, abs=1e-6)
    uniform = losses.attention_inside_loss([probs], [1], [[5]], [disc], weights[:1])
    assert uniform.item() == pytest.approx(0.75)
    both = losses.attention_inside_loss([probs, _probs(2, 4)], [0, 1], [[5], [5]], [disc, disc], weights)
    assert both.item() == pytest.approx(((0.0 + 0.75) / 2 + 0.75) / 2)   # layer means, then mean of layers


def test_attention_inside_loss_gradient_moves_mass_onto_the_object():
    disc = np.zeros((32, 32), bool)
    disc[16:, 16:] = True
    logits = torch.zeros(1, 1, 16, 77, requires_grad=True)
    loss = losses.attention_inside_loss([logits.softmax(-1)], [0], [[3]], [disc], torch.ones(1))
    loss.backward()
    g = logits.grad[0, 0, :, 3].reshape(4, 4)
    assert (g[2:, 2:] < 0).all() and (g[:2, :] > 0).all()   # descent raises token 3 on the object only


def test_map_keeper_keeps_cross_attention_down_to_latent_over_4():
    from stylediffusion.attention_control import COND, BatchLayout, controlled, install_attention_control

    torch.manual_seed(0)
    unet = M.build_unet()
    state = install_attention_control(unet)
    keeper = losses.AttentionMapKeeper()
    z = torch.randn(1, 4, M.LATENT_SIZE, M.LATENT_SIZE)
    state.set(step=0, layout=BatchLayout.single(COND, 1), latent_hw=tuple(z.shape[-2:]))
    with controlled(state, keeper):
        unet(z, torch.tensor([500]), encoder_hidden_states=torch.randn(1, M.MAX_LENGTH, M.TEXT_WIDTH))
    grids = sorted(int(round(m.shape[2] ** 0.5)) for m in keeper.maps)
    assert set(grids) == {16, 8, 4} and 2 not in grids   # the 2x2 mid block is left out
    assert all(m.shape[-1] == M.MAX_LENGTH and m.requires_grad for m in keeper.maps)


def test_object_word_targets_pair_each_word_with_its_objects_disc():
    tok = M.build_tokenizer()
    scene = W.make_scene((("red", "circle", None, (8, 8)), ("white", "cross", "large", (22, 22))), "black")
    targets = losses.object_word_targets(scene, {}, tok)
    assert len(targets) == 4
    ids = tok(scene.caption).input_ids
    words = [tok.decode([ids[i] for i in idx]).strip() for idx, _ in targets]
    assert words == ["red", "circle", "white", "cross"]
    assert targets[0][1][8, 8] and not targets[2][1][8, 8] and targets[2][1][22, 22]


def test_evaluate_cli_rejects_bad_input(tmp_path, capsys):
    assert E.main(["--model-dir", str(tmp_path), "--n", "2"]) == 2
    assert E.main(["--n", "0"]) == 2
    assert "error:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _init_folder(path):
    """A minimal exported test-bed folder (untrained components) to start a run from."""
    import json

    torch.manual_seed(0)
    M.build_vae().save_pretrained(path / "vae")
    M.build_text_encoder().save_pretrained(path / "text_encoder")
    M.build_vision_encoder().save_pretrained(path / "image_encoder")
    M.build_tokenizer().save_pretrained(path / "tokenizer")
    M.build_scheduler().save_pretrained(path / "scheduler")
    M.build_unet().save_pretrained(path / "unet")
    (path / "model_index.json").write_text("{}")
    (path / "testbed.json").write_text(json.dumps({"training": {"unet": {"steps": 5}}, "evaluation": {"old": 1}}))


def test_export_from_init_ships_the_trained_unet_with_the_starting_parts(tmp_path):
    import json

    init, out, dst = tmp_path / "init", tmp_path / "run", tmp_path / "model"
    out.mkdir()
    _init_folder(init)
    te, vae, unet, hashes = components.frozen_parts_from_folder(str(init))
    torch.manual_seed(1)
    trained = M.build_unet()
    opt = torch.optim.AdamW(trained.parameters())
    save_training_stage(str(out), "unet", {"unet": trained}, opt, dict(
        step=7, batch=2, seconds=1.0, losses=[0.1] * 7, attn_losses=[0.2] * 7,
        extra={"init_from": str(init), "init_hashes": hashes, "attn_weight": 0.3}))
    export.export(str(out), str(dst))
    from diffusers import UNet2DConditionModel

    shipped = UNet2DConditionModel.from_pretrained(dst / "unet")
    for (k, a), b in zip(shipped.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), k
    assert (dst / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (init / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    info = json.loads((dst / "testbed.json").read_text())
    assert "evaluation" not in info                      # the starting model's numbers are not carried over
    assert info["training"]["unet"]["steps"] == 7 and info["training"]["unet_start"] == {"steps": 5}
    # a changed VAE in the starting folder is refused
    M.build_vae().save_pretrained(init / "vae")
    with pytest.raises(SystemExit, match="error:"):
        export.export(str(out), str(dst))
