"""The API in diffusers' shape: BaseOutput results, output_type, return_dict, generator wherever noise is
drawn, callback_on_step_end, torch_dtype; on the tiny model with T = 3 (fast)."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import BaseOutput
from PIL import Image

from stylediffusion import EditOutput, StyleDiffusionEditor, UserError
from stylediffusion.ddim import DDIMSchedule
from stylediffusion.encoders import decode_latent
from stylediffusion.image_io import tensor_to_pil

SCENE = Path(__file__).resolve().parent.parent / "data" / "images" / "testbed_red_triangle.png"
TARGETS = ["a photo of a dog", "a photo of a tiger"]
SOURCE = "a photo of a cat"


@pytest.fixture(scope="module")
def editor(tiny):
    return StyleDiffusionEditor(tiny, progress=False)


@pytest.fixture(scope="module")
def ddim(editor):
    return editor.invert(SCENE, SOURCE, method="ddim", num_inference_steps=3)


@pytest.fixture(scope="module")
def edited(editor, ddim):
    """The default call (output_type="pil", return_dict=True), once per output type."""
    return {kind: editor.edit(ddim, TARGETS, output_type=kind) for kind in ("pil", "np", "pt", "latent")}


def test_the_default_output_is_a_base_output_of_pil_images_as_before(editor, edited):
    out = edited["pil"]
    assert isinstance(out, EditOutput) and isinstance(out, BaseOutput)
    assert out["images"] is out.images and out[0] is out.images and out.to_tuple()[0] is out.images
    assert all(isinstance(im, Image.Image) for im in [*out.images, out.reconstruction, out.input_image])
    assert isinstance(out.attention_maps, Image.Image)  # p2p records the maps
    # the pictures are the decoded latents, converted exactly as before the output types existed
    for k, latents in enumerate(out.latents):
        pixels = decode_latent(editor.bundle, latents)
        assert np.array_equal(np.asarray(out.images[k]), np.asarray(tensor_to_pil(pixels[1])))
    assert np.array_equal(np.asarray(out.reconstruction), np.asarray(tensor_to_pil(decode_latent(
        editor.bundle, out.latents[0])[0])))
    assert out.grid().size[0] >= 4 * out.images[0].size[0]  # input | reconstruction | two edits


def test_output_types_hold_the_same_pictures_in_diffusers_forms(editor, edited):
    pil, np_out, pt, latent = (edited[k] for k in ("pil", "np", "pt", "latent"))
    side = editor.bundle.image_size
    assert isinstance(np_out.images, np.ndarray) and np_out.images.dtype == np.float32
    assert np_out.images.shape == (2, side, side, 3) and 0 <= np_out.images.min() and np_out.images.max() <= 1
    assert np_out.reconstruction.shape == np_out.input_image.shape == (side, side, 3)
    assert np_out.attention_maps.ndim == 3 and np_out.attention_maps.shape[-1] == 3
    for k in range(2):  # the same pictures: within the uint8 rounding of "pil"
        assert np.abs(np_out.images[k] * 255 - np.asarray(pil.images[k], dtype=np.float32)).max() <= 0.51
    assert isinstance(pt.images, torch.Tensor) and pt.images.shape == (2, 3, side, side)
    assert pt.images.dtype == torch.float32 and pt.reconstruction.shape == (3, side, side)
    assert torch.allclose(pt.images.permute(0, 2, 3, 1).cpu(), torch.from_numpy(np_out.images))
    # "latent": nothing decoded; the final latents of the edit rows, and the source row's
    assert torch.equal(latent.images.cpu(), torch.stack([z[1] for z in pil.latents]))
    assert torch.equal(latent.reconstruction.cpu(), pil.latents[0][0])
    assert latent.attention_maps is None and latent.input_image is None
    for out in (np_out, pt):  # grid() is a PIL picture whatever the type
        assert np.abs(np.asarray(out.grid(), dtype=int) - np.asarray(pil.grid(), dtype=int)).max() <= 1
    with pytest.raises(UserError, match="output_type='latent'"):
        latent.grid()


def test_return_dict_false_is_a_tuple_in_fixed_places(editor, ddim, edited):
    images, reconstruction, maps = editor.edit(ddim, TARGETS, return_dict=False)
    out = edited["pil"]
    assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(images, out.images)] == [True, True]
    assert np.array_equal(np.asarray(reconstruction), np.asarray(out.reconstruction)) and maps is not None
    plain = editor.edit(ddim, TARGETS[0], method="word_swap", return_dict=False, output_type="np")
    assert len(plain) == 3 and plain[2] is None and plain[0].shape[0] == 1  # no maps recorded: None in its place


@pytest.mark.parametrize("call,needle", [
    (lambda e, inv: e.edit(inv, TARGETS[0], output_type="numpy"), "output_type='numpy' is not one of"),
    (lambda e, inv: e.edit(inv, TARGETS[0], on_step=lambda i, z: None), "callback_on_step_end"),
    (lambda e, inv: e.edit(inv, TARGETS[0], callback_on_step_end=3), "must be a function"),
    (lambda e, inv: e.edit(inv, TARGETS[0], callback_on_step_end=lambda *a: {},
                           callback_on_step_end_tensor_inputs=["prompt_embeds"]), "may name latents"),
    (lambda e, inv: e.edit(inv, TARGETS[0], callback_on_step_end=lambda *a: 1), "must return a dict"),
    (lambda e, inv: e.edit(inv, TARGETS[0], callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"][:1]}),
     "returned latents of shape"),
    (lambda e, inv: e.edit(inv, TARGETS[0], method="sdedit", generator=1, sdedit_seed=1), "both generator="),
    (lambda e, inv: e.edit(inv, TARGETS, generator=[torch.Generator()]), "one torch.Generator per target"),
    (lambda e, inv: e.edit(inv, TARGETS[0], generator="7"), "torch.Generator or an int seed"),
    (lambda e, inv: e.invert(SCENE, SOURCE, method="ddim", num_inference_steps=2, output_type="np"),
     "invert returns an Inversion"),
    (lambda e, inv: e.invert(SCENE, SOURCE, num_inference_steps=2, seed=1, generator=torch.Generator()),
     "both seed= and generator="),
    (lambda e, inv: e.invert(SCENE, SOURCE, method="ddim", num_inference_steps=2,
                             callback_on_step_end=lambda *a: None), "runs no denoising steps"),
    (lambda e, inv: e.invert(None, SOURCE, method="generated", num_inference_steps=2, generator=1,
                             generated_seed=2), "both generator="),
])
def test_bad_diffusers_arguments_are_one_line(editor, ddim, call, needle):
    with pytest.raises(UserError, match=None) as err:
        call(editor, ddim)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_callback_on_step_end_sees_every_step_and_can_change_the_latents(editor, ddim):
    seen = []

    def record(pipe, i, t, kwargs):
        assert pipe is editor and set(kwargs) == {"latents"}
        seen.append((i, int(t), kwargs["latents"].clone()))
        return kwargs

    out = editor.edit(ddim, TARGETS, callback_on_step_end=record)
    timesteps = [int(t) for t in DDIMSchedule(editor.bundle.scheduler, 3).timesteps]
    assert [(i, t) for i, t, _ in seen] == [(i, timesteps[i]) for i in range(3)] * 2  # each target's loop
    assert torch.equal(seen[2][2].cpu(), out.latents[0]) and torch.equal(seen[5][2].cpu(), out.latents[1])
    assert torch.equal(out.latents[0], editor.edit(ddim, TARGETS[0]).latents[0])  # observing changes nothing

    def zero_last(pipe, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else kwargs

    assert not editor.edit(ddim, TARGETS[0], callback_on_step_end=zero_last).latents[0].any()
    # SDEdit's own loop calls it too, from its start step (strength 0.5 of T = 3: steps 2..)
    steps = []
    editor.edit(ddim, TARGETS[0], method="sdedit", callback_on_step_end=lambda p, i, t, kw: steps.append(i))
    assert steps == [2]


def test_generator_draws_sdedit_noise_the_same_for_the_same_seed(editor, ddim):
    def sdedit(generator=None, **options):
        return editor.edit(ddim, TARGETS, method="sdedit", generator=generator, output_type="latent", **options)

    a, b = sdedit(torch.Generator().manual_seed(5)), sdedit(torch.Generator().manual_seed(5))
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, sdedit(torch.Generator().manual_seed(6)).images)
    assert torch.equal(a.images, sdedit(sdedit_seed=5).images)  # seeded with s, it draws what sdedit_seed=s does
    assert torch.equal(a.images, sdedit(5).images)
    assert torch.equal(a.latents[0][0], a.latents[1][0])  # one generator: every target edits the same draw
    # the generator is used, not just its seed: it advances, and a second call draws anew
    generator = torch.Generator().manual_seed(5)
    first, second = sdedit(generator), sdedit(generator)
    assert torch.equal(first.images, a.images) and not torch.equal(second.images, a.images)
    # one generator per target, as diffusers' lists
    per_target = sdedit([torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    assert torch.equal(per_target.latents[0], a.latents[0]) and not torch.equal(per_target.latents[1], a.latents[1])


def test_generator_chooses_what_invert_draws_and_leaves_the_global_state_alone(editor):
    state = torch.get_rng_state()

    def mappers(generator=None, seed=None):
        inv = editor.invert(SCENE, SOURCE, num_inference_steps=2, num_inner_steps=1, generator=generator, seed=seed)
        return torch.cat([p.flatten() for p in inv.mappers.parameters()])

    three = mappers(torch.Generator().manual_seed(3))
    assert torch.equal(three, mappers(torch.Generator().manual_seed(3)))
    assert not torch.equal(three, mappers(torch.Generator().manual_seed(4)))
    assert torch.equal(three, mappers(seed=3))  # a CPU generator seeded with s is seed=s
    assert torch.equal(torch.get_rng_state(), state)

    def generated(generator=None, **options):
        return editor.invert(None, SOURCE, method="generated", num_inference_steps=2, generator=generator, **options)

    g = generated(torch.Generator().manual_seed(7))
    assert torch.equal(g.z_T, generated(torch.Generator().manual_seed(7)).z_T)
    assert not torch.equal(g.z_T, generated(torch.Generator().manual_seed(8)).z_T)
    assert torch.equal(g.z_T, generated(generated_seed=7).z_T) and g.metadata["seed"] is None
    steps = []
    generated(callback_on_step_end=lambda pipe, i, t, kwargs: steps.append(i))  # generation denoises: called
    assert steps == [0, 1]


def test_torch_dtype_and_the_former_names(caplog):
    editor = StyleDiffusionEditor.from_pretrained("tiny", device="cpu", torch_dtype=torch.float32, progress=False)
    assert editor.bundle.dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="stylediffusion"):
        old = StyleDiffusionEditor.from_pretrained(model="tiny", device="cpu", dtype="float32", progress=False)
    assert old.bundle.dtype == torch.float32 and old.bundle.model_id == editor.bundle.model_id
    assert "model=...) is deprecated" in caplog.text
    # dtype= is current diffusers' own name for torch_dtype (0.42 deprecates torch_dtype): no warning for it
    assert "dtype=...) is deprecated" not in caplog.text
    with pytest.raises(UserError, match="both torch_dtype= and dtype="):
        StyleDiffusionEditor.from_pretrained("tiny", device="cpu", torch_dtype=torch.float32, dtype=torch.float32)


def test_style_transfer_takes_output_type_and_return_dict(editor):
    style = editor.invert(SCENE, "a red triangle", num_inference_steps=2, num_inner_steps=1)
    side = editor.bundle.image_size
    out = editor.transfer_style(style, SCENE, output_type="np")
    assert out.images.shape == (1, side, side, 3) and out.style_image.shape == (side, side, 3)
    assert out.grid().size[1] >= side
    latents = editor.transfer_style(style, SCENE, output_type="latent", return_dict=False)
    assert torch.equal(latents[0].cpu(), out.latents[0][1:]) and latents[2] is None
