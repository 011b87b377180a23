"""The registered inversions and edits on the tiny random model (CPU, small T).

What is checked: each inversion that claims a better reconstruction than DDIM at guidance 7.5 has one
(DirectInversion exactly); SPDInv's fixed-point residual beats plain DDIM inversion's; FPE edits
self-attention only; MasaCtrl and PnP leave everything before their start step/layer untouched; the
registry refuses undefined combinations; optimising inversions round-trip through checkpoints.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ptp_utils import COND, install_attention_control
from stylediffusion.editing import EditSpec
from stylediffusion.errors import UserError
from stylediffusion.methods import (
    EDITS,
    INVERSIONS,
    MethodContext,
    builtin,  # noqa: F401  (registers every method)
    get_edit,
    run_method,
)

T = 5
SPEC = EditSpec("a photo of a cat", "a photo of a dog")
FAST = {"nulltext_iterations": 5, "spdinv_rounds": 6}


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    return F.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, size=(64, 64), mode="bilinear")


def context(tiny, image, num_steps=T, **options) -> MethodContext:
    return MethodContext(tiny, image, SPEC.source, num_steps, progress=False, options={**FAST, **options})


@pytest.fixture(scope="module")
def inverted(tiny, image):
    """Every real-image inversion of the same image, computed once (lazily)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = INVERSIONS[name].invert(context(tiny, image))
        return cache[name]

    get("ddim")  # registers the built-ins
    return get


def reconstruction_mse(tiny, image, inv) -> float:
    out = run_method(context(tiny, image), SPEC, inv.method, "p2p", inverted=inv)
    return F.mse_loss(out.latents[:1], inv.z0).item()


@pytest.mark.parametrize("method", ["nulltext", "npi", "proxnpi", "directinv", "spdinv"])
def test_reconstruction_beats_ddim(tiny, image, inverted, method):
    ddim = reconstruction_mse(tiny, image, inverted("ddim"))
    mse = reconstruction_mse(tiny, image, inverted(method))
    print(f"\n{method}: reconstruction MSE {mse:.3e}, DDIM {ddim:.3e}, ratio {mse / ddim:.3e}")
    assert mse < (0.8 if method == "nulltext" else 0.5) * ddim  # Null-text: only 5 of its 10 iterations here
    if method == "directinv":  # exact up to float error
        assert mse < 1e-9 * inverted(method).z0.pow(2).mean().item()


def test_spdinv_fixed_point_residual_below_ddim(tiny, image, inverted):
    from stylediffusion.encoders import encode_prompts
    from stylediffusion.methods.spdinv import fixed_point_residual

    ctx = context(tiny, image)
    schedule, cond = ctx.schedule, encode_prompts(tiny, [SPEC.source])
    ddim, spd = inverted("ddim").trajectory, inverted("spdinv").trajectory
    for i in range(T):
        k = T - i  # sampling step i inverts latents[k-1] -> latents[k]
        r_ddim = fixed_point_residual(ctx, schedule, cond, ddim[k - 1], ddim[k], i)
        r_spd = fixed_point_residual(ctx, schedule, cond, spd[k - 1], spd[k], i)
        print(f"step {i}: residual DDIM {r_ddim:.3e}, SPDInv {r_spd:.3e}")
        assert r_spd <= r_ddim * (1 + 1e-3) + 1e-12
        if r_ddim > 5e-6:  # above SPDInv's stopping threshold it must improve
            assert r_spd < r_ddim


def trajectory(tiny, image, inv, edit, spec=SPEC, **options):
    steps = []
    ctx = context(tiny, image, **options)
    ctx.step_callback = lambda i, z: steps.append(z.clone())
    out = run_method(ctx, spec, inv.method, edit, inverted=inv)
    return out.latents, steps


def test_fpe_without_self_steps_is_word_swap(tiny, image, inverted):
    inv = inverted("ddim")
    spec0 = EditSpec(SPEC.source, SPEC.target, tau_s=0.0)
    ws = run_method(context(tiny, image), spec0, "ddim", "word_swap", inverted=inv).latents
    fpe0 = run_method(context(tiny, image), spec0, "ddim", "fpe", inverted=inv).latents
    fpe = run_method(context(tiny, image), SPEC, "ddim", "fpe", inverted=inv).latents
    assert torch.allclose(fpe0, ws, atol=1e-6)
    assert not torch.allclose(fpe[1], ws[1], atol=1e-4)
    assert torch.allclose(fpe[0], fpe0[0], atol=1e-4)  # the source is untouched (up to the explicit-softmax path)


def test_fpe_edits_self_attention_only(tiny, image, inverted, monkeypatch):
    from stylediffusion.methods import attention_edits

    calls = []

    class Spy(attention_edits.SelfAttentionReplace):
        def needs_maps(self, place, state):
            wanted = super().needs_maps(place, state)
            assert not (wanted and place.is_cross), "FPE asked for cross-attention maps"
            return wanted

        def __call__(self, probs, place, state):
            before = probs.clone()
            after = super().__call__(probs, place, state)
            changed = {r for r in range(after.shape[0]) if not torch.equal(after[r], before[r])}
            calls.append((place.is_cross, changed, state.layout.row(COND, 1)))
            return after

        def edit_kv(self, k, v, place, state):
            k2, v2 = super().edit_kv(k, v, place, state)
            assert k2 is k and v2 is v
            return k2, v2

    monkeypatch.setattr(attention_edits, "SelfAttentionReplace", Spy)
    run_method(context(tiny, image), SPEC, "ddim", "fpe", inverted=inverted("ddim"))
    assert calls, "FPE never replaced a self-attention map"
    for is_cross, changed, cond_target in calls:
        assert not is_cross
        assert changed <= {cond_target}


def _attn1_outputs(unet, step, store):
    """Forward hooks recording each self-attention layer's output at one step: {layer index: tensor}."""
    state = install_attention_control(unet)
    handles = []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            index = module.processor.index

            def hook(_m, _i, out, index=index):
                if state.step == step:
                    store[index] = out.detach().clone()

            handles.append(module.register_forward_hook(hook))
    return handles


def _layer_outputs(tiny, image, inv, edit, step, **options):
    store = {}
    handles = _attn1_outputs(tiny.unet, step, store)
    try:
        trajectory(tiny, image, inv, edit, **options)
    finally:
        for h in handles:
            h.remove()
    return store


def test_masactrl_acts_from_start_step_and_layer(tiny, image, inverted):
    from stylediffusion.methods.attention_edits import masactrl_start_layer

    inv = inverted("ddim")
    start_step = 2
    layer = masactrl_start_layer(tiny.unet)
    assert layer == round(10 / 16 * 10)  # the tiny UNet has 10 transformer layers
    ws, ws_steps = trajectory(tiny, image, inv, "word_swap")
    masa, masa_steps = trajectory(tiny, image, inv, "masactrl", masactrl_start_step=start_step)
    for i in range(start_step):
        assert torch.equal(masa_steps[i], ws_steps[i]), f"MasaCtrl changed step {i} < start step"
    assert not torch.allclose(masa[1], ws[1], atol=1e-4)
    assert torch.equal(masa[0], ws[0])  # the source row is never changed
    ws_layers = _layer_outputs(tiny, image, inv, "word_swap", start_step)
    masa_layers = _layer_outputs(tiny, image, inv, "masactrl", start_step, masactrl_start_step=start_step)
    for index in sorted(ws_layers):
        same = torch.equal(masa_layers[index], ws_layers[index])
        assert same == (index < layer), f"layer {index}: changed={not same}, start layer {layer}"


def test_pnp_acts_only_in_the_decoder(tiny, image, inverted):
    from stylediffusion.methods.attention_edits import pnp_attention_layers

    inv = inverted("ddim")
    ws, ws_steps = trajectory(tiny, image, inv, "word_swap")
    off, _ = trajectory(tiny, image, inv, "pnp", pnp_feature_fraction=0.0, pnp_attention_fraction=0.0)
    assert torch.equal(off, ws)
    pnp, _ = trajectory(tiny, image, inv, "pnp")
    assert not torch.allclose(pnp[1], ws[1], atol=1e-4)
    ws_layers = _layer_outputs(tiny, image, inv, "word_swap", 0)
    pnp_layers = _layer_outputs(tiny, image, inv, "pnp", 0)
    first_injected = min(pnp_attention_layers(tiny.unet))
    names = {p.index: p.name for p in tiny.unet.attn_processors.values()}
    first_decoder = min(i for i, n in names.items() if n.startswith("up_blocks"))
    for index in sorted(ws_layers):
        same = torch.equal(pnp_layers[index], ws_layers[index])
        if index < first_decoder:  # encoder and middle: untouched
            assert same, f"PnP changed encoder/middle layer {index}"
        elif index >= first_injected:
            assert not same, f"PnP did not act on decoder layer {index}"


def test_registry_refuses_undefined_combinations():
    with pytest.raises(UserError) as err:
        get_edit("masactrl", "nulltext")
    message = str(err.value)
    assert "\n" not in message and "ddim+masactrl" in message and "spdinv+masactrl" in message
    with pytest.raises(UserError):
        get_edit("sdedit", "directinv")
    with pytest.raises(UserError, match="unknown --edit"):
        get_edit("nope", "ddim")
    for name, method in EDITS.items():
        assert set(method.inversions) <= set(INVERSIONS), name


def test_list_methods_lists_everything(capsys):
    from stylediffusion import cli

    assert cli.main(["--list_methods"]) == 0
    out = capsys.readouterr().out
    for name in list(INVERSIONS) + list(EDITS):
        assert name in out
    for name in ("nulltext", "npi", "proxnpi", "directinv", "spdinv", "generated", "fpe", "masactrl", "pnp", "sdedit"):
        assert name in out


def test_checkpoint_round_trip(tiny, image, tmp_path, monkeypatch):
    from stylediffusion.methods import nulltext

    path = tmp_path / "nt.safetensors"
    ctx = MethodContext(tiny, image, SPEC.source, 2, checkpoint=path, progress=False,
                        options={"nulltext_iterations": 2})
    first = INVERSIONS["nulltext"].invert(ctx)
    assert path.is_file() and path.with_suffix(".json").is_file()

    def boom(*a, **k):
        raise AssertionError("the checkpoint was not reused")

    monkeypatch.setattr(nulltext, "nulltext_optimise", boom)
    again = INVERSIONS["nulltext"].invert(ctx)
    for a, b in zip(first.uncond_embeddings, again.uncond_embeddings):
        assert torch.equal(a, b)
    assert torch.equal(first.z_T, again.z_T)
    with pytest.raises(UserError, match="nulltext"):
        INVERSIONS["directinv"].invert(ctx)  # another method's file is refused
    other = MethodContext(tiny, image, "another prompt", 2, checkpoint=path, progress=False)
    with pytest.raises(UserError, match="source prompt"):
        INVERSIONS["nulltext"].invert(other)

    dpath = tmp_path / "di.safetensors"
    dctx = MethodContext(tiny, image, SPEC.source, 2, checkpoint=dpath, progress=False)
    d1 = INVERSIONS["directinv"].invert(dctx)
    d2 = INVERSIONS["directinv"].invert(dctx)
    assert torch.equal(d1.extras["latent_offsets"], d2.extras["latent_offsets"])


def test_generated_image_editing(tiny):
    from stylediffusion.methods.generated import edit_generated

    for edit in ("p2p", "fpe", "masactrl", "pnp"):
        out = edit_generated(tiny, SPEC, edit, seed=3, num_steps=3)
        assert torch.allclose(out.latents[0], out.inverted.z0[0], atol=1e-4), edit  # the source is the generation
        assert not torch.allclose(out.latents[1], out.latents[0], atol=1e-3), edit
    from stylediffusion.methods.generated import seeded_latent

    assert torch.equal(seeded_latent(tiny, 3), seeded_latent(tiny, 3))
    assert not torch.equal(seeded_latent(tiny, 3), seeded_latent(tiny, 4))


def test_sdedit_strength(tiny, image, inverted):
    inv = inverted("ddim")
    weak = run_method(context(tiny, image, sdedit_strength=0.2), SPEC, "ddim", "sdedit", inverted=inv).latents
    strong = run_method(context(tiny, image, sdedit_strength=1.0), SPEC, "ddim", "sdedit", inverted=inv).latents
    err_weak = F.mse_loss(weak[:1], inv.z0).item()
    err_strong = F.mse_loss(strong[:1], inv.z0).item()
    assert err_weak < err_strong  # less noise, closer to the input


def test_nulltext_attention_loss_option(tiny, image):
    plain = INVERSIONS["nulltext"].invert(context(tiny, image, 2, nulltext_iterations=2))
    att = INVERSIONS["nulltext"].invert(context(tiny, image, 2, nulltext_iterations=2, nulltext_attention_loss=True))
    assert not torch.allclose(plain.uncond_embeddings[0], att.uncond_embeddings[0])


def test_key_states_replace_the_keys_only_when_given(tiny):
    from ptp_utils import BatchLayout
    from stylediffusion.ddim import DDIMSchedule
    from stylediffusion.encoders import encode_prompts
    from stylediffusion.sampling import predict

    schedule = DDIMSchedule(tiny.scheduler, 2)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cat, dog = encode_prompts(tiny, ["a cat"]), encode_prompts(tiny, ["a dog"])
    plain = predict(tiny, schedule, z, 0, cat, BatchLayout.single())
    assert torch.equal(predict(tiny, schedule, z, 0, cat, BatchLayout.single(), keys=cat), plain)
    keyed = predict(tiny, schedule, z, 0, cat, BatchLayout.single(), keys=dog)
    valued = predict(tiny, schedule, z, 0, cat, BatchLayout.single(), values=dog)
    assert not torch.allclose(keyed, plain) and not torch.allclose(keyed, valued)


@pytest.mark.parametrize("embedding", ["key", "key_value"])
def test_stylediffusion_key_ablations_and_sdedit(tiny, image, tmp_path, embedding):
    from stylediffusion.training import TrainConfig

    cfg = TrainConfig(num_inner_steps=1)
    ctx = MethodContext(tiny, image, SPEC.source, 2, cfg, tmp_path / "sd.safetensors", progress=False,
                        options={"embedding": embedding})
    inv = INVERSIONS["stylediffusion"].invert(ctx)
    assert inv.metadata["train_config"]["embedding"] == embedding
    again = INVERSIONS["stylediffusion"].invert(ctx)  # reloaded from the checkpoint, embedding kept
    assert again.metadata["train_config"]["embedding"] == embedding
    edit = run_method(ctx, SPEC, "stylediffusion", "p2p", inverted=again).latents
    plain_ctx = MethodContext(tiny, image, SPEC.source, 2, cfg, progress=False)
    value_inv = INVERSIONS["stylediffusion"].invert(plain_ctx)
    assert "embedding" not in value_inv.metadata["train_config"]  # default metadata unchanged
    assert not torch.allclose(edit, run_method(plain_ctx, SPEC, "stylediffusion", "p2p", inverted=value_inv).latents)
    with pytest.raises(UserError, match="embedding"):
        INVERSIONS["stylediffusion"].invert(MethodContext(tiny, image, SPEC.source, 2, cfg, tmp_path / "sd.safetensors",
                                                          progress=False, options={"embedding": "value"}))
    # StyleDiffusion + SDEdit (paper Fig. 18): the learned embedding changes the SDEdit result
    sd = run_method(plain_ctx, SPEC, "stylediffusion", "sdedit", inverted=value_inv).latents
    plain = run_method(plain_ctx, SPEC, "ddim", "sdedit", inverted=INVERSIONS["ddim"].invert(plain_ctx)).latents
    assert sd.shape == plain.shape and not torch.allclose(sd, plain)


def test_nulltext_with_p2plus(tiny, image, inverted):
    """The paper's 'Null-text + P2Plus' ablation: tau_u > 0 also edits the unconditional self-attention."""
    inv = inverted("nulltext")
    p2p = run_method(context(tiny, image), SPEC, "nulltext", "p2p", inverted=inv).latents
    spec_u = EditSpec(SPEC.source, SPEC.target, tau_u=0.6)
    p2plus = run_method(context(tiny, image), spec_u, "nulltext", "p2p", inverted=inv).latents
    assert torch.allclose(p2plus[0], p2p[0], atol=1e-5)
    assert not torch.allclose(p2plus[1], p2p[1], atol=1e-4)
