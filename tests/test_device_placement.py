"""What a first CUDA user meets, checked on the CPU with the meta device standing in for the GPU
(tests/device_standin.py): no tensor made on the wrong device (the command line, the API, the demo
and a runner end to end), no host -> device copy per step in the hot loops, borrowed pipelines with
accelerate's offload hooks or a compiled UNet, one dtype for every component, the default dtype by
what the GPU computes natively, and a missing GPU or out-of-memory answered with one line."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from device_standin import MetaStandsInForCuda

from stylediffusion import StyleDiffusionEditor, UserError
from stylediffusion.models import check_device, load_models, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "data" / "images" / "testbed_red_triangle.png"
SOURCE, TARGET = "a red triangle", "a blue triangle"
META = torch.device("meta")


def on_meta(bundle):
    """A copy of ``bundle`` whose frozen models live on the meta device (shapes only)."""
    parts = {k: copy.deepcopy(getattr(bundle, k)).to(META) for k in ("vae", "unet", "text_encoder", "image_encoder")}
    return dataclasses.replace(bundle, **parts, device=META)


@pytest.fixture(scope="module")
def meta_editor(tiny):
    return StyleDiffusionEditor(on_meta(tiny), progress=False)


def invert_and_edit(editor, inversion: str, edit: str, num_steps: int, **options) -> MetaStandsInForCuda:
    with MetaStandsInForCuda() as run:
        inv = editor.invert(None if inversion == "generated" else SCENE, SOURCE, method=inversion,
                            num_inference_steps=num_steps, num_inner_steps=2, **options)
        out = editor.edit(inv, TARGET, method=edit, tau_u=0.5, blend_words=("triangle", "triangle"))
    assert out.images[0].size == (64, 64)  # stand-in pixels: black, but every step ran
    return run


# ---------------------------------------------------------------------------------------------- hot loops
@pytest.mark.parametrize("inversion, edit, options", [
    ("stylediffusion", "p2p", {}), ("directinv", "p2p", {}), ("nulltext", "p2p", {"nulltext_iterations": 1}),
    ("spdinv", "pnp", {"spdinv_rounds": 1}), ("ddim", "masactrl", {})])
def test_no_host_to_device_copy_per_step(meta_editor, inversion, edit, options):
    """Every run copies its inputs to the device once (image, token ids, the schedule, an edit's
    word maps); a loop that copies per step (DDIM levels, the UNet's timestep, P2P's alphas in every
    controlled layer) makes more copies at T=2 than at T=1. Mixing devices fails on meta outright."""
    short, long = (invert_and_edit(meta_editor, inversion, edit, T, **options) for T in (1, 2))
    assert len(long.copies) == len(short.copies), "\n".join(map(str, long.copies))
    assert len(long.copies) <= 24, "\n".join(map(str, long.copies))


def test_sampling_takes_latents_from_the_host(meta_editor):
    """``guided_sampling`` / ``predict`` move their inputs to the model's device (the test bed passes CPU tensors)."""
    from stylediffusion.ddim import DDIMSchedule
    from stylediffusion.sampling import guided_sampling

    bundle = meta_editor.bundle
    text = torch.zeros(1, 77, bundle.text_encoder.config.hidden_size)
    with MetaStandsInForCuda():
        z = guided_sampling(bundle, DDIMSchedule(bundle.scheduler, 2), torch.zeros(1, 4, 16, 16), text, text, 7.5)
    assert z.device == META


# ---------------------------------------------------------------------------------------------- surfaces
def test_the_command_line_runs_on_the_stand_in_device(tiny, monkeypatch, tmp_path, capsys):
    from stylediffusion.cli import main

    monkeypatch.setattr("stylediffusion.models.tiny_components", lambda seed=0: copy.deepcopy(_parts(tiny)))
    out = tmp_path / "out"
    with MetaStandsInForCuda():
        code = main(["--model", "tiny", "--device", "meta", "--image_path", str(SCENE), "--prompt", SOURCE,
                     "--target", TARGET, "--blend_word", "triangle triangle", "--tau_u", "0.5", "--num_ddim_steps",
                     "2", "--num_inner_steps", "1", "--progress", "False", "--outdir", str(out),
                     "--checkpoint_dir", str(tmp_path / "ck")])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == "", captured.err
    assert json.loads((out / "edit.json").read_text())["target"] == TARGET
    assert (out / "edited.png").is_file() and any((tmp_path / "ck").glob("*.safetensors"))


def test_the_demo_runs_on_the_stand_in_device(meta_editor, tmp_path):
    from PIL import Image

    from stylediffusion.app import DemoApp

    app = DemoApp(meta_editor, tmp_path / "cache")
    with Image.open(SCENE) as img, MetaStandsInForCuda():
        img.load()
        app.invert(img, SOURCE, "directinv", 2, 1)
        result = app.edit(img, SOURCE, "directinv", 2, 1, TARGET, tau_u=0.5)
    assert [target for _, target in result.edits] == [TARGET]


def test_a_runner_runs_on_the_stand_in_device(tiny, monkeypatch, tmp_path):
    from stylediffusion.bench.__main__ import main

    monkeypatch.setattr("stylediffusion.models.tiny_components", lambda seed=0: copy.deepcopy(_parts(tiny)))
    with MetaStandsInForCuda():
        code = main(["reproduce", "--model", "tiny", "--device", "meta", "--idx", "0", "--num_ddim_steps", "2",
                     "--num_inner_steps", "1", "--inversion", "ddim", "--outdir", str(tmp_path / "rep")])
    assert code in (0, None)
    assert (tmp_path / "rep" / "reproduce.csv").is_file()


# ---------------------------------------------------------------------------------------------- from_pipe
def tiny_pipe(tiny):
    from diffusers import StableDiffusionPipeline

    parts = {k: copy.deepcopy(getattr(tiny, k)) for k in ("vae", "unet", "text_encoder")}
    # a user's pipeline has never had the toolkit's processors; the shared ``tiny`` UNet may have (other tests)
    if hasattr(parts["unet"], "_stylediffusion_state"):
        del parts["unet"]._stylediffusion_state
    pipe = StableDiffusionPipeline(**parts, tokenizer=tiny.tokenizer, scheduler=copy.deepcopy(tiny.scheduler),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, copy.deepcopy(tiny.image_encoder)


def test_from_pipe_of_a_model_offloaded_pipeline_runs_on_the_hooks_device(tiny, monkeypatch):
    """``enable_model_cpu_offload`` keeps the weights on the CPU between calls and accelerate's hooks
    move each model to the execution device (here the stand-in GPU) when it runs: the work, the
    mapping networks' gradients included, happens there, and the pipeline is offloaded again after."""
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    monkeypatch.setattr(pipeline_utils, "empty_device_cache", lambda *args: None)  # there is no torch.meta module
    pipe, image_encoder = tiny_pipe(tiny)
    with MetaStandsInForCuda():
        pipe.enable_model_cpu_offload(device="meta")
        assert next(pipe.unet.parameters()).device.type == "cpu"
        editor = StyleDiffusionEditor.from_pipe(pipe, image_encoder=image_encoder.to(META), progress=False)
        assert editor.bundle.device.type == "meta"
        inv = editor.invert(SCENE, SOURCE, num_inference_steps=2, num_inner_steps=1)
        editor.edit(inv, TARGET, tau_u=0.5)
    assert not hasattr(pipe.unet, "_stylediffusion_state")
    assert all(hasattr(m, "_hf_hook") for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    assert next(pipe.unet.parameters()).device.type == "cpu"  # offloaded again, as after pipe(...)


def test_from_pipe_of_a_sequentially_offloaded_pipeline_takes_the_hooks_device(tiny):
    """``enable_sequential_cpu_offload`` leaves the weights on the meta device: the device to compute
    on is the hooks' (here the CPU). (Running it is left to the GPU script: accelerate 1.16's
    sequential offload fails on a CPU execution device before this toolkit is involved.)"""
    from accelerate import cpu_offload

    pipe, image_encoder = tiny_pipe(tiny)
    pipe.enable_sequential_cpu_offload(device="cpu")
    cpu_offload(image_encoder, execution_device=torch.device("cpu"))
    assert next(pipe.unet.parameters()).device.type == "meta"
    editor = StyleDiffusionEditor.from_pipe(pipe, image_encoder=image_encoder, progress=False)
    assert editor.bundle.device.type == "cpu"


def test_from_pipe_of_a_compiled_unet_uses_the_module_it_wraps(tiny):
    pipe, image_encoder = tiny_pipe(tiny)
    unet = pipe.unet
    pipe.unet = torch.compile(unet)  # diffusers' speed recipe; nothing compiles until it is called
    processors = dict(unet.attn_processors)
    editor = StyleDiffusionEditor.from_pipe(pipe, image_encoder=image_encoder, progress=False)
    assert editor.bundle.unet is unet
    editor.edit(editor.invert(SCENE, SOURCE, method="ddim", num_inference_steps=2), TARGET)
    assert pipe.unet._orig_mod is unet and dict(unet.attn_processors) == processors


def test_from_pipe_refuses_an_image_encoder_on_another_device(tiny):
    pipe, image_encoder = tiny_pipe(tiny)
    pipe.enable_sequential_cpu_offload(device="meta")
    with pytest.raises(UserError, match=r"image encoder runs on cpu and the pipeline's UNet on meta"):
        StyleDiffusionEditor.from_pipe(pipe, image_encoder=image_encoder)


# ---------------------------------------------------------------------------------------------- dtypes
def test_float32_casts_every_component_of_a_folder_saved_in_float16(tiny, tmp_path):
    pipe, image_encoder = tiny_pipe(tiny)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "sd")
    image_encoder.to(torch.float16).save_pretrained(tmp_path / "sd" / "image_encoder")
    bundle = load_models(str(tmp_path / "sd"), dtype=torch.float32)
    assert {k: getattr(bundle, k).dtype for k in ("vae", "unet", "text_encoder", "image_encoder")} == \
        dict.fromkeys(("vae", "unet", "text_encoder", "image_encoder"), torch.float32)


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((7, 0), torch.float16)])
def test_auto_dtype_is_bfloat16_only_where_the_gpu_computes_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert resolve_dtype("auto", "cuda:0") == expected
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("float32", "cuda") == torch.float32


def test_float16_autocast_trains_with_loss_scaling(tiny):
    from stylediffusion.training import gradient_scaler

    assert gradient_scaler(dataclasses.replace(tiny, autocast_dtype=torch.float16)).is_enabled()
    assert not gradient_scaler(dataclasses.replace(tiny, autocast_dtype=torch.bfloat16)).is_enabled()
    assert not gradient_scaler(tiny).is_enabled()


def test_the_torch_floor_is_what_the_code_needs():
    """``torch.amp.GradScaler(device)`` (float16 loss scaling) is torch 2.3+."""
    floors = [re.search(r'^\s*"?torch>=([\d.]+)', (ROOT / name).read_text(), re.M).group(1)
              for name in ("pyproject.toml", "requirements.txt")]
    assert all(tuple(int(x) for x in f.split(".")) >= (2, 3) for f in floors), floors


def test_edited_maps_multiply_the_values_in_float32():
    """In bfloat16, a layer whose maps a controller reads or edits multiplies the float32 maps with the
    values (rounding them to bf16 first changed 36 % of this layer's outputs, and made DirectInversion's
    edit pass drift from the pass its offsets were computed with)."""
    from diffusers.models.attention_processor import Attention

    from stylediffusion.attention_control import (
        AttentionController,
        AttentionState,
        BatchLayout,
        ControlledAttnProcessor,
    )

    class ReadEveryMap(AttentionController):
        def needs_maps(self, place, state):
            return True

    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16).to(torch.bfloat16)
    state = AttentionState(controller=ReadEveryMap())
    state.set(step=0, layout=BatchLayout.single(), latent_hw=(8, 8))
    attn.set_processor(ControlledAttnProcessor("layer", 0, state))
    x, context = torch.randn(1, 64, 64, dtype=torch.bfloat16), 3 * torch.randn(1, 77, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=context)
        q, k, v = (lin(h).view(1, -1, 4, 16).transpose(1, 2)
                   for lin, h in ((attn.to_q, x), (attn.to_k, context), (attn.to_v, context)))
        probs = (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(-1)
        def project(o):
            return attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(1, 64, 64).to(torch.bfloat16)))
        assert torch.equal(out, project(probs @ v.float()))
        assert not torch.equal(out, project(probs.to(torch.bfloat16) @ v))  # what rounding the maps gives


def test_in_bfloat16_an_edit_pass_computes_the_source_row_the_inversion_computed(tiny):
    """The layers P2P may read compute explicit float32 attention whether or not a controller reads them, so the
    source row of a bf16 edit gets the noise prediction the inversion (no controller) got, bit for bit
    (DirectInversion's offsets assume exactly that). Rounded fused attention moved it by ~3 %."""
    from stylediffusion.attention_control import BatchLayout, controlled, install_attention_control
    from stylediffusion.ddim import DDIMSchedule
    from stylediffusion.editing import EditSpec, build_controller
    from stylediffusion.sampling import predict

    bundle = dataclasses.replace(tiny, unet=copy.deepcopy(tiny.unet).to(torch.bfloat16), dtype=torch.bfloat16)
    schedule = DDIMSchedule(bundle.scheduler, 10)
    torch.manual_seed(0)
    z, text = torch.randn(4, 4, 16, 16), torch.randn(4, 77, 32)
    controller = build_controller(EditSpec(SOURCE, TARGET, tau_u=0.5), bundle.tokenizer, 10)
    with torch.no_grad():
        plain = predict(bundle, schedule, z, 2, text, BatchLayout.guided(2))
        with controlled(install_attention_control(bundle.unet), controller):
            edited = predict(bundle, schedule, z, 2, text, BatchLayout.guided(2))
    source_rows = [0, 2]  # uncond source, cond source
    assert torch.equal(plain[source_rows], edited[source_rows])
    assert not torch.equal(plain[[1, 3]], edited[[1, 3]])  # the target rows were edited


# ---------------------------------------------------------------------------------------------- one line
def test_a_gpu_the_machine_lacks_is_one_line(monkeypatch, tmp_path, capsys):
    from stylediffusion.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"cuda:7.*shows 2 CUDA GPUs \(cuda:0 \.\.\. cuda:1\)"):
        check_device("cuda:7")
    assert check_device("cuda:1") == torch.device("cuda:1")
    code = main(["--model", "tiny", "--device", "cuda:7", "--image_path", str(SCENE), "--prompt", SOURCE,
                 "--target", TARGET, "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --device 'cuda:7'"), err
    with pytest.raises(UserError, match="pick one of those"):
        StyleDiffusionEditor.from_pretrained("tiny", device="cuda:7")


def test_out_of_memory_is_one_line_saying_what_to_lower(tiny, monkeypatch, tmp_path, capsys):
    import stylediffusion.sampling as sampling
    from stylediffusion.cli import main

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sampling, "predict", no_memory)  # what ddim_inversion calls
    editor = StyleDiffusionEditor(tiny, progress=False)
    with pytest.raises(UserError, match=r"ran out of memory.*--dtype.*resolution.*offload"):
        editor.invert(SCENE, SOURCE, method="ddim", num_inference_steps=2)
    monkeypatch.setattr("stylediffusion.models.tiny_components", lambda seed=0: _parts(tiny))
    code = main(["--model", "tiny", "--inversion", "ddim", "--image_path", str(SCENE), "--prompt", SOURCE,
                 "--target", TARGET, "--num_ddim_steps", "2", "--outdir", str(tmp_path / "out"), "--progress", "False"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ran out of memory" in err[0] and "--dtype" in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def _parts(bundle) -> dict:
    return {k: getattr(bundle, k) for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler", "image_encoder")}
