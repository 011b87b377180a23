"""SDXL (stabilityai/stable-diffusion-xl-base-1.0) as users download it, reduced (tests/sdxl_layouts.py).

Checked against diffusers' own StableDiffusionXLPipeline where it defines the answer (prompt encoding,
pooled embedding, time ids); exactness checks that hold with random weights (DirectInversion
reconstructs the source latent, P2P with the source prompt as target reproduces the reconstruction,
DDIM inversion then sampling at w = 1 round-trips to float error); every inversion and edit of the
registry runs; the authors' two-step workflow runs across processes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import layouts
import pytest
import sdxl_layouts
import torch
import torch.nn.functional as F

from stylediffusion.editing import EditSpec
from stylediffusion.errors import UserError
from stylediffusion.methods import (
    EDITS,
    INVERSIONS,
    MethodContext,
    builtin,  # noqa: F401  (registers every method)
    run_method,
)
from stylediffusion.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}
T = 2
SPEC = EditSpec("a photo of a cat", "a photo of a dog")
FAST = {"nulltext_iterations": 1, "spdinv_rounds": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {"sdxl": sdxl_layouts.build_sdxl_folder(root / "sdxl-base-1.0"),
            "image_encoder": layouts.build_image_encoder(root / "clip-vit-base-patch16")}


@pytest.fixture(scope="module")
def xl(folders):
    from stylediffusion.models import load_models

    return load_models(str(folders["sdxl"]), str(folders["image_encoder"]))


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    return F.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, size=(64, 64), mode="bilinear")


def context(bundle, image, num_steps=T, **options) -> MethodContext:
    return MethodContext(bundle, image, SPEC.source, num_steps, TrainConfig(num_inner_steps=1), progress=False,
                         options={**FAST, **options})


@pytest.fixture(scope="module")
def inverted(xl, image):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = INVERSIONS[name].invert(context(xl, image))
        return cache[name]

    return get


def test_fixtures_are_the_hub_files():
    unet = layouts.hub_config("sdxl-base-1.0", "unet", "config.json")
    assert len(unet) == 47 and unet["addition_embed_type"] == "text_time"
    assert (unet["cross_attention_dim"], unet["projection_class_embeddings_input_dim"], unet["sample_size"]) == \
        (2048, 1280 + 6 * 256, 128)
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["attention_head_dim"] == [5, 10, 20]
    index = layouts.hub_config("sdxl-base-1.0", "model_index.json")
    assert index["force_zeros_for_empty_prompt"] is True and index["scheduler"][1] == "EulerDiscreteScheduler"
    assert {"text_encoder_2", "tokenizer_2"} <= set(index)
    assert layouts.hub_config("sdxl-base-1.0", "vae", "config.json")["scaling_factor"] == 0.13025
    second = layouts.hub_config("sdxl-base-1.0", "text_encoder_2", "config.json")
    assert (second["hidden_size"], second["projection_dim"], second["num_hidden_layers"]) == (1280, 1280, 32)


def test_folder_loads_as_sdxl_and_encodes_as_diffusers_does(folders, xl):
    """Family, scheduler, 70 transformer blocks; prompt embedding, pooled embedding and time ids equal to
    what StableDiffusionXLPipeline computes from the same folder."""
    from diffusers import StableDiffusionXLPipeline

    from stylediffusion.encoders import encode_prompts
    from stylediffusion.families import SDXL

    assert xl.family is SDXL and xl.text_encoder_2 is not None and xl.zero_empty_prompt
    assert type(xl.scheduler).__name__ == "DDIMScheduler"
    cfg = xl.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.steps_offset) == (0.00085, 0.012, "scaled_linear", 0)
    assert xl.image_size == 64 and "default size 64²" in xl.family.describe(xl)
    assert "VAE in float32" in xl.family.describe(xl).replace("model's VAE", "VAE")
    from ptp_utils import install_attention_control

    install_attention_control(xl.unet)
    layers = {p.index for p in xl.unet.attn_processors.values()}
    assert len(layers) == 70 and len(xl.unet.attn_processors) == 140

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folders["sdxl"]), use_safetensors=True,
                                                     torch_dtype=torch.float32)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a cat", device="cpu",
                                                                   do_classifier_free_guidance=True)
    ours = encode_prompts(xl, ["a photo of a cat", ""])
    assert ours.shape == (2, 78, 48)
    torch.testing.assert_close(ours[0, :77], embeds[0])
    torch.testing.assert_close(ours[0, 77, :32], pooled[0])
    assert ours[0, 77, 32:].abs().max() == 0
    assert negative.abs().max() == 0 and negative_pooled.abs().max() == 0 and ours[1].abs().max() == 0
    text, added = xl.family.unet_conditioning(xl, ours, (8, 8))
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                      text_encoder_projection_dim=32)
    torch.testing.assert_close(added["time_ids"], time_ids.expand(2, -1))
    torch.testing.assert_close(added["text_embeds"][0], pooled[0])
    assert text.shape == (2, 77, 48)


def test_fp16_variant_folder_is_the_same_model(folders, xl, tmp_path):
    from stylediffusion.models import load_models

    half = sdxl_layouts.build_sdxl_folder(tmp_path / "sdxl", weights="fp16_only")
    assert sorted(p.name for p in (half / "text_encoder_2").glob("*.safetensors")) == ["model.fp16.safetensors"]
    b = load_models(str(half), str(folders["image_encoder"]))
    assert b.fingerprint == xl.fingerprint and b.text_encoder_2.dtype == torch.float32


def test_directinv_reconstructs_the_source_latent(xl, image, inverted):
    inv = inverted("directinv")
    out = run_method(context(xl, image), SPEC, "directinv", "p2p", inverted=inv)
    assert F.mse_loss(out.latents[:1], inv.z0).item() < 1e-9 * inv.z0.pow(2).mean().item()


@pytest.mark.parametrize("inversion", ["ddim", "stylediffusion"])
def test_p2p_with_the_source_prompt_as_target_is_the_reconstruction(xl, image, inverted, inversion):
    same = EditSpec(SPEC.source, SPEC.source, "Replacement", tau_u=0.5)
    out = run_method(context(xl, image), same, inversion, "p2p", inverted=inverted(inversion))
    torch.testing.assert_close(out.latents[1], out.latents[0], rtol=0, atol=1e-5)


def test_ddim_inversion_then_sampling_at_w1_round_trips(xl, image):
    """Each DDIM step on SDXL's schedule (leading spacing, offset 0) is undone exactly by its inversion step
    given the same model output; the whole trajectory, where sampling meets the UNet at the inverted
    latents, round-trips to DDIM's discretisation error (on this fixture 4.0 % at T = 5, 4.9 % at T = 10,
    1.1 % at T = 50)."""
    from ptp_utils import BatchLayout
    from stylediffusion.ddim import DDIMSchedule
    from stylediffusion.encoders import encode_latent, encode_prompts
    from stylediffusion.sampling import ddim_inversion, guided_sampling, predict

    T = 5
    schedule = DDIMSchedule(xl.scheduler, T)
    z0 = encode_latent(xl, image)
    cond, uncond = encode_prompts(xl, [SPEC.source]), encode_prompts(xl, [""])
    traj = ddim_inversion(xl, schedule, z0, cond, record_maps=True, progress=False)
    # the mid-low layers, by resolution: latent/4 = 2x2 here (32x32 at 1024²): down_blocks.2 (2 x 10 blocks),
    # mid_block (10) and up_blocks.0 (3 x 10), 20 heads each
    assert len(traj.maps[0]) == 60 and all(m.shape == (1, 20, 4, 77) for m in traj.maps[0])
    for i in (0, T - 1):
        z_prev = traj.latents[T - 1 - i]
        eps = predict(xl, schedule, z_prev, i, cond, BatchLayout.single())
        there = schedule.invert_step(eps, z_prev, i)
        torch.testing.assert_close(there, traj.latents[T - i], rtol=0, atol=1e-6)
        torch.testing.assert_close(schedule.sample_step(eps, there, i), z_prev, rtol=0, atol=1e-5)
    back = guided_sampling(xl, schedule, traj.z_T, cond, uncond, 1.0)
    error = (back - z0).pow(2).mean() / z0.pow(2).mean()
    print(f"\nDDIM round trip at w = 1, T = {T}: relative MSE {error:.2e}")
    assert error < 0.1


@pytest.mark.parametrize("inversion", list(INVERSIONS))
def test_every_inversion_runs_and_edits_on_sdxl(xl, image, inverted, inversion):
    inv = inverted(inversion)
    edit = "p2p" if inversion in EDITS["p2p"].inversions else \
        next(name for name, e in EDITS.items() if inversion in e.inversions)
    out = run_method(context(xl, image), SPEC, inversion, edit, inverted=inv)
    assert out.latents.shape == (2, 4, 8, 8) and torch.isfinite(out.latents).all()


def test_pnp_takes_the_latent_4_level_on_sdxl(xl):
    """SDXL's decoder has no latent/8 block: PnP's level (latent/4) is its first block, up_blocks[0]."""
    from stylediffusion.methods.attention_edits import decoder_downscales, pnp_feature_module

    assert decoder_downscales(xl.unet) == [4, 2, 1]
    assert pnp_feature_module(xl.unet) is xl.unet.up_blocks[0].resnets[1].conv2


@pytest.mark.parametrize("edit", list(EDITS))
def test_every_edit_runs_on_sdxl(xl, image, inverted, edit):
    inversion = next(name for name in ("stylediffusion", "ddim", *INVERSIONS) if name in EDITS[edit].inversions)
    if EDITS[edit].families is not None and xl.family.name not in EDITS[edit].families:
        with pytest.raises(UserError, match=f"--edit {edit} is defined on .* not on SDXL") as err:
            run_method(context(xl, image), SPEC, inversion, edit, inverted=inverted(inversion))
        assert "\n" not in str(err.value)
        return
    out = run_method(context(xl, image), SPEC, inversion, edit, inverted=inverted(inversion))
    assert out.latents.shape == (2, 4, 8, 8) and torch.isfinite(out.latents).all()
    assert not torch.equal(out.latents[0], out.latents[1])


@pytest.mark.parametrize("spec", [
    EditSpec(SPEC.source, "a photo of a small dog", "Refinement"),
    EditSpec(SPEC.source, SPEC.source, "Reweight", eq_params={"words": ["cat"], "values": [2.0]}),
    EditSpec(SPEC.source, SPEC.target, "Replacement", blend_words=("cat", "dog"), tau_u=0.5),
], ids=["refinement", "reweight", "localblend_p2plus"])
def test_p2p_edit_types_on_sdxl(xl, image, inverted, spec):
    out = run_method(context(xl, image), spec, "stylediffusion", "p2p", inverted=inverted("stylediffusion"))
    assert torch.isfinite(out.latents).all() and not torch.equal(out.latents[0], out.latents[1])
    assert out.attention_maps is not None and out.attention_maps.shape[1:] == (4, 77)  # latent/4 = 2x2 queries


def test_stylediffusion_values_enter_2048_wide_cross_attention_through_the_bridge(xl, inverted):
    inv = inverted("stylediffusion")
    cfg = inv.mappers.cfg
    assert (cfg.text_tokens, cfg.text_width, cfg.image_width) == (77, 48, 32)
    assert isinstance(inv.mappers[0].bridge, torch.nn.Linear)
    from stylediffusion.encoders import encode_prompts

    text = encode_prompts(xl, [SPEC.source])
    values = inv.mappers[0](inv.image_features, text)
    assert values.shape == text.shape and torch.equal(values[:, 77], text[:, 77])  # the pooled row passes through


def test_from_pipe_sdxl_pipeline(folders, image):
    from diffusers import StableDiffusionXLPipeline

    from stylediffusion import StyleDiffusionEditor

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folders["sdxl"]), use_safetensors=True,
                                                     torch_dtype=torch.float32)
    processors = dict(pipe.unet.attn_processors)
    editor = StyleDiffusionEditor.from_pipe(pipe, image_encoder=str(folders["image_encoder"]), progress=False)
    assert editor.bundle.text_encoder_2 is pipe.text_encoder_2 and editor.bundle.zero_empty_prompt
    inv = editor.invert((image[0].permute(1, 2, 0) + 1) / 2, SPEC.source, method="ddim", num_inference_steps=T)
    out = editor.edit(inv, SPEC.target, blend_words=("cat", "dog"))
    assert out.images[0].size == (64, 64)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    pipe.vae.to(torch.float16)
    with pytest.raises(UserError, match="overflows"):
        StyleDiffusionEditor.from_pipe(pipe, image_encoder=str(folders["image_encoder"]))


def test_bfloat16_run(folders, image):
    from stylediffusion import StyleDiffusionEditor

    editor = StyleDiffusionEditor.from_pretrained(str(folders["sdxl"]), image_encoder=str(folders["image_encoder"]),
                                                  device="cpu", dtype="bfloat16", progress=False)
    b = editor.bundle
    assert b.unet.dtype == b.text_encoder_2.dtype == torch.bfloat16 and b.vae.dtype == torch.float32
    inv = editor.invert((image[0].permute(1, 2, 0) + 1) / 2, SPEC.source, num_inference_steps=1, num_inner_steps=1)
    out = editor.edit(inv, SPEC.target)
    assert all(torch.isfinite(lat).all() for lat in out.latents)


def test_vae_in_its_place_and_other_image_sizes(folders, xl, image):
    """``vae=`` (``--vae``) runs the given VAE in the run's dtype and says so; ``image_size=`` runs at another
    size with its own time ids, kept apart from the default size in the identity and the file names."""
    from stylediffusion import StyleDiffusionEditor
    from stylediffusion.models import load_models

    b = load_models(str(folders["sdxl"]), str(folders["image_encoder"]), dtype=torch.bfloat16,
                    vae=str(folders["sdxl"]))
    assert b.vae.dtype == torch.bfloat16 and f"VAE {folders['sdxl']} in bfloat16" in b.family.describe(b)
    with pytest.raises(UserError, match="--vae"):
        load_models(str(folders["sdxl"]), str(folders["image_encoder"]), vae=str(folders["sdxl"] / "missing"))
    with pytest.raises(UserError, match="multiple of 32"):
        load_models(str(folders["sdxl"]), str(folders["image_encoder"]), image_size=100)

    editor = StyleDiffusionEditor.from_pretrained(str(folders["sdxl"]), image_encoder=str(folders["image_encoder"]),
                                                  device="cpu", image_size=128, progress=False)
    big = editor.bundle
    assert big.image_size == 128 and big.label.endswith("-128px") and big.fingerprint != xl.fingerprint
    _, added = big.family.unet_conditioning(big, torch.zeros(1, 78, 48), (16, 16))
    assert added["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]]
    inv = editor.invert((image[0].permute(1, 2, 0) + 1) / 2, SPEC.source, method="ddim", num_inference_steps=T)
    out = editor.edit(inv, SPEC.target)
    assert out.latents[0].shape == (2, 4, 16, 16) and out.images[0].size == (128, 128)


def run_cli(*args, cwd, env=ENV):
    return subprocess.run([sys.executable, str(ROOT / "edit_w_ptp_v_clip.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_authors_two_step_workflow_across_processes_and_direct_mode(folders, tmp_path, capsys):
    """With the hub id read from a Hugging Face cache offline (as after one download): train case 1 in one
    process, edit every row of it (LocalBlend Replacement, Refinement with a per-word τ_c) in another
    without training again; then, from the local folder, a direct-mode Reweight with blend words."""
    import shutil

    cache, sha = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--stabilityai--stable-diffusion-xl-base-1.0"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(folders["sdxl"], repo / "snapshots" / sha)
    env = {**ENV, "HF_HUB_CACHE": str(cache)}
    common = ["--model", "stabilityai/stable-diffusion-xl-base-1.0", "--image_encoder", str(folders["image_encoder"]),
              "--idx", "1", "--num_ddim_steps", "2", "--num_inner_steps", "1", "--device", "cpu", "--progress", "False"]
    train = run_cli("--is_train", "True", *common, cwd=tmp_path, env=env)
    assert train.returncode == 0 and train.stderr == "", train.stderr
    assert "model: SDXL" in train.stdout and "the model's VAE in float32" in train.stdout
    ckpts = sorted((tmp_path / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in ckpts] == ["case1_stabilityai-stable-diffusion-xl-base-1.0_T2_K1.safetensors"]
    before = ckpts[0].stat().st_mtime_ns
    edit = run_cli("--is_train", "False", *common, "--outdir", "out", cwd=tmp_path, env=env)
    assert edit.returncode == 0, edit.stderr
    assert "training it first" not in edit.stdout + edit.stderr and ckpts[0].stat().st_mtime_ns == before
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*/edit.json"))]
    assert {r["edit_type"] for r in reports} == {"Replacement", "Refinement"}

    from stylediffusion.cli import main

    photo = ROOT / "data" / "images" / "chelsea.jpg"
    code = main(["--model", str(folders["sdxl"]), "--image_encoder", str(folders["image_encoder"]),
                 "--image_path", str(photo), "--prompt", "a photo of a cat", "--target", "a photo of a cat",
                 "--edit_type", "Reweight", "--eq_params", "{'words': ['cat'], 'values': [2]}",
                 "--blend_word", "cat cat", "--num_ddim_steps", "2", "--num_inner_steps", "1", "--progress", "False",
                 "--outdir", str(tmp_path / "direct"), "--checkpoint_dir", str(tmp_path / "checkpoints")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "direct" / "edit.json").read_text())["edit_type"] == "Reweight"
