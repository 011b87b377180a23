"""Attention control for StyleDiffusion and Prompt-to-Prompt, through diffusers' attention processors.

(Prompt-to-Prompt calls this module ``ptp_utils``; that name, at the top of a checkout, is this module.)

One ``ControlledAttnProcessor`` per attention layer, all sharing one ``AttentionState``:
- the value input of cross-attention can be replaced per batch row (``value_states`` passed in
  ``cross_attention_kwargs``): keys still come from the plain text embedding;
- a controller (``AttentionController`` subclass) may read or edit the softmax maps of the layers
  and steps it asks for; everywhere else the layer runs fused attention (SDPA).

Nothing is inferred from call counts: the sampling loop sets the step index, the batch layout
(which rows are unconditional/conditional and which prompt each row renders) and the latent size on
the state. Layers are told apart by their query count relative to the latent (``AttentionPlace``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

UNCOND, COND = "uncond", "cond"


@dataclass(frozen=True)
class BatchLayout:
    """The role of every row of a UNet batch: its guidance branch and the prompt it renders (0 = source)."""

    branches: tuple[str, ...]
    prompts: tuple[int, ...]

    @classmethod
    def guided(cls, num_prompts: int) -> "BatchLayout":
        """[uncond p0..pn-1, cond p0..pn-1], the classifier-free-guidance batch of an edit."""
        return cls((UNCOND,) * num_prompts + (COND,) * num_prompts, tuple(range(num_prompts)) * 2)

    @classmethod
    def single(cls, branch: str = COND, num_prompts: int = 1) -> "BatchLayout":
        return cls((branch,) * num_prompts, tuple(range(num_prompts)))

    @property
    def num_prompts(self) -> int:
        return max(self.prompts) + 1

    def row(self, branch: str, prompt: int) -> int | None:
        for r, (b, p) in enumerate(zip(self.branches, self.prompts)):
            if b == branch and p == prompt:
                return r
        return None

    def rows(self, branch: str) -> list[int]:
        return [r for r, b in enumerate(self.branches) if b == branch]


@dataclass(frozen=True)
class AttentionPlace:
    """Where an attention call happens: layer name, kind, and resolution relative to the latent."""

    name: str
    index: int  # position of the transformer layer in forward order (down, mid, up)
    is_cross: bool
    num_queries: int
    latent_tokens: int

    @property
    def downscale(self) -> float:
        """1 at the latent's own resolution, 2 one level down, 4 at the 'mid-low' level, ..."""
        return math.sqrt(self.latent_tokens / self.num_queries)

    @property
    def is_mid_low(self) -> bool:
        """The (latent/4)² layers whose cross-attention StyleDiffusion records (16² for SD at 512²)."""
        return self.num_queries * 16 == self.latent_tokens

    @property
    def self_replace_allowed(self) -> bool:
        """Self-attention maps are swapped only at (latent/2)² queries or fewer (32² for SD)."""
        return self.num_queries * 4 <= self.latent_tokens

    @property
    def maps_editable(self) -> bool:
        """Whether Prompt-to-Prompt / P2Plus may read or edit this layer's maps: every cross-attention
        layer, and self-attention where it may be swapped."""
        return self.is_cross or self.self_replace_allowed


@dataclass
class AttentionState:
    """What the sampling loop tells the processors explicitly before every UNet call."""

    controller: "AttentionController | None" = None
    layout: BatchLayout | None = None
    step: int = 0
    num_steps: int = 1
    latent_tokens: int = 0

    def set(self, *, step: int, layout: BatchLayout, latent_hw: tuple[int, int], num_steps: int | None = None):
        self.step, self.layout = step, layout
        self.latent_tokens = int(latent_hw[0] * latent_hw[1])
        if num_steps is not None:
            self.num_steps = num_steps


class AttentionController:
    """Base class: decides where maps are needed and may edit them. Default: touch nothing."""

    def needs_maps(self, place: AttentionPlace, state: AttentionState) -> bool:
        return False

    def __call__(self, probs: torch.Tensor, place: AttentionPlace, state: AttentionState) -> torch.Tensor:
        """``probs``: (batch, heads, queries, keys) softmax maps; return the (possibly edited) maps."""
        return probs

    def after_step(self, latents: torch.Tensor, state: AttentionState) -> torch.Tensor:
        """Called once per sampling step with the new latents (one row per prompt)."""
        return latents

    def edit_kv(self, k: torch.Tensor, v: torch.Tensor, place: AttentionPlace, state: AttentionState):
        """May replace keys/values (batch, heads, keys, dim) before attention (e.g. MasaCtrl). Default: unchanged."""
        return k, v

    def add_attention(self, q: torch.Tensor, probs: torch.Tensor, place: AttentionPlace, state: AttentionState):
        """An extra term (batch, heads, queries, dim) added to the attention output before the layer's output
        projection, or None (e.g. ELITE's local values); called only where ``needs_maps`` asked for the maps,
        with the queries and the (edited) maps. Default: None."""
        return None


class ControlledAttnProcessor:
    """Attention with an optional per-row value input and optional map access for a controller."""

    def __init__(self, place_name: str, index: int, state: AttentionState):
        self.name, self.index, self.state = place_name, index, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 value_states: torch.Tensor | None = None, key_states: torch.Tensor | None = None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, num_queries, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        values_in = value_states if (is_cross and value_states is not None) else context
        keys_in = key_states if (is_cross and key_states is not None) else context
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
            if values_in is not encoder_hidden_states:
                values_in = attn.norm_encoder_hidden_states(values_in)
            else:
                values_in = context
            keys_in = context if keys_in is encoder_hidden_states else attn.norm_encoder_hidden_states(keys_in)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        heads = attn.heads
        q = _split_heads(attn.to_q(hidden_states), heads)
        k = _split_heads(attn.to_k(keys_in), heads)
        v = _split_heads(attn.to_v(values_in), heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        state = self.state
        place = AttentionPlace(self.name, self.index, is_cross, num_queries, state.latent_tokens or num_queries)
        controller = state.controller
        if controller is not None:
            k, v = controller.edit_kv(k, v, place, state)
        reads_maps = controller is not None and controller.needs_maps(place, state)
        # Half precision: the layers whose maps an edit may read or change compute attention the explicit way,
        # in float32, whether or not a controller reads them now, so that a pass that reads maps there computes
        # bit for bit what a pass that does not (the inversion's) computed. Fused half-precision attention
        # differs from the explicit float32 maps in ~40 % of a layer's outputs, and in bf16 any such difference
        # grows (each step re-rounds, guidance multiplies by w): DirectInversion's bf16 reconstruction lost
        # ~12 dB on the test bed (docs/performance.md, "CUDA readiness"). In float32 nothing changes.
        if reads_maps or (place.maps_editable and q.dtype != torch.float32):
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = scores.softmax(dim=-1)
            if reads_maps:
                probs = controller(probs, place, state)
            out = torch.matmul(probs, v.float())  # the maps stay float32 into the product with the values
            if reads_maps:
                extra = controller.add_attention(q, probs, place, state)  # e.g. ELITE's local values
                if extra is not None:
                    out = out + extra.to(out.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)

        out = out.transpose(1, 2).reshape(batch, num_queries, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _forward_order(name: str) -> tuple:
    """Sort key that puts processor names in the UNet's forward order (down, mid, up)."""
    part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    head = name.split(".")[0]
    numbers = tuple(int(t) for t in name.split(".") if t.isdigit())
    return (part.get(head, 3), numbers, name)


def install_attention_control(unet) -> AttentionState:
    """Give every attention layer of ``unet`` a controlled processor sharing one new state."""
    existing = getattr(unet, "_stylediffusion_state", None)
    if existing is not None:
        return existing
    state = AttentionState()
    names = sorted(unet.attn_processors.keys(), key=_forward_order)
    layer_names = sorted({n.rsplit(".", 2)[0] for n in names}, key=_forward_order)
    layer_index = {ln: i for i, ln in enumerate(layer_names)}
    unet.set_attn_processor({n: ControlledAttnProcessor(n, layer_index[n.rsplit(".", 2)[0]], state) for n in names})
    unet._stylediffusion_state = state
    return state


@contextmanager
def controlled(state: AttentionState, controller: AttentionController | None) -> Iterator[AttentionState]:
    """Attach ``controller`` for the duration of a block, and always detach it afterwards."""
    previous = state.controller
    state.controller = controller
    try:
        yield state
    finally:
        state.controller = previous


class CrossAttentionRecorder(AttentionController):
    """Records the conditional rows' cross-attention maps of the mid-low layers, per step.

    With ``keep_grad`` the maps stay in the autograd graph (StyleDiffusion's attention loss);
    otherwise they are detached copies (the inversion's reference maps A*).
    """

    def __init__(self, keep_grad: bool = False):
        self.keep_grad = keep_grad
        self.maps: dict[int, list[torch.Tensor]] = {}

    def needs_maps(self, place, state):
        return place.is_cross and place.is_mid_low

    def __call__(self, probs, place, state):
        rows = state.layout.rows(COND) if state.layout is not None else list(range(probs.shape[0]))
        maps = probs[rows]
        self.maps.setdefault(state.step, []).append(maps if self.keep_grad else maps.detach().clone())
        return probs

    def reset(self):
        self.maps = {}


class CrossAttentionEdit:
    """How a target prompt's cross-attention maps are built from the source's (Prompt-to-Prompt)."""

    def mapped(self, source: torch.Tensor, target: torch.Tensor, prompt: int) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device) -> "CrossAttentionEdit":
        """Move the edit's tensors to ``device`` (once per run: ``mapped`` then copies nothing per call)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, CrossAttentionEdit):
                value.to(device)
        return self


class ReplacementEdit(CrossAttentionEdit):
    """Word swap: ``mappers[p-1]`` (source tokens x target tokens) spreads each source token's map."""

    def __init__(self, mappers: torch.Tensor):
        self.mappers = mappers

    def mapped(self, source, target, prompt):
        return torch.einsum("hnm,mk->hnk", source, self.mappers[prompt - 1].to(source))


class RefinementEdit(CrossAttentionEdit):
    """Added words: aligned target tokens take the source map, unaligned ones keep their own."""

    def __init__(self, mappers: torch.Tensor, alphas: torch.Tensor):
        self.mappers, self.alphas = mappers, alphas

    def mapped(self, source, target, prompt):
        alphas = self.alphas[prompt - 1].to(source)
        return source[..., self.mappers[prompt - 1].to(source.device)] * alphas + target * (1 - alphas)


class ReweightEdit(CrossAttentionEdit):
    """Scale chosen tokens' maps (no renormalisation), after an optional Replacement/Refinement."""

    def __init__(self, equalizer: torch.Tensor, base: CrossAttentionEdit | None = None):
        self.equalizer, self.base = equalizer, base

    def mapped(self, source, target, prompt):
        maps = self.base.mapped(source, target, prompt) if self.base is not None else source
        return maps * self.equalizer[prompt - 1].to(source)


class LocalBlend:
    """Keep the target's latent equal to the source's outside the blend words' attention masks.

    The mask is built from the mid-low cross-attention maps of the blend words (summed over their
    tokens, averaged over layers, heads and the steps so far), 3x3 max-pooled, upsampled to the
    latent, divided by its max and thresholded; the source's and the target's masks are united.
    """

    def __init__(self, word_tokens: torch.Tensor, num_steps: int, threshold: float = 0.3, start_fraction: float = 0.2):
        self.word_tokens = word_tokens  # (prompts, keys): 1 on the blend words' tokens
        self.start_step = int(start_fraction * num_steps)
        self.threshold = threshold
        self.last_mask: torch.Tensor | None = None

    def mask(self, maps: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """``maps``: (prompts, queries, keys) accumulated mid-low maps -> (prompts, 1, h, w) boolean."""
        h, w = latent_hw
        lh, lw = h // 4, w // 4
        m = (maps * self.word_tokens[:, None, :].to(maps)).sum(-1).reshape(-1, 1, lh, lw)
        m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=(h, w))
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return m > self.threshold

    def __call__(self, latents: torch.Tensor, maps: torch.Tensor, step: int) -> torch.Tensor:
        if step < self.start_step or maps is None:
            return latents
        mask = self.mask(maps, latents.shape[-2:])
        union = (mask[:1] | mask[1:]).to(latents.dtype)
        self.last_mask = union
        source = latents[:1]
        return torch.cat([source, source + union * (latents[1:] - source)])


class PromptToPromptController(AttentionController):
    """Prompt-to-Prompt editing with StyleDiffusion's P2Plus extension to the unconditional branch.

    Rows come from ``state.layout``; prompt 0 is the source. At step i:
    - cross-attention (conditional rows, every layer): target maps <- edited source maps, token by
      token with weight ``cross_alpha[i, p-1, token]`` (1 while i < tau_c*T for that word);
    - self-attention (layers with <= (latent/2)^2 queries): conditional target rows take the source
      row's maps while i < self_steps; unconditional rows likewise while i < uncond_self_steps (P2Plus);
    - the unconditional branch's cross-attention is never edited.
    The mid-low cross maps of the conditional rows are accumulated (after editing, as in the
    originals) for LocalBlend and for the attention-map picture.
    """

    def __init__(self, num_steps: int, cross_edit: CrossAttentionEdit | None, cross_alpha: torch.Tensor,
                 self_steps: int, uncond_self_steps: int = 0, local_blend: LocalBlend | None = None):
        self.num_steps = num_steps
        self.cross_edit = cross_edit
        self.cross_alpha = cross_alpha  # (num_steps, targets, keys)
        self.self_steps, self.uncond_self_steps = self_steps, uncond_self_steps
        self.local_blend = local_blend
        self.map_sum: torch.Tensor | None = None  # (prompts, queries, keys)
        self.map_count = 0
        self._active_steps: list[bool] | None = None  # per step: is any token's cross-attention replaced
        self._device: torch.device | None = None  # where the tensors above live

    def _cross_active(self, step: int) -> bool:
        if self._active_steps is None:  # read once from the host copy: no device sync per layer
            self._active_steps = [bool(a.any()) for a in self.cross_alpha.cpu()]
        return self.cross_edit is not None and step < self.num_steps and self._active_steps[step]

    def _move_to(self, device: torch.device) -> None:
        """Put the edit's tensors on the maps' device once, at the first map of a run."""
        self._cross_active(0)
        self.cross_alpha = self.cross_alpha.to(device, torch.float32)
        if self.cross_edit is not None:
            self.cross_edit.to(device)
        if self.local_blend is not None:
            self.local_blend.word_tokens = self.local_blend.word_tokens.to(device, torch.float32)
        self._device = device

    def needs_maps(self, place, state):
        if place.is_cross:
            return place.is_mid_low or self._cross_active(state.step)
        return place.self_replace_allowed and state.step < max(self.self_steps, self.uncond_self_steps)

    def __call__(self, probs, place, state):
        if probs.device != self._device:
            self._move_to(probs.device)
        layout, step = state.layout, state.step
        source_cond = layout.row(COND, 0)
        targets = range(1, layout.num_prompts)
        if place.is_cross:
            if self._cross_active(step):
                source = probs[source_cond]
                for p in targets:
                    r = layout.row(COND, p)
                    alpha = self.cross_alpha[step, p - 1].to(probs)
                    probs[r] = self.cross_edit.mapped(source, probs[r], p) * alpha + probs[r] * (1 - alpha)
            if place.is_mid_low:  # after the edit, as the originals store them (see _accumulate)
                self._accumulate(probs[layout.rows(COND)].mean(dim=1).detach())
            return probs
        for branch, active in ((COND, step < self.self_steps), (UNCOND, step < self.uncond_self_steps)):
            src_row = layout.row(branch, 0)
            if active and src_row is not None:
                for p in targets:
                    probs[layout.row(branch, p)] = probs[src_row]
        return probs

    def _accumulate(self, maps: torch.Tensor):
        """Add one mid-low layer's conditional maps, taken AFTER the cross-attention edit.

        Prompt-to-Prompt and StyleDiffusion store the map tensor and then edit a view of it in place,
        so their LocalBlend (and attention pictures) see the edited target maps; we do the same.
        """
        self.map_sum = maps.float() if self.map_sum is None else self.map_sum + maps.float()
        self.map_count += 1

    def average_maps(self) -> torch.Tensor | None:
        """Mid-low cross maps of each prompt, averaged over layers, heads and steps: (prompts, queries, keys)."""
        return None if self.map_sum is None else self.map_sum / self.map_count

    def after_step(self, latents, state):
        if self.local_blend is None:
            return latents
        return self.local_blend(latents, self.average_maps(), state.step)
