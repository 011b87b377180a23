"""SPDInv + ELITE on components with random weights in the authors' layout (reduced widths).

ELITE's own weights cannot be had here, so the mapping networks are random ``EliteMapper``s with the
authors' state-dict keys (``mapping_0.0.weight`` ... ``<layer>_attn2_to_v.weight``), saved with
``torch.save`` as the authors' ``.pt`` files are, and converted by ``stylediffusion.convert_elite``.
The CLIP vision tower has ViT-L/14's geometry (224 px, 14 px patches: 256 patch tokens) at a reduced
width and depth, saved as a local transformers folder. Checked: the conversion round trip and its
refusals (a pickle carrying code never runs), the placeholder's embedding reaching the UNet, the local
values confined to the object mask and to the conditional target row, the edit end to end (CLI and API),
one-line refusals of bad flags and files, and on the test bed that ELITE's word path is the text path.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from stylediffusion import elite
from stylediffusion.attention_control import BatchLayout, controlled, install_attention_control
from stylediffusion.convert_elite import main as convert_main
from stylediffusion.errors import UserError
from stylediffusion.methods import EDITS, INVERSIONS, MethodContext, run_method
from stylediffusion.methods.elite import load_components

ROOT = Path(__file__).resolve().parent.parent
SOURCE, TARGET = "a photo of a cat", "a photo of a white *"


def vision_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, image_size=224, patch_size=14,
                                            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16))


def random_mapper(bundle, kind: str, vision_width: int = 32, seed: int = 0) -> elite.EliteMapper:
    torch.manual_seed(seed)
    layers = elite.unet_cross_attention_layers(bundle.unet)
    return elite.EliteMapper(kind=kind, input_dim=vision_width, hidden_dim=16,
                             output_dim=int(bundle.text_encoder.config.hidden_size),
                             attention_layers=tuple(layers), attention_widths=tuple(layers.values()))


def convert(args: list, capsys) -> tuple[int, str]:
    code = convert_main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """Authors'-layout .pt files for the tiny model, converted; the vision tower folder; a reference and mask."""
    folder = tmp_path_factory.mktemp("elite")
    vision_tower().save_pretrained(folder / "clip-vit-large-patch14", safe_serialization=True)
    unet_config = folder / "unet_config.json"
    unet_config.write_text(json.dumps(dict(tiny.unet.config)))
    files = {}
    for kind in ("global", "local"):
        mapper = random_mapper(tiny, kind, seed=1 if kind == "global" else 2)
        torch.save(mapper.state_dict(), folder / f"{kind}_mapper.pt")
        assert convert_main([str(folder / f"{kind}_mapper.pt"), str(folder / f"elite_{kind}.safetensors"),
                             "--unet_config", str(unet_config)]) == 0
        files[kind] = folder / f"elite_{kind}.safetensors"
    g = torch.Generator().manual_seed(0)
    image = F.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, size=(64, 64), mode="bilinear")
    Image.fromarray(((image[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(folder / "cat.png")
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask.numpy()).save(folder / "mask.png")
    return {"folder": folder, "unet_config": unet_config, "image": image, "mask": folder / "mask.png",
            "encoder": str(folder / "clip-vit-large-patch14"), **files}


def options(setup, **extra) -> dict:
    return {"elite_global": str(setup["global"]), "elite_image_encoder": setup["encoder"], **extra}


def test_official_layout_keys(tiny):
    keys = set(random_mapper(tiny, "global").state_dict())
    assert {"mapping_0.0.weight", "mapping_0.1.weight", "mapping_0.3.bias", "mapping_0.4.weight",
            "mapping_0.6.bias", "mapping_patch_4.6.weight"} <= keys
    assert "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.weight" in keys
    assert "mid_block_attentions_0_transformer_blocks_0_attn2_to_v.weight" in keys
    assert len(keys) == 10 * 10 + 2 * len(elite.unet_cross_attention_layers(tiny.unet))
    assert elite.feature_layers(24) == (24, 4, 8, 12, 16)  # ELITE's layers of ViT-L/14
    # the default expectation is SD v1's 16 cross-attention layers, ELITE's own widths
    from stylediffusion.convert_elite import expected_layers

    sd1 = expected_layers(None)
    assert len(sd1) == 16 and sd1["down_blocks_0_attentions_0_transformer_blocks_0_attn2"] == 320
    assert sd1["mid_block_attentions_0_transformer_blocks_0_attn2"] == 1280


def test_conversion_round_trip(setup):
    for kind in ("global", "local"):
        original = torch.load(setup["folder"] / f"{kind}_mapper.pt", weights_only=True)
        with safe_open(str(setup[kind]), framework="pt") as f:
            meta = f.metadata()
            converted = {k: f.get_tensor(k) for k in f.keys()}
        assert converted.keys() == original.keys()
        assert all(torch.equal(converted[k], original[k]) for k in original)
        assert meta["format"] == elite.FORMAT and meta["kind"] == kind and meta["source"] == f"{kind}_mapper.pt"
        mapper = elite.read_mapper(setup[kind], kind, "--elite_x")
        assert all(torch.equal(v, original[k]) for k, v in mapper.state_dict().items())


def test_pickle_payload_never_runs(setup, tmp_path, capsys):
    class Payload:  # unpickling it calls open(marker, "w"): it would create the marker file
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return open, (str(self.marker), "w")

    state = torch.load(setup["folder"] / "global_mapper.pt", weights_only=True)
    live, evil = tmp_path / "live_marker", tmp_path / "evil_marker"
    torch.save({**state, "mapping_0.0.weight": Payload(live)}, tmp_path / "live_global.pt")
    torch.load(tmp_path / "live_global.pt", weights_only=False)  # an unrestricted load runs the payload...
    assert live.exists()
    torch.save({**state, "mapping_0.0.weight": Payload(evil)}, tmp_path / "evil_global.pt")
    code, err = convert([tmp_path / "evil_global.pt", tmp_path / "out.safetensors", "--unet_config",
                         setup["unet_config"]], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "nothing was run" in err
    assert not evil.exists() and not (tmp_path / "out.safetensors").exists()  # ...the converter's does not


@pytest.mark.parametrize("case", ["list", "nested", "not_a_tensor", "garbage", "missing", "extra", "shape",
                                  "layers", "ints", "no_kind", "nan"])
def test_conversion_refuses(setup, tmp_path, capsys, case):
    state = torch.load(setup["folder"] / "global_mapper.pt", weights_only=True)
    key = "mapping_3.4.weight"
    payload = {
        "list": [state[key]],
        "nested": {"mapper": state},
        "not_a_tensor": {**state, key: 3.0},
        "missing": {k: v for k, v in state.items() if k != key},
        "extra": {**state, "mapping_5.0.weight": state["mapping_0.0.weight"]},
        "shape": {**state, key: state[key][:-1]},
        "ints": {**state, key: state[key].long()},
        "nan": {**state, key: torch.full_like(state[key], float("nan"))},
    }.get(case, state)
    name = "mapper.pt" if case == "no_kind" else "global_mapper.pt"
    src = tmp_path / name
    if case == "garbage":
        src.write_bytes(b"PK\x03\x04 not a torch file")
    else:
        torch.save(payload, src)
    args = [src, tmp_path / "out.safetensors"] + ([] if case == "layers" else ["--unet_config", setup["unet_config"]])
    code, err = convert(args, capsys)
    print(err)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "out.safetensors").exists()
    if case == "layers":  # the tiny UNet's layers are not SD v1's
        assert "Stable Diffusion v1.x" in err
    if case == "nan":  # refused at conversion, not later at run time with "convert it again"
        assert "NaN or infinite" in err


def test_runtime_reads_only_converted_safetensors(setup, tiny, tmp_path):
    spec_opts = [({"elite_global": str(setup["folder"] / "global_mapper.pt")}, "never loads pickles"),
                 ({"elite_global": str(tmp_path / "absent.safetensors")}, "convert_elite"),
                 ({"elite_global": str(setup["local"])}, "global mapper"),
                 ({"elite_local": str(setup["local"])}, "--elite_mask"),
                 ({"elite_mask": str(setup["mask"])}, "--elite_local"),
                 ({"elite_placeholder": "two words"}, "one word")]
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    spec_opts.append(({"elite_global": str(tmp_path / "plain.safetensors")}, "not ELITE's global mapper"))
    from stylediffusion.editing import EditSpec

    for extra, words in spec_opts:
        with pytest.raises(UserError, match=words.replace("*", r"\*")):
            EDITS["elite"].check(EditSpec(SOURCE, TARGET, "Refinement"), {**options(setup), **extra})
    with pytest.raises(UserError, match="no placeholder"):
        EDITS["elite"].check(EditSpec(SOURCE, "a photo of a dog", "Replacement"), options(setup))


def test_placeholder_embedding_reaches_unet(setup, tiny):
    from stylediffusion.editing import EditSpec
    from stylediffusion.encoders import encode_prompts

    spec = EditSpec(SOURCE, TARGET, "Refinement", tau_c=0.4)
    ctx = MethodContext(tiny, setup["image"], SOURCE, 3, progress=False, options=options(setup))
    inv = INVERSIONS["ddim"].invert(ctx)
    seen = []
    handle = tiny.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        run_method(ctx, spec, "ddim", "elite", inverted=inv)
    finally:
        handle.remove()
    position = elite.placeholder_position(TARGET, "*", tiny.tokenizer)
    plain = encode_prompts(tiny, [TARGET])[0]
    assert len(seen) == 3
    for text in seen:
        target_row = text[BatchLayout.guided(2).row("cond", 1)]
        assert torch.allclose(target_row[:position], plain[:position])  # causal: the words before are untouched
        assert (target_row[position] - plain[position]).abs().max() > 1e-3  # the placeholder carries ELITE's word
        assert torch.allclose(text[2], encode_prompts(tiny, [SOURCE])[0])  # the source row is the plain source
    parts = load_components(ctx)
    word = parts["global"](elite.image_hidden_states(parts["encoder"], setup["image"]))[0, 0]
    assert torch.allclose(seen[0][3], elite.encode_with_word(tiny, TARGET, position, word)[0])


def local_values(setup, tiny, reference, lam=1.0):
    from stylediffusion.image_io import load_image

    ctx = MethodContext(tiny, reference, SOURCE, 3, progress=False,
                        options=options(setup, elite_local=str(setup["local"]), elite_mask=str(setup["mask"])))
    parts = load_components(ctx)
    mask = load_image(setup["mask"], tiny.image_size)[0].mean(1, keepdim=True) > 0
    obj = (reference + 1) * mask - 1
    tokens = parts["local"](elite.image_hidden_states(parts["encoder"], obj)) * elite.patch_mask(mask, parts["encoder"])
    return elite.LocalValues(tokens, parts["local"], lam), parts, mask


def test_local_values_only_in_the_mask_and_the_target_row(setup, tiny):
    image = setup["image"]
    local, parts, mask = local_values(setup, tiny, image)
    inside = elite.patch_mask(mask, parts["encoder"])[0, :, 0] > 0
    assert 0 < int(inside.sum()) < inside.numel()
    assert local.tokens[0, ~inside].abs().max() == 0 and local.tokens[0, inside].abs().min() > 0
    # a reference that differs only outside the mask gives the same local values
    changed = torch.where(mask, image, -image)
    assert torch.equal(local_values(setup, tiny, changed)[0].tokens, local.tokens)

    from stylediffusion.attention_control import AttentionController
    from stylediffusion.encoders import encode_prompts

    state = install_attention_control(tiny.unet)
    text = torch.cat([encode_prompts(tiny, [""]).expand(2, -1, -1), encode_prompts(tiny, [SOURCE, TARGET])])
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    position = elite.placeholder_position(TARGET, "*", tiny.tokenizer)

    def unet(local_part, projections=None):
        controller = elite.EliteAttention(AttentionController(), position, projections, local_part)
        controller.step_text = text
        state.set(step=0, layout=BatchLayout.guided(2), latent_hw=(16, 16), num_steps=1)
        with controlled(state, controller), torch.no_grad():
            return tiny.unet(z, torch.tensor(500), encoder_hidden_states=text).sample

    plain = unet(None)
    with_local = unet(local)
    assert torch.allclose(with_local[:3], plain[:3], atol=1e-6)  # source rows and the unconditional target
    assert (with_local[3] - plain[3]).abs().max() > 1e-4  # only the conditional target row reads them
    assert torch.allclose(unet(elite.LocalValues(local.tokens, local.mapper, 0.0))[3], plain[3], atol=1e-6)
    assert torch.allclose(unet(elite.LocalValues(torch.zeros_like(local.tokens), local.mapper, 1.0))[3], plain[3],
                          atol=1e-6)  # an empty mask adds nothing
    from stylediffusion.methods.elite import UNetProjections

    # the target rows' keys/values recomputed with the UNet's own projections are the UNet's
    assert torch.allclose(unet(None, UNetProjections(tiny.unet)), plain, atol=1e-5)
    elite_kv = unet(None, parts["global"])  # ELITE's projections change the target rows only
    assert torch.allclose(elite_kv[[0, 2]], plain[[0, 2]], atol=1e-6)
    assert (elite_kv[[1, 3]] - plain[[1, 3]]).abs().max() > 1e-4


def test_edit_end_to_end_cli(setup, tmp_path, capsys):
    from stylediffusion.cli import main

    out = tmp_path / "out"
    argv = ["--model", "tiny", "--edit", "elite",
            "--image_path", str(setup["folder"] / "cat.png"), "--prompt", SOURCE, "--target", TARGET,
            "--elite_global", str(setup["global"]), "--elite_local", str(setup["local"]),
            "--elite_mask", str(setup["mask"]), "--elite_lambda", "0.8", "--elite_image_encoder", setup["encoder"],
            "--num_ddim_steps", "3", "--method_option", "spdinv_rounds=2", "--tau_c", "0.4",
            "--edit_type", "Refinement", "--outdir", str(out), "--checkpoint_dir", str(tmp_path / "ck"),
            "--progress", "False"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "edit.json").read_text())
    assert report["inversion"] == "spdinv" and report["edit"] == "elite"  # SPDInv is ELITE's default inversion
    assert (out / "edited.png").is_file() and (out / "attention_maps.png").is_file()
    capsys.readouterr()
    bad = {"--elite_lambda": "-1", "--elite_word": "7", "--elite_projections": "both",
           "--elite_global": str(setup["folder"] / "global_mapper.pt"), "--elite_mask": str(tmp_path / "none.png"),
           "--target": "a photo of a white dog"}
    for flag, value in bad.items():
        k = argv.index(flag) if flag in argv else len(argv)
        try:
            code = main(argv[:k] + [flag, value] + argv[k + 2:])
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (flag, err)
    code = main(["--model", "tiny", "--image_path", str(setup["folder"] / "cat.png"), "--prompt", SOURCE,
                 "--target", "a photo of a dog", "--elite_lambda", "0.5", "--outdir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "not an option of stylediffusion + p2p" in err  # an ELITE flag for another edit
    assert not (tmp_path / "p").exists()


def test_api_edit_any_inversion(setup, tiny):
    from stylediffusion import StyleDiffusionEditor

    editor = StyleDiffusionEditor(tiny, progress=False)
    inv = editor.invert(setup["folder"] / "cat.png", SOURCE, method="npi", num_inference_steps=3)
    out = editor.edit(inv, TARGET, method="elite", edit_type="Refinement", **options(setup))
    plain = editor.edit(inv, TARGET, method="p2p", edit_type="Refinement")
    assert torch.equal(out.latents[0][0], plain.latents[0][0])  # the source row is the inversion's, untouched
    assert (out.latents[0][1] - plain.latents[0][1]).abs().max() > 1e-4  # the concept changes the edit
    learned = editor.invert(setup["folder"] / "cat.png", SOURCE, num_inference_steps=2, num_inner_steps=2)
    assert editor.edit(learned, TARGET, method="elite", edit_type="Refinement", elite_projections="unet",
                       **options(setup)).latents[0].isfinite().all()  # StyleDiffusion's values + ELITE's word
    with pytest.raises(UserError, match="not an option"):
        editor.edit(inv, TARGET, method="p2p", elite_lambda=0.5)
    with pytest.raises(UserError, match="elite_lambda"):
        editor.edit(inv, TARGET, method="elite", elite_lambda=float("nan"), **options(setup))
    with pytest.raises(UserError, match="cannot load the ELITE image encoder .*HF_HUB_OFFLINE"):
        editor.edit(
            inv, TARGET, method="elite", **{**options(setup), "elite_image_encoder": elite.DEFAULT_IMAGE_ENCODER}
        )
    wide = elite.EliteMapper(kind="global", input_dim=32, hidden_dim=8, output_dim=48,
                             attention_layers=("down_blocks_0_attentions_0_transformer_blocks_0_attn2",),
                             attention_widths=(32,))
    other = setup["folder"] / "other_model.safetensors"
    save_file(wide.state_dict(), str(other), metadata=elite.metadata("global", dict(wide.config), "x.pt", "0"))
    with pytest.raises(UserError, match="48-wide words, the model's text encoder is 32 wide"):
        editor.edit(inv, TARGET, method="elite", **{**options(setup), "elite_global": str(other)})


def test_the_reference_is_encoded_once_for_several_targets(setup, tiny, monkeypatch):
    """ELITE's image encoder (a ViT-L on real models) runs once per reference picture, not once per target."""
    from stylediffusion import StyleDiffusionEditor

    calls = []
    real = elite.image_hidden_states
    monkeypatch.setattr(elite, "image_hidden_states", lambda encoder, pixels: calls.append(1) or real(encoder, pixels))
    editor = StyleDiffusionEditor(tiny, progress=False)
    inv = editor.invert(setup["folder"] / "cat.png", SOURCE, method="ddim", num_inference_steps=2)
    first = editor.edit(inv, [TARGET, TARGET], method="elite", edit_type="Refinement", **options(setup))
    assert len(calls) == 1
    again = editor.edit(inv, TARGET, method="elite", edit_type="Refinement", **options(setup))
    assert len(calls) == 1 and torch.equal(again.latents[0], first.latents[0])
    other = editor.invert(setup["mask"], SOURCE, method="ddim", num_inference_steps=2)
    editor.edit(other, TARGET, method="elite", edit_type="Refinement", **options(setup))
    assert len(calls) == 2  # another picture is encoded


def test_testbed_word_path_equals_text_path(tmp_path):
    """On the test bed: a global mapper (authors' layout) whose word 0 is the token embedding of "blue" makes
    the ELITE edit of 'a large * triangle ...' exactly the Prompt-to-Prompt edit of 'a large blue triangle ...'
    (with the UNet's projections): the word reaches the model as the text encoder's input, nothing else."""
    from stylediffusion import StyleDiffusionEditor

    editor = StyleDiffusionEditor.from_pretrained("testbed", device="cpu", progress=False)
    b = editor.bundle
    mapper = random_mapper(b, "global", vision_width=32)
    blue = b.tokenizer("blue", add_special_tokens=False).input_ids
    assert len(blue) == 1
    with torch.no_grad():
        for prefix in ("mapping_0", "mapping_patch_0"):
            getattr(mapper, prefix)[6].weight.zero_()
            getattr(mapper, prefix)[6].bias.zero_()
        mapper.mapping_0[6].bias.copy_(b.text_encoder.get_input_embeddings().weight[blue[0]])
    meta = elite.metadata("global", dict(mapper.config), "blue.pt", "0" * 64)
    save_file(mapper.state_dict(), str(tmp_path / "blue.safetensors"), metadata=meta)
    vision_tower().save_pretrained(tmp_path / "vision", safe_serialization=True)
    source = "a large red triangle on a gray background"
    inv = editor.invert(ROOT / "data" / "images" / "testbed_red_triangle.png", source, method="ddim",
                        num_inference_steps=4)
    kw = dict(edit_type="Replacement", tau_c=0.4)
    out = editor.edit(
        inv,
        "a large * triangle on a gray background",
        method="elite",
        elite_projections="unet",
        elite_global=str(tmp_path / "blue.safetensors"),
        elite_image_encoder=str(tmp_path / "vision"),
        **kw,
    )
    words = editor.edit(inv, "a large blue triangle on a gray background", method="p2p", **kw)
    assert torch.allclose(out.latents[0], words.latents[0], atol=1e-5)


def test_bench_reproduce_runs_elite(setup, tmp_path):
    """``bench reproduce --edit elite`` on an index whose target uses the placeholder; SPDInv by default."""
    from stylediffusion.bench import reproduce

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "cat.png").write_bytes((setup["folder"] / "cat.png").read_bytes())
    (data / "stylediffusion_prompts.csv").write_text(f"case_number,prompt,image_path\n0,{SOURCE},images/cat.png\n")
    header = "case_number,prompt,image_path,target,blend_word,eq_params,tau_v,tau_c,tau_s,tau_u,edit_type\n"
    (data / "stylediffusion_editing.csv").write_text(
        header + f"0,{SOURCE},images/cat.png,{TARGET},,,0.5,0.4,0.6,0.0,Refinement\n")
    args = ["--outdir", str(tmp_path / "runs"), "--data_dir", str(data), "--model", "tiny", "--edit", "elite",
            "--num_ddim_steps", "3", "--device", "cpu", "--method_option", "spdinv_rounds=1",
            "--method_option", f"elite_global={setup['global']}",
            "--method_option", f"elite_image_encoder={setup['encoder']}"]
    stats = reproduce.main(args)
    assert stats["processed"] == 1
    assert (tmp_path / "runs" / "spdinv+elite" / "case0_edit0.png").is_file()
    (data / "stylediffusion_editing.csv").write_text(
        header + f"0,{SOURCE},images/cat.png,a photo of a dog,,,0.5,0.4,0.6,0.0,Replacement\n")
    with pytest.raises(UserError, match="no placeholder"):  # refused before any model loads
        reproduce.main(["--outdir", str(tmp_path / "runs2"), *args[2:]])
    assert not (tmp_path / "runs2" / "spdinv+elite").exists()


def test_demo_lists_elite_and_takes_its_weights_at_launch(setup, tiny, tmp_path):
    from stylediffusion import StyleDiffusionEditor
    from stylediffusion.app import DemoApp, build_parser, method_names

    assert "elite" in method_names()[1]  # the demo's edit list is the registry's
    args = build_parser().parse_args(["--elite_global", str(setup["global"]), "--elite_lambda", "0.5"])
    assert args.elite_global == str(setup["global"]) and args.elite_lambda == 0.5
    picture = Image.open(setup["folder"] / "cat.png")
    editor = StyleDiffusionEditor(tiny, progress=False)
    bare = DemoApp(editor, tmp_path / "bare")
    bare.invert(picture, SOURCE, "ddim", 3, 1)
    with pytest.raises(UserError, match="needs ELITE's global mapper"):  # the page's one line
        bare.edit(picture, SOURCE, "ddim", 3, 1, TARGET, edit_type="Refinement", edit_method="elite")
    app = DemoApp(editor, tmp_path / "elite", edit_options=options(setup))
    app.invert(picture, SOURCE, "ddim", 3, 1)
    result = app.edit(picture, SOURCE, "ddim", 3, 1, TARGET, edit_type="Refinement", edit_method="elite")
    assert len(result.edits) == 1 and result.edits[0][1] == TARGET
    plain = app.edit(picture, SOURCE, "ddim", 3, 1, TARGET, edit_type="Refinement", edit_method="p2p")
    assert len(plain.edits) == 1  # options an edit does not take are not passed to it
