"""ELITE (Wei et al., "ELITE: Encoding Visual Concepts into Textual Embeddings for Customized Text-to-Image
Generation", ICCV 2023): its two mapping networks, their weight files, and how their outputs reach the
text encoder and the UNet's cross-attention.

- Global mapping network: CLIP ViT-L/14 hidden states of five layers (the last one and layers 4, 8,
  12, 16 of 24) -> five word embeddings; word k = mapping_k(CLS token of layer k) + the mean over
  patch tokens of mapping_patch_k(patches of layer k). Word 0 is the primary word, the one the prompt's
  placeholder (``*`` or ``S``) stands for. The same file holds ELITE's fine-tuned cross-attention key
  and value projections (``<layer>_to_k``, ``<layer>_to_v``, one pair per cross-attention layer).
- Local mapping network: the same layers of the *object* image (reference times its mask) -> one
  value per patch token, averaged over the five layers and zeroed outside the mask. In every
  cross-attention layer they give extra keys/values (``<layer>_to_k``/``_to_v`` of the local file);
  their attention output, weighted by the placeholder's own cross-attention map (normalised by its
  maximum) and by lambda, is added to the layer's output.

State-dict keys are those of the authors' ``global_mapper.pt`` / ``local_mapper.pt``
(``mapping_0.0.weight`` ... ``mapping_patch_4.6.bias``,
``down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.weight`` ...): ``convert_elite`` turns those
pickles into safetensors once; this module reads only safetensors.
The placeholder's embedding enters through the text encoder's token-embedding output (a forward hook
on the embedding layer, no replaced ``forward``); the projections and local values through the
project's attention processors (``attention_control``).
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from . import seq_aligner
from .attention_control import COND, UNCOND, AttentionController
from .clip_preprocess import clip_pixel_values
from .encoders import encode_prompts
from .errors import UserError
from .models import _load_component, _missing_weights, _quiet_loading

FORMAT = "stylediffusion-elite"
KINDS = ("global", "local")
NUM_WORDS = 5
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
# ELITE's layer choice for ViT-L/14 (24 layers): hidden_states[24] (= last_hidden_state), [4], [8], [12], [16]
OFFICIAL_LAYERS = (24, 4, 8, 12, 16)
_MLP_KEYS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias", "6.weight",
             "6.bias")
_PROJECTION = re.compile(r"^((?:down_blocks_\d+_attentions_\d+|mid_block_attentions_\d+|up_blocks_\d+_attentions_\d+)"
                         r"_transformer_blocks_\d+_attn2)_to_([kv])\.weight$")


def feature_layers(num_layers: int) -> tuple[int, ...]:
    """Which ``hidden_states`` feed the five words: ELITE's (24, 4, 8, 12, 16) for ViT-L/14's 24 layers,
    the same fractions of the depth for a tower of another depth (reduced test towers)."""
    return tuple(max(1, round(k * num_layers / 24)) for k in OFFICIAL_LAYERS)


def _mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    # indices 0..6 are the state-dict keys of the authors' files (LeakyReLUs at 2 and 5 hold no weights)
    return nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.LeakyReLU(),
                         nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.LeakyReLU(),
                         nn.Linear(hidden_dim, output_dim))


def projection_name(processor_or_module: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2(.processor)`` -> the authors' module name
    ``down_blocks_0_attentions_0_transformer_blocks_0_attn2``."""
    return processor_or_module.removesuffix(".processor").replace(".", "_")


def unet_cross_attention_layers(unet) -> dict[str, int]:
    """{authors' name: inner width} of every cross-attention layer (attn2) of a diffusers UNet."""
    return {projection_name(name): int(module.to_k.weight.shape[0]) for name, module in unet.named_modules()
            if name.endswith("attn2") and hasattr(module, "to_k")}


class EliteMapper(ModelMixin, ConfigMixin):
    """ELITE's mapping network, global (``kind="global"``: five words) or local (one value per patch).

    Both have the authors' layout: ``mapping_{k}`` and ``mapping_patch_{k}`` for k < 5, each
    Linear(input, hidden) - LayerNorm - LeakyReLU - Linear(hidden, hidden) - LayerNorm - LeakyReLU -
    Linear(hidden, output), plus one bias-free key and value projection (output -> layer width) per
    cross-attention layer. ELITE's own: input 1024 (ViT-L/14), hidden 1024, output 768 (SD v1 text).
    """

    @register_to_config
    def __init__(self, kind: str = "global", input_dim: int = 1024, hidden_dim: int = 1024, output_dim: int = 768,
                 attention_layers: tuple = (), attention_widths: tuple = ()):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        for k in range(NUM_WORDS):
            setattr(self, f"mapping_{k}", _mlp(input_dim, hidden_dim, output_dim))
            setattr(self, f"mapping_patch_{k}", _mlp(input_dim, hidden_dim, output_dim))
        for name, width in zip(attention_layers, attention_widths):
            setattr(self, f"{name}_to_k", nn.Linear(output_dim, int(width), bias=False))
            setattr(self, f"{name}_to_v", nn.Linear(output_dim, int(width), bias=False))

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """Five (B, 1 + patches, input) hidden states -> global: (B, 5, output) words; local: (B, patches,
        output) values (the five layers' mapping_k(CLS) + mapping_patch_k(patch), averaged)."""
        out = []
        for k, h in enumerate(hidden_states):
            cls, patches = h[:, :1], h[:, 1:]
            mapped = getattr(self, f"mapping_patch_{k}")(patches)
            if self.config.kind == "global":
                mapped = mapped.mean(dim=1, keepdim=True)
            out.append(getattr(self, f"mapping_{k}")(cls) + mapped)
        return torch.cat(out, dim=1) if self.config.kind == "global" else torch.stack(out).mean(dim=0)

    def projection(self, layer: str, which: str) -> nn.Linear | None:
        return getattr(self, f"{layer}_to_{which}", None)


def config_from_state_dict(state: dict[str, torch.Tensor], kind: str, source: str) -> dict:
    """The ``EliteMapper`` config a flat state dict in the authors' layout describes; anything else in it
    (a missing or unknown key, a shape that does not fit the layout) is a UserError naming it."""
    if kind not in KINDS:
        raise UserError(f"{source}: the ELITE mapper kind must be global or local, not {kind!r}.")
    first = state.get("mapping_0.0.weight")
    last = state.get("mapping_0.6.weight")
    if not isinstance(first, torch.Tensor) or first.ndim != 2 or not isinstance(last, torch.Tensor) or last.ndim != 2:
        raise UserError(f"{source} is not an ELITE {kind} mapper: it has no 2-D 'mapping_0.0.weight' and "
                        f"'mapping_0.6.weight' (the authors' global_mapper.pt / local_mapper.pt have them).")
    hidden, input_dim = first.shape
    output_dim = int(last.shape[0])
    expected = {}
    for prefix in [f"mapping_{k}" for k in range(NUM_WORDS)] + [f"mapping_patch_{k}" for k in range(NUM_WORDS)]:
        shapes = [(hidden, input_dim), (hidden,), (hidden,), (hidden,), (hidden, hidden), (hidden,), (hidden,),
                  (hidden,), (output_dim, hidden), (output_dim,)]
        expected.update({f"{prefix}.{key}": shape for key, shape in zip(_MLP_KEYS, shapes)})
    layers: dict[str, int] = {}
    for key, value in state.items():
        match = _PROJECTION.match(key)
        if match is not None:
            if value.ndim != 2 or int(value.shape[1]) != output_dim:
                raise UserError(f"{source}: '{key}' has shape {tuple(value.shape)}, not (width, {output_dim}).")
            width = layers.setdefault(match.group(1), int(value.shape[0]))
            if width != int(value.shape[0]):
                raise UserError(f"{source}: the key and value projections of '{match.group(1)}' differ in width.")
        elif key not in expected:
            raise UserError(f"{source}: unexpected key '{key}' for an ELITE {kind} mapper (it holds mapping_0..4, "
                            f"mapping_patch_0..4 and <layer>_attn2_to_k/_to_v weights only).")
    for name in layers:
        expected[f"{name}_to_k.weight"] = expected[f"{name}_to_v.weight"] = (layers[name], output_dim)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{source}: missing key(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} of an "
                        f"ELITE {kind} mapper ({len(missing)} in all).")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise UserError(f"{source}: '{key}' has shape {tuple(state[key].shape)}, expected {tuple(shape)}.")
    if not layers:
        raise UserError(f"{source} holds no cross-attention projections (<layer>_attn2_to_k.weight): not an ELITE "
                        f"mapper file.")
    names = sorted(layers)
    return {"kind": kind, "input_dim": int(input_dim), "hidden_dim": int(hidden), "output_dim": output_dim,
            "attention_layers": names, "attention_widths": [layers[n] for n in names]}


def check_mapper_file(path: str | Path, kind: str, flag: str) -> None:
    """Refuse, from the header only, a missing file, a pickle, or a safetensors file that is not ELITE's
    ``kind`` mapper written by ``convert_elite``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} '{path}' does not exist: convert the authors' {kind}_mapper.pt once with "
                        f"'python -m stylediffusion.convert_elite {kind}_mapper.pt {path.name}'.")
    if path.suffix != ".safetensors":
        raise UserError(f"{flag} '{path}' is not a .safetensors file: the toolkit never loads pickles at run time; "
                        f"convert it with 'python -m stylediffusion.convert_elite {path.name} "
                        f"{path.with_suffix('.safetensors').name}'.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{flag} '{path}' is not a readable safetensors file ({one_reason(err)}).") from err
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise UserError(f"{flag} '{path}' is not ELITE's {kind} mapper converted by stylediffusion.convert_elite "
                        f"(its metadata says format={meta.get('format')!r}, kind={meta.get('kind')!r}).")


def read_mapper(path: str | Path, kind: str, flag: str) -> EliteMapper:
    """An ``EliteMapper`` from a safetensors file written by ``convert_elite``; never a pickle."""
    check_mapper_file(path, kind, flag)
    state = load_file(str(path))
    config = config_from_state_dict(state, kind, f"{flag} '{path}'")
    if any(not t.is_floating_point() or not torch.isfinite(t).all() for t in state.values()):
        raise UserError(f"{flag} '{path}' holds non-float or non-finite (NaN/inf) weights: convert it again.")
    mapper = EliteMapper(**config)
    mapper.load_state_dict(state, strict=True)
    return mapper.requires_grad_(False).eval()


def one_reason(err: Exception) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__


def check_fits(mapper: EliteMapper, bundle, flag: str, vision_width: int) -> None:
    """The mapper's widths and layers must be this model's: its text width, its cross-attention layers."""
    text_width = int(bundle.text_encoder.config.hidden_size)
    cfg = mapper.config
    if cfg.output_dim != text_width:
        raise UserError(f"{flag}: the ELITE mapper makes {cfg.output_dim}-wide words, the model's text encoder is "
                        f"{text_width} wide (ELITE was trained for Stable Diffusion v1.x: 768).")
    if cfg.input_dim != vision_width:
        raise UserError(f"{flag}: the ELITE mapper reads {cfg.input_dim}-wide image features, the ELITE image "
                        f"encoder gives {vision_width} (ELITE uses CLIP ViT-L/14: 1024).")
    layers = unet_cross_attention_layers(bundle.unet)
    have = dict(zip(cfg.attention_layers, cfg.attention_widths))
    if have != layers:
        odd = sorted(set(have.items()) ^ set(layers.items()))[:2]
        raise UserError(f"{flag}: the ELITE mapper's cross-attention projections do not match this UNet's layers "
                        f"(first differences: {odd}); ELITE's weights are for Stable Diffusion v1.x.")


def load_image_encoder(name: str, device, dtype):
    """The CLIP ViT-L/14 vision tower, a hub id or local folder, safetensors only, frozen."""
    try:
        with _quiet_loading():
            encoder = _load_component(CLIPVisionModel, str(name), None, prefer_half=dtype != torch.float32)
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise _missing_weights("ELITE image encoder (CLIP ViT-L/14)", str(name), "--elite_image_encoder", err) from err
    encoder.requires_grad_(False).eval()
    return encoder.to(device=device, dtype=dtype)


@torch.no_grad()
def image_hidden_states(encoder, image: torch.Tensor) -> list[torch.Tensor]:
    """The five hidden states ELITE reads, (1, 1 + patches, width) each, fp32, for an SD image in [-1, 1]."""
    x = (image.to(encoder.device, torch.float32) + 1) / 2
    pixels = clip_pixel_values(x, int(encoder.config.image_size))
    out = encoder(pixel_values=pixels.to(encoder.dtype), output_hidden_states=True)
    layers = feature_layers(int(encoder.config.num_hidden_layers))
    return [out.hidden_states[k].float() for k in layers]


def patch_mask(mask: torch.Tensor, encoder) -> torch.Tensor:
    """(1, 1, H, W) binary mask -> (1, patches, 1) on the vision tower's patch grid (nearest, as ELITE)."""
    grid = int(encoder.config.image_size) // int(encoder.config.patch_size)
    m = torch.nn.functional.interpolate(mask.float(), size=(grid, grid), mode="nearest")
    return m.reshape(1, -1, 1)


@contextmanager
def injected_token_embeddings(text_encoder, positions: dict[tuple[int, int], torch.Tensor]):
    """While active, the text encoder's token-embedding output at (row, position) is the given vector: the
    placeholder word enters the encoder as its input embedding (the position embedding is added after)."""
    embedding = text_encoder.get_input_embeddings()

    def hook(_module, _inputs, output):
        output = output.clone()
        for (row, pos), vector in positions.items():
            output[row, pos] = vector.to(output.dtype)
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def encode_with_word(bundle, prompt: str, position: int, word: torch.Tensor) -> torch.Tensor:
    """(1, tokens, width) text embedding of ``prompt`` whose token at ``position`` is the vector ``word``."""
    with injected_token_embeddings(bundle.text_encoder, {(0, position): word.to(bundle.device)}):
        return encode_prompts(bundle, [prompt])


def placeholder_position(prompt: str, placeholder: str, tokenizer) -> int:
    """The token position of the placeholder word in ``prompt``; it must be there, once, as one token."""
    found = [k for k, w in enumerate(seq_aligner.words(prompt)) if w.lower() == placeholder.lower()]
    if not found:
        raise UserError(f"the target prompt {prompt!r} has no placeholder word {placeholder!r}: ELITE puts the "
                        f"reference's concept there (e.g. 'a photo of a white {placeholder}').")
    positions = seq_aligner.word_token_indices(prompt, found[0], tokenizer)
    if len(found) != 1 or len(positions) != 1:
        raise UserError(f"the placeholder {placeholder!r} must appear once in the target prompt and be one token "
                        f"(it is {len(positions)} tokens there): use '*' or 'S'.")
    return positions[0]


@dataclass
class LocalValues:
    """ELITE's local branch for one reference: per-patch values (1, patches, text width), masked."""

    tokens: torch.Tensor
    mapper: EliteMapper
    weight: float  # lambda


class EliteAttention(AttentionController):
    """ELITE's part of the edit's cross-attention, around the edit's own controller (``inner``).

    Rows are those of ``state.layout``; the target prompt (prompt 1) carries the concept.
    - ``projections``: a mapper whose ``<layer>_to_k``/``_to_v`` give the target rows' (both branches)
      cross-attention keys and values from ``step_text`` (ELITE's fine-tuned projections); None keeps
      the UNet's own projections. The source rows always keep the UNet's, so the reconstruction follows
      the inversion.
    - ``local``: in the conditional target row, lambda * (placeholder map / its max) * softmax(q k_loc^T)
      v_loc is added to every cross-attention layer's output (ELITE's local mapping).
    ``step_text`` is set by the edit loop's hooks before each UNet call (the rows' text that step).
    """

    def __init__(self, inner: AttentionController, placeholder: int, projections: EliteMapper | None = None,
                 local: LocalValues | None = None):
        self.inner, self.placeholder = inner, placeholder
        self.projections, self.local = projections, local
        self.step_text: torch.Tensor | None = None
        self._local_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def needs_maps(self, place, state):
        return self.inner.needs_maps(place, state) or (self.local is not None and place.is_cross)

    def __call__(self, probs, place, state):
        return self.inner(probs, place, state) if self.inner.needs_maps(place, state) else probs

    def after_step(self, latents, state):
        return self.inner.after_step(latents, state)

    def average_maps(self):
        average = getattr(self.inner, "average_maps", None)
        return average() if average is not None else None

    def edit_kv(self, k, v, place, state):
        k, v = self.inner.edit_kv(k, v, place, state)
        if not place.is_cross or self.projections is None or self.step_text is None:
            return k, v
        layer = projection_name(place.name)
        to_k, to_v = self.projections.projection(layer, "k"), self.projections.projection(layer, "v")
        k, v = k.clone(), v.clone()
        heads = k.shape[1]
        for branch in (UNCOND, COND):
            row = state.layout.row(branch, 1)
            if row is None:
                continue
            text = self.step_text[row:row + 1].to(to_k.weight.dtype)
            k[row] = _heads(to_k(text), heads)[0].to(k.dtype)
            v[row] = _heads(to_v(text), heads)[0].to(v.dtype)
        return k, v

    def add_attention(self, q, probs, place, state):
        extra = self.inner.add_attention(q, probs, place, state)
        row = state.layout.row(COND, 1)
        if self.local is None or not place.is_cross or row is None:
            return extra
        layer = projection_name(place.name)
        if layer not in self._local_kv:  # the local tokens depend only on the reference: project them once
            tokens = self.local.tokens.to(self.local.mapper.dtype)
            heads = q.shape[1]
            self._local_kv[layer] = (_heads(self.local.mapper.projection(layer, "k")(tokens), heads)[0],
                                     _heads(self.local.mapper.projection(layer, "v")(tokens), heads)[0])
        k_loc, v_loc = self._local_kv[layer]
        query = q[row].float()
        scores = torch.matmul(query, k_loc.float().transpose(-1, -2)) * query.shape[-1] ** -0.5
        word_map = probs[row, :, :, self.placeholder].float()  # (heads, queries): where the concept word attends
        weight = (word_map / word_map.max().clamp_min(1e-12)).unsqueeze(-1) * self.local.weight
        local = torch.matmul(scores.softmax(dim=-1) * weight, v_loc.float())
        out = torch.zeros(q.shape[0], *local.shape, dtype=torch.float32, device=q.device)
        out[row] = local
        return out if extra is None else extra + out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def metadata(kind: str, config: dict, source: str, sha256: str) -> dict[str, str]:
    """The safetensors metadata of a converted mapper (strings only, as the format requires)."""
    return {"format": FORMAT, "kind": kind, "config": json.dumps(config), "source": source, "source_sha256": sha256,
            "note": "ELITE (Wei et al., ICCV 2023) mapping network, converted from the authors' pickled state dict"}
