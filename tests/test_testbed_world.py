"""The test-bed world: deterministic, exact, and readable back from pixels."""

import numpy as np
import pytest

from stylediffusion.testbed import analyser as A
from stylediffusion.testbed import world as W


def _scenes(seed, n, split="train", **kw):
    rng = np.random.default_rng(seed)
    return [W.sample_scene(rng, split=split, **kw) for _ in range(n)]


def test_vocabulary_is_rich_enough():
    assert len(W.SHAPES) >= 5
    assert len(W.OBJECT_COLOURS) >= 7
    assert {"small", "large"} <= {s for s in W.SIZES if s}
    kinds = {v[0] for v in W.BACKGROUNDS.values()}
    assert "plain" in kinds and len(kinds - {"plain"}) >= 2


def test_determinism_under_seed():
    a = _scenes(123, 20)
    b = _scenes(123, 20)
    c = _scenes(124, 20)
    for x, y in zip(a, b):
        assert x.caption == y.caption
        assert np.array_equal(x.image, y.image)
        for ox, oy in zip(x.objects, y.objects):
            assert np.array_equal(ox.mask, oy.mask)
    assert any(x.caption != z.caption or not np.array_equal(x.image, z.image) for x, z in zip(a, c))
    ia, ca = W.sample_batch(np.random.default_rng(5), 8)
    ib, cb = W.sample_batch(np.random.default_rng(5), 8)
    assert ca == cb and np.array_equal(ia, ib)


def test_heldout_combinations_split():
    assert len(W.HELDOUT_COMBOS) >= 3
    # every colour and every shape is still seen in training
    assert {c for c, _ in W.TRAIN_COMBOS} == set(W.OBJECT_COLOURS)
    assert {s for _, s in W.TRAIN_COMBOS} == set(W.SHAPES)
    for s in _scenes(0, 400, "train"):
        for o in s.objects:
            assert (o.colour, o.shape) not in W.HELDOUT_COMBOS, s.caption
    for s in _scenes(1, 100, "heldout"):
        assert (s.objects[0].colour, s.objects[0].shape) in W.HELDOUT_COMBOS


def test_masks_exact_and_captions_mention_attributes():
    for s in _scenes(2, 100, p_two=0.5):
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert s.caption.endswith(f"on a {s.background.name} background")
        union = np.zeros((32, 32), bool)
        for o in s.objects:
            assert o.mask.any()
            assert not (o.mask & union).any()  # disjoint
            union |= o.mask
            assert (s.image[o.mask] == np.array(o.rgb, np.uint8)).all()
            assert f"{o.colour} {o.shape}" in s.caption
            if o.size:
                assert f"{o.size} {o.colour} {o.shape}" in s.caption
            x0, y0, x1, y1 = o.bbox
            ys, xs = np.nonzero(o.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        # outside the objects the image is exactly the background
        bg = W.background_image(s.background.name)
        assert (s.image[~union] == bg[~union]).all()
    assert {len(s.objects) for s in _scenes(3, 50)} == {1, 2}


def test_textures_shift_by_their_phase_and_only_training_draws_one():
    checks = W.background_image("checkered")
    assert checks[0, 0, 0] == 40 and checks[0, 4, 0] == 100 and checks[4, 0, 0] == 100
    shifted = W.background_image("checkered", offset=(2, 6))
    assert np.array_equal(shifted, np.roll(checks, (-2, -6), axis=(0, 1)))
    assert np.array_equal(W.background_image("checkered", offset=(8, 16)), checks)   # modulo the period
    assert np.array_equal(W.background_image("checkered", offset=(4, 4)), checks)    # and its symmetry
    stripes = W.background_image("striped gray")
    assert np.array_equal(W.background_image("striped gray", offset=(2, 3)), np.roll(stripes, -2, axis=0))
    for name in ("black", "blue", "gradient"):                                      # nothing to shift
        assert np.array_equal(W.background_image(name, offset=(2, 6)), W.background_image(name))
    assert W.texture_period("checkered") == (8, 8) and W.texture_period("striped gray") == (4, 1)
    # the default ("fixed") keeps every texture at offset 0 and draws exactly what it always drew
    fixed = _scenes(9, 60)
    assert all(s.background.offset == (0, 0) for s in fixed)
    rng = np.random.default_rng(9)
    assert [W.sample_scene(rng, texture_phase="fixed").caption for _ in range(60)] == [s.caption for s in fixed]
    # "random": even offsets (whole latent cells), textured backgrounds only, rendered exactly
    seen = set()
    for s in _scenes(10, 400, texture_phase="random"):
        dy, dx = s.background.offset
        if s.background.kind in ("striped", "checkered"):
            seen.add((s.background.kind, (dy, dx)))
        else:
            assert (dy, dx) == (0, 0)
        assert dy % 2 == 0 and dx % 2 == 0
        union = np.any([o.mask for o in s.objects], axis=0)
        assert np.array_equal(s.image[~union], s.background.image()[~union])
    assert {o for k, o in seen if k == "striped"} == {(0, 0), (2, 0)}
    assert len({o for k, o in seen if k == "checkered"}) == 16
    # an edit keeps the source's phase
    s = W.make_scene([("red", "circle", None, (16, 16))], "checkered", background_offset=(2, 4))
    assert W.edit(s, "colour", to="blue").target.background.offset == (2, 4)
    with pytest.raises(ValueError, match="texture_phase"):
        W.sample_scene(np.random.default_rng(0), texture_phase="shifted")


def test_analyser_finds_objects_on_a_texture_at_any_phase():
    for offset in [(0, 0), (2, 6), (5, 3)]:
        s = W.make_scene([("green", "star", "large", (12, 14)), ("white", "cross", "small", (25, 6))],
                         "checkered", background_offset=offset)
        free = A.analyse_free(s.image, "checkered")
        assert free.colours == ["green", "white"] and free.shapes == ["star", "cross"], offset
        assert len(free.regions) == 2 and free.background_psnr == float("inf")   # no check read as an object
        laid = A.analyse(s.image, s, reference=s)                   # the scene's own phase
        assert laid.colours == ["green", "white"] and laid.shapes == ["star", "cross"]
    # read against the texture at phase 0, a shifted one is checks everywhere
    s = W.make_scene([("green", "star", "large", (12, 14))], "checkered", background_offset=(2, 6))
    assert A.analyse_free(s.image, "checkered").background_psnr == float("inf") and \
        A.psnr(s.image, W.background_image("checkered"), ~s.objects[0].mask) < 16   # half off by 60


def test_free_analyser_follows_a_texture_whose_phase_changes_along_a_seam():
    # a drawn texture may start over halfway: the checks right of column 16 shifted by half a check
    s = W.make_scene([("orange", "cross", "large", (9, 16))], "checkered")
    seam = s.image.copy()
    right = np.zeros(seam.shape[:2], bool)
    right[:, 16:] = True
    right &= ~s.objects[0].mask
    seam[right] = W.background_image("checkered", offset=(0, 2))[right]
    free = A.analyse_free(seam, "checkered")
    assert [(r.colour, r.shape) for r in free.regions] == [("orange", "cross")]
    # where the object fills one side of a window, the other side's phase may win: a few seam pixels
    assert 0 <= free.regions[0].area - s.objects[0].mask.sum() <= 8
    # one phase for the whole image would leave half a column of checks in every shifted check
    off_object = [np.count_nonzero((np.abs(seam.astype(int) - W.background_image("checkered", offset=o).astype(int))
                                    .max(axis=2) > A.FREE_FOREGROUND_THRESHOLD) & ~s.objects[0].mask)
                  for o in [(0, 0), (0, 2)]]
    assert min(off_object) > 100
    # an object whose colour is near the checks is not explained away by a phase: it stays whole
    s = W.make_scene([("white", "square", "large", (16, 16))], "checkered", background_offset=(3, 1))
    free = A.analyse_free(s.image, "checkered")
    assert [(r.colour, r.shape, r.area) for r in free.regions] == [("white", "square", s.objects[0].mask.sum())]


def test_analyser_reads_rendered_scenes():
    for s in _scenes(4, 100, p_two=0.5):
        an = A.analyse(s.image, s, reference=s)
        assert an.colours == [o.colour for o in s.objects], s.caption
        assert an.shapes == [o.shape for o in s.objects], s.caption
        assert an.background_psnr == float("inf")
    # bare masks and PIL input work too
    for s in _scenes(5, 30):
        an = A.analyse(s.pil(), s.layout())
        assert an.colours == [o.colour for o in s.objects]
        assert an.shapes == [o.shape for o in s.objects], s.caption


def test_analyser_free_mode_on_single_objects():
    for s in _scenes(6, 40, n_objects=1):
        an = A.analyse_free(s.image, s.background.name)
        assert len(an.regions) == 1
        assert (an.regions[0].colour, an.regions[0].shape) == (s.objects[0].colour, s.objects[0].shape)


def test_analyser_detects_swaps_and_background_change():
    rng = np.random.default_rng(7)
    for s in _scenes(8, 30):
        e = W.edit(s, "colour", rng)
        an = A.analyse(e.target.image, s, reference=s)
        assert an.colours[0] == e.new != s.objects[0].colour
        assert an.background_psnr == float("inf")
        e = W.edit(s, "shape", rng)
        an = A.analyse(e.target.image, s, reference=s)
        assert an.shapes[0] == e.new != s.objects[0].shape
        assert an.background_psnr == float("inf")
        e = W.edit(s, "background", rng)
        an = A.analyse(e.target.image, s, reference=s)
        assert an.colours == [o.colour for o in s.objects]
        assert an.background_psnr < 25


def test_edit_helpers_change_only_what_they_should():
    rng = np.random.default_rng(9)
    for s in _scenes(10, 40, p_two=0.7):
        idx = len(s.objects) - 1
        for kind in ("colour", "shape", "background"):
            e = W.edit(s, kind, rng, index=idx)
            t = e.target
            assert e.source is s and e.old != e.new
            assert t.caption != s.caption and e.new in t.caption
            assert [o.center for o in t.objects] == [o.center for o in s.objects]
            assert [o.size for o in t.objects] == [o.size for o in s.objects]
            for k, (a, b) in enumerate(zip(s.objects, t.objects)):
                same = kind == "background" or k != idx
                if same:
                    assert (a.colour, a.shape) == (b.colour, b.shape)
                    assert np.array_equal(a.mask, b.mask)
            if kind == "colour":
                assert t.objects[idx].colour == e.new
                assert np.array_equal(t.objects[idx].mask, s.objects[idx].mask)
                assert t.background == s.background
                changed = np.any(t.image != s.image, axis=2)
                assert np.array_equal(changed, s.objects[idx].mask)
            elif kind == "shape":
                assert t.objects[idx].shape == e.new
                assert t.background == s.background
                changed = np.any(t.image != s.image, axis=2)
                assert not (changed & ~(s.objects[idx].mask | t.objects[idx].mask)).any()
                union = np.zeros((32, 32), bool)
                for o in t.objects:
                    assert not (o.mask & union).any()
                    union |= o.mask
            else:
                assert t.background.name == e.new
                union = np.zeros((32, 32), bool)
                for o in s.objects:
                    union |= o.mask
                assert (t.image[union] == s.image[union]).all()
    with pytest.raises(ValueError):
        W.edit(_scenes(11, 1)[0], "size")


def test_explicit_scene_and_caption_format():
    s = W.make_scene([("green", "square", "small", (10, 10)), ("yellow", "star", None, (22, 22))], "blue")
    assert s.caption == "a small green square and a yellow star on a blue background"
    s = W.fixed_scene("red", "circle", "striped gray")
    assert s.caption == "a red circle on a striped gray background"
    assert s.objects[0].center == (16, 16)


# ---------------------------------------------------------------- trained model

import os  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "stylediffusion", "assets", "testbed_model")


@pytest.mark.skipif(not os.path.exists(os.path.join(MODEL_DIR, "model_index.json")),
                    reason="test-bed model not exported")
def test_testbed_model_folder():
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODEL_DIR) for f in fs)
    assert total < 50 * 2 ** 20
    for sub in ("vae", "text_encoder", "unet", "image_encoder"):
        files = os.listdir(os.path.join(MODEL_DIR, sub))
        assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith(".bin") for f in files)
    info = json.load(open(os.path.join(MODEL_DIR, "testbed.json")))
    assert sorted(map(tuple, info["world"]["heldout_combos"])) == sorted(W.HELDOUT_COMBOS)

    vae = AutoencoderKL.from_pretrained(MODEL_DIR, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR, subfolder="unet")
    te = CLIPTextModel.from_pretrained(MODEL_DIR, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(MODEL_DIR, subfolder="tokenizer")
    CLIPVisionModel.from_pretrained(MODEL_DIR, subfolder="image_encoder")
    sched = DDIMScheduler.from_pretrained(MODEL_DIR, subfolder="scheduler")
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.steps_offset == 1
    assert not sched.config.clip_sample and not sched.config.set_alpha_to_one
    assert vae.config.scaling_factor != 1.0
    ids = tok("a red circle on a black background", padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == 49406

    # cross-attention runs at the latent/4 ("mid-low") resolution, among others
    side = unet.config.sample_size
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.add(inp[0].shape[1]))
             for n, m in unet.named_modules() if n.endswith("attn2")]
    with torch.no_grad():
        emb = te(input_ids=ids).last_hidden_state
        x = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode() * vae.config.scaling_factor
        assert x.shape[-1] == side
        eps = unet(x, torch.tensor([500]), encoder_hidden_states=emb).sample
    for h in hooks:
        h.remove()
    assert eps.shape == x.shape
    assert (side // 4) ** 2 in seen and len(seen) >= 2
