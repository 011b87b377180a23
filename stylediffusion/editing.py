"""Prompt-to-Prompt editing of an inverted image, with StyleDiffusion's value embeddings and P2Plus.

Batch layout: rows [uncond source, uncond target, cond source, cond target]; both prompts start
from z*_T. The source row is the reconstruction; the target row is the edit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import seq_aligner
from .attention_control import (
    BatchLayout,
    LocalBlend,
    PromptToPromptController,
    RefinementEdit,
    ReplacementEdit,
    ReweightEdit,
    controlled,
    install_attention_control,
)
from .ddim import DDIMSchedule, guided

# EDIT_TYPES and TAU_* re-exported: callers import the edit defaults from here too
from .defaults import EDIT_TYPES, GUIDANCE_SCALE, TAU_C, TAU_S, TAU_U, TAU_V  # noqa: F401
from .encoders import encode_prompts
from .errors import UserError
from .mapping import MappingNetworks
from .models import ModelBundle
from .sampling import predict
from .specs import spelled
from .training import embedding_inputs
from .validate import edit_spec  # the checks every caller shares (CLI, runners, API)


def default_edit_type(source: str, target: str) -> str:
    """Replacement when both prompts have the same number of words, Refinement otherwise."""
    return "Replacement" if len(source.split()) == len(target.split()) else "Refinement"


def num_steps_for(tau: float, num_steps: int) -> int:
    """How many of the first steps a fraction tau covers: Prompt-to-Prompt's ``int(tau * T)`` (tau_c,
    tau_s, tau_u), made robust to float noise (0.58 * 50 = 28.999999999999996 counts as 29 steps)."""
    return int(tau * num_steps + 1e-9)


def value_steps_for(tau_v: float, num_steps: int) -> int:
    """How many first steps use the learned values in the target branch: the authors' edit loop uses
    them while ``i < tau_v * T``, i.e. ``ceil(tau_v * T)`` steps (0.55 * 30 = 16.5 -> 17), made robust
    to float noise (0.56 * 50 = 28.000000000000004 counts as 28, not 29)."""
    return min(num_steps, max(0, math.ceil(tau_v * num_steps - 1e-9)))


@dataclass
class EditSpec:
    source: str
    target: str
    edit_type: str = "Replacement"
    tau_v: float = TAU_V
    tau_c: float | dict = TAU_C
    tau_s: float = TAU_S
    tau_u: float = TAU_U
    blend_words: tuple[str, str] | None = None
    eq_params: dict | None = None
    guidance_scale: float = GUIDANCE_SCALE
    blend_threshold: float = 0.3
    notes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        edit_spec(self)


def cross_alpha(spec: EditSpec, tokenizer, num_steps: int) -> torch.Tensor:
    """(T, 1, tokens): 1 where the target token's cross-attention is replaced at that step."""
    max_len = tokenizer.model_max_length
    tau = spec.tau_c if isinstance(spec.tau_c, dict) else {"default_": spec.tau_c}
    alpha = torch.zeros(num_steps, 1, max_len)
    alpha[: num_steps_for(float(tau.get("default_", 1.0)), num_steps)] = 1.0
    for word, value in tau.items():
        if word == "default_":
            continue
        idx = seq_aligner.word_token_indices(spec.target, word, tokenizer)
        alpha[:, 0, idx] = 0.0
        alpha[: num_steps_for(float(value), num_steps), 0, idx] = 1.0
    return alpha


def cross_attention_edit(spec: EditSpec, tokenizer):
    max_len = tokenizer.model_max_length
    same_words = len(seq_aligner.words(spec.source)) == len(seq_aligner.words(spec.target))
    if spec.edit_type == "Replacement":
        base = ReplacementEdit(seq_aligner.replacement_mapper(spec.source, spec.target, tokenizer, max_len)[None])
    elif spec.edit_type == "Refinement" or not same_words:
        mapper, alphas = seq_aligner.refinement_mapper(spec.source, spec.target, tokenizer, max_len)
        base = RefinementEdit(mapper[None], alphas[None])
    elif spec.source == spec.target:
        base = None  # a pure re-weighting of the source's own maps
    else:
        base = ReplacementEdit(seq_aligner.replacement_mapper(spec.source, spec.target, tokenizer, max_len)[None])
    if spec.eq_params:
        return ReweightEdit(seq_aligner.reweight_vector(spec.target, spec.eq_params, tokenizer, max_len)[None], base)
    return base


def build_controller(spec: EditSpec, tokenizer, num_steps: int) -> PromptToPromptController:
    """Validate the edit and turn it into the attention controller (all user errors surface here)."""
    spec.validate()
    local_blend = None
    if spec.blend_words:
        if len(spec.blend_words) != 2:
            raise UserError(f"{spelled('blend_word')} needs two words (source word, target word), got "
                            f"{spec.blend_words!r}.")
        word_tokens = torch.zeros(2, tokenizer.model_max_length)
        for p, (prompt, word) in enumerate(zip((spec.source, spec.target), spec.blend_words)):
            word_tokens[p, seq_aligner.word_token_indices(prompt, word, tokenizer)] = 1.0
        local_blend = LocalBlend(word_tokens, num_steps, threshold=spec.blend_threshold)
    return PromptToPromptController(
        num_steps, cross_attention_edit(spec, tokenizer), cross_alpha(spec, tokenizer, num_steps),
        self_steps=num_steps_for(spec.tau_s, num_steps), uncond_self_steps=num_steps_for(spec.tau_u, num_steps),
        local_blend=local_blend,
    )


class EditHooks:
    """Per-step changes an inversion method makes to the edit loop; the defaults change nothing.

    Rows of ``text`` and of the noise predictions follow ``BatchLayout.guided(2)``: [uncond source,
    uncond target, cond source, cond target]; latents have one row per prompt [source, target].
    """

    def text(self, i: int, text: torch.Tensor) -> torch.Tensor:
        """The text embeddings of step i (e.g. Null-text's per-step unconditional embedding)."""
        return text

    def guide(self, i: int, eps_u: torch.Tensor, eps_c: torch.Tensor, z: torch.Tensor, guidance_scale: float):
        """The guided noise of step i from the unconditional and conditional predictions."""
        return guided(eps_u, eps_c, guidance_scale)

    def after_step(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """The latents after step i, before the controller's LocalBlend (e.g. DirectInversion's offsets:
        PnPInversion adds the offset to the source row and then blends, so the target row outside the
        mask takes the corrected source latent)."""
        return z

    def target_values(self, i: int, values: torch.Tensor, plain: torch.Tensor, spec: "EditSpec",
                      tokenizer) -> torch.Tensor:
        """The target row's conditional value input of step i: ``values`` is what the edit loop chose (the
        learned values while i < tau_v T, else the plain embedding), ``plain`` the target prompt's own
        embedding (e.g. StyleDiffusion+ keeps the learned values off the words the edit changes)."""
        return values


@dataclass
class EditLatents:
    """What ``run_edit`` returns: the final latents of both rows and the controller that made them."""

    latents: torch.Tensor  # (2, C, h, w): source (reconstruction) and target (edit)
    controller: PromptToPromptController


@torch.no_grad()
def run_edit(bundle: ModelBundle, schedule: DDIMSchedule, z_T: torch.Tensor, spec: EditSpec,
             mappers: MappingNetworks | None = None, image_features: torch.Tensor | None = None,
             controller: PromptToPromptController | None = None, progress: bool = True,
             hooks: EditHooks | None = None, embedding: str = "value",
             step_callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> EditLatents:
    """P2P/P2Plus edit from z*_T. With ``mappers`` the conditional rows use learned value inputs:
    the source row at every step, the target row while i < tau_v*T (then its plain embedding).
    ``hooks`` lets other inversions change the text, the guidance or the latents of each step;
    ``embedding`` ("value", "key", "key_value") is where the learned embedding goes (training ablations);
    ``step_callback(i, z)`` gets the latents at the end of every step (after LocalBlend) and returns them."""
    T = schedule.num_steps
    controller = controller or build_controller(spec, bundle.tokenizer, T)
    state = install_attention_control(bundle.unet)
    layout = BatchLayout.guided(2)
    cond = encode_prompts(bundle, [spec.source, spec.target])
    uncond = encode_prompts(bundle, [""]).expand(2, -1, -1)
    text = torch.cat([uncond, cond])
    value_steps = value_steps_for(spec.tau_v, T)
    z = z_T.to(bundle.device).expand(2, -1, -1, -1).clone()
    if mappers is not None:
        mappers.to(bundle.device).eval()
    with controlled(state, controller):
        for i in tqdm(range(T), desc="P2Plus edit", disable=not progress, leave=False):
            values = None
            if mappers is not None:
                v_src = mappers[i](image_features, cond[:1])
                v_tgt = mappers[i](image_features, cond[1:]) if i < value_steps else cond[1:]
                if hooks is not None:
                    v_tgt = hooks.target_values(i, v_tgt, cond[1:], spec, bundle.tokenizer)
                values = torch.cat([uncond, v_src, v_tgt])
            step_text = text if hooks is None else hooks.text(i, text)
            if values is not None and step_text is not text:
                values = torch.cat([step_text[:2], values[2:]])
            eps_u, eps_c = predict(bundle, schedule, torch.cat([z, z]), i, step_text, layout,
                                   **embedding_inputs(embedding, values)).chunk(2)
            eps = guided(eps_u, eps_c, spec.guidance_scale) if hooks is None else \
                hooks.guide(i, eps_u, eps_c, z, spec.guidance_scale)
            z = schedule.sample_step(eps, z, i)
            if hooks is not None:  # e.g. DirectInversion's offset: added before LocalBlend, as PnPInversion does
                z = hooks.after_step(i, z)
            z = controller.after_step(z, state)
            if step_callback is not None:
                z = step_callback(i, z)
    return EditLatents(z, controller)
