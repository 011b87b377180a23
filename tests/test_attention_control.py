"""P2P/P2Plus attention control and value injection, checked call by call on the tiny model."""
import torch

from ptp_utils import COND, UNCOND, PromptToPromptController
from stylediffusion.ddim import DDIMSchedule
from stylediffusion.editing import EditSpec, build_controller, num_steps_for, run_edit
from stylediffusion.encoders import clip_image_features, encode_prompts
from stylediffusion.mapping import MappingConfig, MappingNetworks

T = 10


class SpyController(PromptToPromptController):
    """Records every call's maps before and after the edit."""

    def __init__(self, inner: PromptToPromptController):
        self.__dict__.update(inner.__dict__)
        self.calls = []

    def __call__(self, probs, place, state):
        before = probs.clone()
        after = super().__call__(probs, place, state)
        self.calls.append((state.step, place, state.layout, before, after.clone()))
        return after


def run_spied(tiny, spec, z_T=None):
    torch.manual_seed(0)
    z_T = torch.randn(1, 4, 16, 16) if z_T is None else z_T
    spy = SpyController(build_controller(spec, tiny.tokenizer, T))
    result = run_edit(tiny, DDIMSchedule(tiny.scheduler, T), z_T, spec, controller=spy, progress=False)
    return spy, result


def test_replacement_cross_attention_follows_tau_c(tiny):
    spec = EditSpec("a photo of a cat", "a photo of a dog", tau_c=0.6, tau_s=0.0)
    spy, _ = run_spied(tiny, spec)
    edited_steps, cross_calls = set(), 0
    for step, place, layout, before, after in spy.calls:
        if not place.is_cross:
            continue
        cross_calls += 1
        src, tgt = layout.row(COND, 0), layout.row(COND, 1)
        for r in layout.rows(UNCOND):  # the unconditional branch's cross-attention is never edited
            assert torch.equal(after[r], before[r])
        if step < num_steps_for(0.6, T):
            # cat -> dog is one token for one token: the mapper is the identity
            assert torch.allclose(after[tgt], before[src], atol=1e-6)
            edited_steps.add(step)
        else:
            assert torch.equal(after[tgt], before[tgt])
            assert not torch.allclose(after[tgt], before[src], atol=1e-4)
    assert edited_steps == set(range(6)) and cross_calls > 0


def test_self_attention_replaced_only_in_allowed_layers_and_steps(tiny):
    spec = EditSpec("a photo of a cat", "a photo of a dog", tau_c=0.0, tau_s=0.4, tau_u=0.0)
    spy, _ = run_spied(tiny, spec)
    seen_allowed = seen_forbidden = False
    for step, place, layout, before, after in spy.calls:
        if place.is_cross:
            continue
        src, tgt = layout.row(COND, 0), layout.row(COND, 1)
        for r in layout.rows(UNCOND):  # tau_u = 0: never touched
            assert torch.equal(after[r], before[r])
        if place.self_replace_allowed and step < 4:
            assert torch.equal(after[tgt], before[src])
            seen_allowed = True
        else:
            assert torch.equal(after, before)
            seen_forbidden |= not place.self_replace_allowed
    assert seen_allowed
    # The highest-resolution self-attention layers never ask for maps: they run fused attention.
    assert not seen_forbidden


def test_p2plus_replaces_unconditional_self_attention_for_tau_u(tiny):
    spec = EditSpec("a photo of a cat", "a photo of a dog", tau_c=0.0, tau_s=0.0, tau_u=0.5)
    spy, _ = run_spied(tiny, spec)
    steps = set()
    for step, place, layout, before, after in spy.calls:
        if place.is_cross:
            continue
        u_src, u_tgt = layout.row(UNCOND, 0), layout.row(UNCOND, 1)
        if step < 5:
            assert place.self_replace_allowed
            assert torch.equal(after[u_tgt], before[u_src])
            steps.add(step)
        for r in layout.rows(COND):  # tau_s = 0: conditional self-attention untouched
            assert torch.equal(after[r], before[r])
    assert steps == set(range(5))


def test_value_injection_changes_only_conditional_values(tiny):
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    feats = clip_image_features(tiny, image)
    cond = encode_prompts(tiny, ["a photo of a cat", "a photo of a dog"])
    uncond = encode_prompts(tiny, [""])
    torch.manual_seed(1)
    mappers = MappingNetworks(MappingConfig(feats.shape[1], feats.shape[2], cond.shape[1], cond.shape[2]), T)
    attn = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    seen = {}
    hooks = [attn.to_k.register_forward_hook(lambda m, i, o: seen.setdefault("k", i[0].clone())),
             attn.to_v.register_forward_hook(lambda m, i, o: seen.setdefault("v", i[0].clone()))]
    try:
        spec = EditSpec("a photo of a cat", "a photo of a dog", tau_v=1.0)
        run_edit(tiny, DDIMSchedule(tiny.scheduler, T), torch.randn(1, 4, 16, 16), spec, mappers, feats, progress=False)
    finally:
        for h in hooks:
            h.remove()
    k, v = seen["k"], seen["v"]  # first call: step 0, rows [uncond src, uncond tgt, cond src, cond tgt]
    plain = torch.cat([uncond, uncond, cond])
    assert torch.equal(k, plain)  # keys: always the plain text embedding
    assert torch.equal(v[:2], plain[:2])  # unconditional values untouched
    learned = torch.cat([mappers[0](feats, cond[:1]), mappers[0](feats, cond[1:])])
    assert torch.allclose(v[2:], learned, atol=1e-6)
    assert not torch.allclose(v[2:], cond, atol=1e-3)


def test_local_blend_keeps_source_latents_outside_mask(tiny):
    spec = EditSpec("a photo of a cat", "a photo of a dog", blend_words=("cat", "dog"), blend_threshold=0.99)
    spy, result = run_spied(tiny, spec)
    mask = spy.local_blend.last_mask
    assert mask is not None and 0.0 < mask.float().mean().item() < 1.0, "the test needs a partial mask"
    outside = mask[0, 0] == 0
    src, tgt = result.latents[0], result.latents[1]
    assert torch.equal(tgt[:, outside], src[:, outside])
    assert not torch.allclose(tgt[:, ~outside], src[:, ~outside])


def test_local_blend_mask_from_blend_word_maps():
    from ptp_utils import LocalBlend

    tokens = torch.zeros(2, 77)
    tokens[0, 5] = tokens[1, 5] = 1.0
    maps = torch.full((2, 16, 77), 0.01)  # a 4x4 mid-low grid for a 16x16 latent
    maps[0, 0, 5] = 1.0  # source word attends to the top-left cell
    maps[1, 15, 5] = 1.0  # target word to the bottom-right cell
    blend = LocalBlend(tokens, num_steps=10)
    latents = torch.randn(2, 4, 16, 16)
    assert torch.equal(blend(latents, maps, step=1), latents)  # before int(0.2 T): untouched
    out = blend(latents, maps, step=2)
    mask = blend.last_mask[0, 0].bool()
    # 3x3 max-pool of one 4x4 cell covers a 2x2 block of cells = 8x8 latent pixels at each corner
    assert mask[:8, :8].all() and mask[8:, 8:].all() and not mask[:8, 8:].any() and not mask[8:, :8].any()
    assert torch.equal(out[1][:, ~mask], latents[0][:, ~mask])
    assert torch.allclose(out[1][:, mask], latents[1][:, mask], atol=1e-6)  # src + (tgt - src) rounds
    assert torch.equal(out[0], latents[0])


def test_layers_chosen_by_resolution_not_names(tiny):
    from ptp_utils import install_attention_control

    spy, _ = run_spied(tiny, EditSpec("a photo of a cat", "a photo of a dog"))
    mid_low = {place.name for _, place, _, _, _ in spy.calls if place.is_cross and place.is_mid_low}
    # tiny UNet: latent 16x16, mid-low = 4x4 = 1 down layer + 2 up layers (SD at 512: 2 + 3)
    assert len(mid_low) == 3
    assert sum(n.startswith("down") for n in mid_low) == 1
    assert install_attention_control(tiny.unet) is install_attention_control(tiny.unet)


def test_local_blend_maps_are_taken_after_the_cross_attention_edit():
    """P2P/StyleDiffusion store the map tensor and then edit it in place, so their LocalBlend sees the
    target's EDITED maps; ours accumulates after the edit too."""
    from ptp_utils import AttentionPlace, AttentionState, BatchLayout, ReplacementEdit

    swap = torch.eye(77)
    swap[[5, 6]] = swap[[6, 5]]  # source token 5 -> target token 6 and back
    ctrl = PromptToPromptController(T, ReplacementEdit(swap[None]), torch.ones(T, 1, 77), self_steps=0)
    state = AttentionState(layout=BatchLayout.guided(2), step=0, num_steps=T, latent_tokens=256)
    place = AttentionPlace("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 0, True, 16, 256)
    assert place.is_mid_low and ctrl.needs_maps(place, state)
    torch.manual_seed(0)
    probs = torch.rand(4, 2, 16, 77).softmax(-1)  # rows: uncond src, uncond tgt, cond src, cond tgt
    before = probs.clone()
    after = ctrl(probs, place, state)
    maps = ctrl.average_maps()  # (prompts, queries, keys), averaged over heads
    assert torch.allclose(maps[1], after[3].mean(0))  # the edited target row
    assert torch.allclose(maps[1][:, 6], before[2].mean(0)[:, 5])  # = the source's token-5 map
    assert not torch.allclose(maps[1], before[3].mean(0))
    assert torch.allclose(maps[0], before[2].mean(0))  # the source row is never edited


def test_target_uses_learned_values_while_i_below_tau_v_times_T(tiny):
    """The authors' loop: learned values while i < tau_v * T, i.e. ceil(tau_v * T) steps (T=10, .55 -> 6)."""
    from stylediffusion.editing import value_steps_for

    assert [value_steps_for(t, 10) for t in (0.0, 0.05, 0.5, 0.55, 0.6, 0.99, 1.0)] == [0, 1, 5, 6, 6, 10, 10]
    assert value_steps_for(0.56, 50) == 28 and value_steps_for(0.55, 30) == 17  # 28.000000000000004, 16.5
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    feats = clip_image_features(tiny, image)
    cond = encode_prompts(tiny, ["a photo of a cat", "a photo of a dog"])
    torch.manual_seed(1)
    mappers = MappingNetworks(MappingConfig(feats.shape[1], feats.shape[2], cond.shape[1], cond.shape[2]), T)
    attn = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    seen = []
    hook = attn.to_v.register_forward_hook(lambda m, i, o: seen.append(i[0][3].clone()))  # cond target row
    try:
        spec = EditSpec("a photo of a cat", "a photo of a dog", tau_v=0.55, tau_c=0.0, tau_s=0.0)
        run_edit(tiny, DDIMSchedule(tiny.scheduler, T), torch.randn(1, 4, 16, 16), spec, mappers, feats,
                 progress=False)
    finally:
        hook.remove()
    assert len(seen) == T
    plain = [torch.equal(v, cond[1]) for v in seen]
    assert plain == [False] * 6 + [True] * 4


def test_inversion_offset_is_added_before_local_blend(tiny):
    """PnPInversion: offset added to the source row, THEN LocalBlend, so outside the mask the target
    takes the corrected source latent. With a mask that is empty everywhere (threshold above 1) the
    target must therefore end equal to the source, offset included."""
    from stylediffusion.editing import EditHooks

    class ConstantOffset(EditHooks):
        def after_step(self, i, z):
            return torch.cat([z[:1] + 0.25, z[1:]])

    spec = EditSpec("a photo of a cat", "a photo of a dog", blend_words=("cat", "dog"), blend_threshold=1.5)
    torch.manual_seed(0)
    out = run_edit(tiny, DDIMSchedule(tiny.scheduler, T), torch.randn(1, 4, 16, 16), spec, progress=False,
                   hooks=ConstantOffset())
    assert out.controller.local_blend.last_mask.sum() == 0
    assert torch.equal(out.latents[1], out.latents[0])
