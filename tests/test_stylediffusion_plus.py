"""StyleDiffusion+ (``stylediffusion_plus``): its budget, its exact source branch, its file round trips, and
that every surface (registry, CLI, API, demo, ``bench pie``, ``bench reproduce``) offers it."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stylediffusion.editing import EditSpec
from stylediffusion.errors import UserError
from stylediffusion.methods import INVERSIONS, MethodContext, run_method
from stylediffusion.methods.stylediffusion_plus import NAME, budget_steps, identity_init
from stylediffusion.training import TrainConfig, inner_steps

T, K = 4, 4
SPEC = EditSpec("a photo of a cat", "a photo of a dog")


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(1)
    return F.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, size=(64, 64), mode="bilinear")


@pytest.fixture(scope="module")
def inverted(tiny, image):
    cache = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            ctx = MethodContext(tiny, image, SPEC.source, T, TrainConfig(num_inner_steps=K, early_stop=False),
                                progress=False, options=options)
            cache[key] = INVERSIONS[name].invert(ctx)
        return cache[key]

    return get


def test_budget_is_a_quarter_of_stylediffusions_iterations():
    assert [budget_steps(10, .25, i) for i in range(4)] == [3, 3, 3, 2]
    assert budget_steps(1, .25, 30) == 1  # never zero
    for T_, K_ in ((20, 10), (50, 100)):
        full = sum(inner_steps(K_, i) for i in range(T_))
        plus = sum(budget_steps(K_, .25, i) for i in range(T_))
        assert plus <= full / 2, (T_, K_, plus, full)
    assert sum(budget_steps(100, 1.0, i) for i in range(50)) == sum(inner_steps(100, i) for i in range(50))


def test_identity_init_starts_from_the_prompts_values(tiny, inverted):
    inv = inverted("stylediffusion")  # a trained set of networks of the right shapes
    from stylediffusion.mapping import MappingNetworks

    mappers = MappingNetworks(inv.mappers.cfg, 2)
    identity_init(mappers)
    text = torch.randn(2, inv.mappers.cfg.text_tokens, inv.mappers.cfg.text_width)
    assert torch.equal(mappers[1](inv.image_features, text), text)


def test_source_branch_is_exact_and_costs_fewer_backwards(tiny, image, inverted):
    plus, sd = inverted(NAME), inverted("stylediffusion")
    assert plus.metadata["inner_iterations"] == sum(budget_steps(K, .25, i) for i in range(T))
    assert plus.metadata["inner_iterations"] <= sd.metadata["inner_iterations"] / 2
    assert len(plus.metadata["residual_mse"]) == T
    ctx = MethodContext(tiny, image, SPEC.source, T, progress=False)
    out = run_method(ctx, SPEC, NAME, "p2p", inverted=plus)
    assert F.mse_loss(out.latents[:1], plus.z0).item() < 1e-9 * plus.z0.pow(2).mean().item()
    assert not torch.allclose(out.latents[1], out.latents[0])  # the target row is edited, not pinned
    # without the offsets the learned values alone do not reconstruct exactly: the offsets are doing the work
    no_offsets = type(plus)(
        **{**vars(plus), "extras": {"latent_offsets": torch.zeros_like(plus.extras["latent_offsets"])}}
    )
    loose = run_method(ctx, SPEC, NAME, "p2p", inverted=no_offsets)
    assert F.mse_loss(loose.latents[:1], plus.z0).item() > 1e3 * F.mse_loss(out.latents[:1], plus.z0).item()


def test_checkpoint_round_trip_and_settings_refused(tiny, image, tmp_path):
    ck = tmp_path / "plus.safetensors"
    ctx = MethodContext(tiny, image, SPEC.source, 2, TrainConfig(num_inner_steps=2), checkpoint=ck, progress=False)
    first = INVERSIONS[NAME].invert(ctx)
    assert ck.is_file()
    again = INVERSIONS[NAME].invert(ctx)
    assert torch.equal(again.extras["latent_offsets"], first.extras["latent_offsets"])
    assert all(
        torch.equal(a, b) for a, b in zip(again.mappers.state_dict().values(), first.mappers.state_dict().values())
    )
    ctx.options = {"sdplus_budget": 0.5}
    with pytest.raises(UserError, match="other stylediffusion_plus settings"):
        INVERSIONS[NAME].invert(ctx)


def test_api_invert_save_load_edit(tmp_path):
    from stylediffusion import Inversion, StyleDiffusionEditor

    editor = StyleDiffusionEditor.from_pretrained("tiny", progress=False)
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    inv = editor.invert(img, SPEC.source, method=NAME, num_inference_steps=2, num_inner_steps=2, sdplus_budget=0.5)
    assert inv.method == NAME and inv.metadata["settings"]["budget"] == 0.5
    path = inv.save(tmp_path / "inv.safetensors")
    back = Inversion.load(path)
    a = editor.edit(inv, SPEC.target, tau_u=.5)
    b = editor.edit(back, SPEC.target, tau_u=.5)
    assert torch.allclose(a.latents[0], b.latents[0], atol=1e-6)
    with pytest.raises(UserError, match="sdplus_budget"):
        editor.invert(img, SPEC.source, method=NAME, num_inference_steps=2, num_inner_steps=1, sdplus_budget=2.0)


def test_cli_list_methods_demo_and_cli_run(tmp_path, capsys):
    from stylediffusion import cli
    from stylediffusion.app import method_names

    assert NAME in method_names()[0]
    assert cli.main(["--list_methods"]) == 0
    assert NAME in capsys.readouterr().out
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(photo)
    code = cli.main(["--model", "tiny", "--num_ddim_steps", "2", "--num_inner_steps", "1", "--progress", "False",
                     "--image_path", str(photo), "--prompt", SPEC.source, "--target", SPEC.target,
                     "--inversion", NAME, "--method_option", "sdplus_budget=0.5",
                     "--outdir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "edited.png").is_file()
    assert len(list((tmp_path / "ck").glob(f"*{NAME}*.safetensors"))) == 1


def test_bench_reproduce_and_pie_take_it(tmp_path):
    from stylediffusion.bench import pie, reproduce

    args = ["--idx", "1", "--outdir", str(tmp_path / "rep"), "--model", "tiny", "--num_ddim_steps", "2",
            "--num_inner_steps", "1", "--device", "cpu", "--inversion", NAME]
    assert reproduce.main(args)["processed"] == 2
    assert (tmp_path / "rep" / f"{NAME}+p2p" / "contact_sheet.png").is_file()
    from tests.test_bench import make_pie

    mapping, images = make_pie(tmp_path / "pie")
    entries = json.loads(mapping.read_text())
    first = next(iter(entries))
    mapping.write_text(json.dumps({first: entries[first]}))
    stats = pie.main(["--mapping_file", str(mapping), "--images", str(images), "--outdir", str(tmp_path / "pie_out"),
                      "--model", "tiny", "--num_ddim_steps", "2", "--num_inner_steps", "1", "--device", "cpu",
                      "--inversion", NAME, "--clip_model", "none", "--dino_model", "none", "--lpips", "False",
                      "--report", "False"])
    assert stats["processed"] == 1
    rows = list(csv.DictReader((tmp_path / "pie_out" / "results.csv").open()))
    assert len(rows) == 1 and NAME in rows[0]["method"] and math.isfinite(float(rows[0]["psnr"]))


def test_aligned_target_values_leave_the_changed_word_to_the_prompt(tiny, image, inverted):
    from stylediffusion import seq_aligner
    from stylediffusion.methods.stylediffusion_plus import PlusEditHooks

    tok = tiny.tokenizer
    n = tok.model_max_length
    learned, plain = torch.randn(1, n, 8), torch.randn(1, n, 8)
    offsets = torch.zeros(T, 4, 8, 8)
    dog = seq_aligner.word_token_indices(SPEC.target, "dog", tok)
    kept = [j for j in range(n) if j not in dog]
    aligned = PlusEditHooks(offsets, "aligned").target_values(0, learned, plain, SPEC, tok)
    assert torch.equal(aligned[:, dog], plain[:, dog]) and torch.equal(aligned[:, kept], learned[:, kept])
    assert torch.equal(PlusEditHooks(offsets).target_values(0, learned, plain, SPEC, tok), learned)  # the default
    half = PlusEditHooks(offsets, "learned", 0.5).target_values(0, learned, plain, SPEC, tok)
    assert torch.allclose(half, (learned + plain) / 2, atol=1e-6)
    # through the edit loop: the source row is the same trajectory, the target row changes
    plus = inverted(NAME)
    default = run_method(MethodContext(tiny, image, SPEC.source, T, progress=False), SPEC, NAME, "p2p", inverted=plus)
    ctx = MethodContext(tiny, image, SPEC.source, T, progress=False, options={"sdplus_target_values": "aligned"})
    out = run_method(ctx, SPEC, NAME, "p2p", inverted=plus)
    assert torch.allclose(out.latents[0], default.latents[0], atol=1e-6)
    assert not torch.allclose(out.latents[1], default.latents[1], atol=1e-5)
