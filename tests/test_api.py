"""The Python API: the README's notebook example as written (test-bed model and a borrowed pipeline),
save/load, the pipeline left as found, and bad input as UserError."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import BaseOutput
from PIL import Image

from stylediffusion import EditOutput, Inversion, StyleDiffusionEditor, UserError
from stylediffusion.editing import EditSpec
from stylediffusion.models import tiny_components

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "data" / "images" / "testbed_red_triangle.png"
PROMPT = "a large red triangle on a gray background"
FAST_STEPS = "num_inference_steps=4, num_inner_steps=2"


def readme_example() -> str:
    """The code block of the README's "Python API" section, with T and K made small for a test."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "num_inference_steps=30, num_inner_steps=100" in code
    return code.replace("num_inference_steps=30, num_inner_steps=100", FAST_STEPS)


def run_readme(code: str, where: Path, monkeypatch, namespace: dict | None = None) -> dict:
    monkeypatch.chdir(where)
    (where / "data").symlink_to(ROOT / "data")  # the example's relative image path, from the repository root
    namespace = dict(namespace or {})
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    for name in ("triangle.safetensors", "triangle.json", "blue_triangle.png", "reconstruction.png",
                 "attention_maps.png"):
        assert (where / name).is_file(), name
    out = namespace["out"]
    assert isinstance(out, EditOutput) and isinstance(out, BaseOutput) and len(out.images) == 2
    assert out["images"] is out.images and out.to_tuple()[0] is out.images
    arrays = namespace["arrays"]
    assert arrays.dtype == np.float32 and arrays.shape == (1, *out.images[0].size[::-1], 3)
    assert all(isinstance(im, Image.Image) for im in [*out.images, out.reconstruction, out.attention_maps])
    return namespace


def test_readme_example_runs_on_the_testbed_model(tmp_path, monkeypatch):
    ns = run_readme(readme_example(), tmp_path, monkeypatch)
    assert ns["out"].images[0].size == (32, 32)
    assert ns["inv"].method == "stylediffusion" and ns["inv"].num_steps == 4


def tiny_pipeline():
    from diffusers import StableDiffusionPipeline

    parts = tiny_components(seed=1)
    image_encoder = parts.pop("image_encoder")
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, image_encoder


def test_readme_example_runs_on_a_borrowed_pipeline_and_leaves_it_as_found(tmp_path, monkeypatch):
    pipe, image_encoder = tiny_pipeline()
    # a pipeline as a user may hold it: trainable weights, one frozen by hand, one module in train mode
    pipe.text_encoder.requires_grad_(True)
    next(pipe.unet.parameters()).requires_grad_(False)
    pipe.vae.decoder.train()
    modules = {"vae": pipe.vae, "unet": pipe.unet, "text_encoder": pipe.text_encoder, "image_encoder": image_encoder}
    processors = dict(pipe.unet.attn_processors)
    flags = {(k, n): p.requires_grad for k, m in modules.items() for n, p in m.named_parameters()}
    modes = {(k, n): s.training for k, m in modules.items() for n, s in m.named_modules()}
    pointers = {k: next(m.parameters()).data_ptr() for k, m in modules.items()}

    code = readme_example()
    line = 'editor = StyleDiffusionEditor.from_pretrained("testbed", torch_dtype=torch.float32)'
    assert line in code
    code = code.replace(line, "editor = StyleDiffusionEditor.from_pipe(pipe, image_encoder=image_encoder)")
    ns = run_readme(code, tmp_path, monkeypatch, {"pipe": pipe, "image_encoder": image_encoder})

    editor = ns["editor"]
    assert editor.bundle.unet is pipe.unet and editor.bundle.vae is pipe.vae  # shared, not copied
    assert {k: next(m.parameters()).data_ptr() for k, m in modules.items()} == pointers
    after = dict(pipe.unet.attn_processors)
    assert after.keys() == processors.keys() and all(after[k] is processors[k] for k in processors)
    assert not hasattr(pipe.unet, "_stylediffusion_state")
    assert {(k, n): p.requires_grad for k, m in modules.items() for n, p in m.named_parameters()} == flags
    assert {(k, n): s.training for k, m in modules.items() for n, s in m.named_modules()} == modes
    # training paid for no weight gradients: the borrowed weights were frozen while it ran
    assert all(p.grad is None for m in modules.values() for p in m.parameters())
    # and the pipeline still generates
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red square", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


@pytest.fixture
def editor(tiny):
    return StyleDiffusionEditor(tiny, progress=False)


TARGETS = ["a photo of a dog", "a photo of a tiger"]


@pytest.mark.parametrize("method,edit", [("stylediffusion", "p2p"), ("nulltext", "p2p"), ("proxnpi", "p2p"),
                                         ("directinv", "masactrl"), ("stylediffusion", "sdedit")])
def test_save_and_load_give_the_same_edit(editor, tmp_path, method, edit):
    image = np.asarray(Image.open(SCENE).convert("RGB"))
    options = {"nulltext_iterations": 2} if method == "nulltext" else {}
    inv = editor.invert(image, "a photo of a cat", method=method, num_inference_steps=3, num_inner_steps=2, **options)
    path = inv.save(tmp_path / "inv.safetensors")
    loaded = Inversion.load(path)
    assert loaded.method == method and loaded.source == "a photo of a cat" and loaded.num_steps == 3
    assert torch.equal(loaded.image, inv.image.cpu())
    first = editor.edit(inv, TARGETS, method=edit, generator=3)
    spec = EditSpec(inv.source, TARGETS[1], "Replacement")  # a target given as a spec: its own settings
    assert torch.equal(editor.edit(inv, spec, method=edit, generator=3).latents[0], first.latents[1])
    again = editor.edit(loaded, TARGETS, method=edit, generator=torch.Generator().manual_seed(3))
    assert len(first.images) == 2
    for a, b in zip(first.latents, again.latents):
        assert torch.equal(a, b)


def test_training_stays_in_memory_and_leaves_the_global_random_state_alone(editor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = torch.get_rng_state()
    inv = editor.invert(Image.open(SCENE), "a photo of a cat", num_inference_steps=2, num_inner_steps=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(tmp_path.rglob("*"))
    again = editor.invert(str(SCENE), "a photo of a cat", num_inference_steps=2, num_inner_steps=1)
    assert torch.equal(inv.z_T, again.z_T)
    for p, q in zip(inv.mappers.parameters(), again.mappers.parameters()):
        assert torch.equal(p, q)  # seeded the same way: the same networks


def test_checkpoint_argument_trains_once_like_the_command_line(editor, tmp_path):
    path = tmp_path / "ck" / "cat.safetensors"
    inv = editor.invert(SCENE, "a photo of a cat", num_inference_steps=2, num_inner_steps=1, checkpoint=path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    reloaded = editor.invert(SCENE, "a photo of a cat", num_inference_steps=2, num_inner_steps=1, checkpoint=path)
    assert torch.equal(reloaded.z_T, inv.z_T)
    with pytest.raises(UserError, match="different source prompt"):
        editor.invert(SCENE, "a photo of a dog", num_inference_steps=2, num_inner_steps=1, checkpoint=path)
    loaded = Inversion.load(path)  # the command line's file is Inversion.save's: one format
    assert torch.equal(loaded.z_T, inv.z_T) and loaded.source == "a photo of a cat" and loaded.num_steps == 2


def test_every_image_form_gives_the_same_pixels(editor):
    pil = Image.open(SCENE).convert("RGB")
    arr = np.asarray(pil)
    reference = editor._pixels(SCENE)
    for form in (str(SCENE), pil, arr, arr.astype(np.float32) / 255, torch.from_numpy(arr).permute(2, 0, 1)):
        assert torch.equal(editor._pixels(form), reference)


@pytest.fixture(scope="module")
def small_inversion(tiny):
    return StyleDiffusionEditor(tiny, progress=False).invert(SCENE, "a photo of a cat", method="ddim",
                                                             num_inference_steps=2)


@pytest.mark.parametrize("call,needle", [
    (lambda e, inv: e.invert("no/such/file.png", "a cat"), "does not exist"),
    (lambda e, inv: e.invert(42, "a cat"), "PIL image, a file path or an array"),
    (lambda e, inv: e.invert(np.full((8, 8, 3), 2.0), "a cat"), "[0, 1]"),
    (lambda e, inv: e.invert(SCENE, ""), "source prompt"),
    (lambda e, inv: e.invert(SCENE, "a cat " * 60), "tokens long"),
    (lambda e, inv: e.edit(inv, EditSpec("a photo of a dog", "a photo of a cat")), "not the inverted image's"),
    (lambda e, inv: e.invert(SCENE, "a cat", method="magic"), "unknown method='magic'"),
    (lambda e, inv: e.invert(SCENE, "a cat", num_inference_steps=0), "at least 1"),
    (lambda e, inv: e.invert(SCENE, "a cat", num_inference_steps=1001), "training timesteps"),
    (lambda e, inv: e.invert(SCENE, "a cat", guidance_scale=float("nan")), "guidance_scale"),
    (lambda e, inv: e.edit(inv, "a photo of a dog", guidance_scale=-1), "guidance_scale"),
    (lambda e, inv: e.edit(inv, "a photo of a dog", tau_v=2), "tau_v=2 is outside [0, 1]"),
    (lambda e, inv: e.edit(inv, "a photo of a dog", blend_words=("cat", "wolf")), "wolf"),
    (lambda e, inv: e.edit(inv, "a photo of a big dog", edit_type="Replacement"), "Replacement"),
    (lambda e, inv: e.edit(inv, "a photo of a dog", edit_type="Swap"), "edit_type='Swap' is not one of"),
    (lambda e, inv: e.edit(inv, []), "target prompt"),
    (lambda e, inv: e.edit(inv, "a photo of a dog", method="fancy"), "unknown method='fancy'"),
    (lambda e, inv: e.invert(SCENE, "a cat", nulltext_iteration=3), "nulltext_iteration= is not an option"),
    (lambda e, inv: e.edit(inv, "a photo of a dog", method="masactrl", masactrl_start_step=-2), "masactrl_start_step"),
    (lambda e, inv: e.edit("inv.safetensors", "a photo of a dog"), "needs an Inversion"),
    (lambda e, inv: Inversion.load("no/such/inversion.safetensors"), "does not exist"),
])
def test_bad_input_raises_user_error(editor, small_inversion, call, needle):
    with pytest.raises(UserError) as err:
        call(editor, small_inversion)
    assert isinstance(err.value, ValueError) and needle in str(err.value)


def test_pairs_and_models_are_checked_before_any_work(editor, small_inversion, tmp_path):
    nulltext = Inversion("nulltext", small_inversion.z0, small_inversion.z_T, source="a photo of a cat", num_steps=2)
    with pytest.raises(UserError, match="not a combination the literature defines"):
        editor.edit(nulltext, "a photo of a dog", method="masactrl")
    other = Inversion(**{**small_inversion.__dict__, "model": {"model_id": "x", "model_fingerprint": "0" * 16}})
    with pytest.raises(UserError, match="another model"):
        editor.edit(other, "a photo of a dog")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        Inversion.load(bad)
    with pytest.raises(UserError, match="safetensors"):
        small_inversion.save(tmp_path / "inv.pt")


def test_the_docs_example_method_is_one_class_and_one_line(editor):
    """docs/methods.md's "Adding a method" example, registered as its one line says, edits through the API."""
    from stylediffusion.methods import registry

    text = (ROOT / "docs" / "methods.md").read_text()
    code = re.search(r"## Adding a method.*?```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("from ..", "from stylediffusion.").replace("from .", "from stylediffusion.methods.")
    namespace = {}
    exec(compile(code, "docs/methods.md (Adding a method)", "exec"), namespace)
    registry.register(namespace["MyInversion"]())
    try:
        assert "mymethod" in registry.get_edit("p2p", "mymethod").inversions
        inv = editor.invert(SCENE, "a photo of a cat", method="mymethod", num_inference_steps=2, my_strength=0.25)
        assert inv.metadata == {"my_strength": 0.25}
        out = editor.edit(inv, "a photo of a dog")
        ddim = editor.invert(SCENE, "a photo of a cat", method="ddim", num_inference_steps=2)
        assert torch.equal(inv.z_T, ddim.z_T)
        plain = editor.edit(ddim, "a photo of a dog")
        assert not torch.allclose(out.latents[0], plain.latents[0])  # its hooks (half guidance) changed the edit
    finally:  # the registry as it was
        registry.INVERSIONS.pop("mymethod", None)
        registry.OPTIONS.pop("my_strength", None)


def test_a_half_precision_pipeline_is_borrowed_as_it_is():
    """A bfloat16 pipeline (VAE included) is used in its own dtype: nothing is cast or copied."""
    pipe, image_encoder = tiny_pipeline()
    pipe.to(dtype=torch.bfloat16)
    image_encoder.to(dtype=torch.bfloat16)
    editor = StyleDiffusionEditor.from_pipe(pipe, image_encoder=image_encoder, progress=False)
    inv = editor.invert(SCENE, "a red triangle", num_inference_steps=2, num_inner_steps=1)
    out = editor.edit(inv, "a blue triangle", tau_u=0.5)
    assert editor.bundle.dtype == torch.bfloat16 and inv.z0.dtype == torch.float32  # DDIM math stays in fp32
    assert pipe.vae.dtype == pipe.unet.dtype == torch.bfloat16
    assert out.images[0].size == (64, 64) and np.asarray(out.images[0]).std() > 0
