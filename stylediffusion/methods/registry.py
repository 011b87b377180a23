"""The one place where inversion and edit methods are registered and combined.

An inversion turns (image, source prompt) into an ``Inverted``: z_T plus whatever its edits need
(StyleDiffusion's mapping networks, Null-text's per-step embeddings, DirectInversion's offsets...).
An edit turns an ``Inverted`` and an ``EditSpec`` into latents [reconstruction, edit].
Adding a method = one class with ``name``, ``paper``, ``defaults`` and one function, registered with
``@register_inversion`` / ``@register_edit``; an edit lists the inversions it is defined for.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..ddim import DDIMSchedule
from ..editing import EditSpec
from ..errors import UserError
from ..models import ModelBundle
from ..training import TrainConfig


@dataclass
class MethodContext:
    bundle: ModelBundle
    image: torch.Tensor  # (1, 3, S, S) in [-1, 1]
    source: str
    num_steps: int = 30
    train_cfg: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: Path | None = None  # where an optimising inversion stores/loads its result
    progress: bool = True
    options: dict = field(default_factory=dict)  # method-specific options (e.g. {"variant": "replace"})

    @property
    def schedule(self) -> DDIMSchedule:
        return DDIMSchedule(self.bundle.scheduler, self.num_steps)


@dataclass
class Inverted:
    """The result of an inversion, with everything an edit may use. Unused fields stay None."""

    method: str
    z0: torch.Tensor
    z_T: torch.Tensor
    mappers: object | None = None  # MappingNetworks (StyleDiffusion)
    image_features: torch.Tensor | None = None
    uncond_embeddings: list[torch.Tensor] | None = None  # per step (Null-text)
    cond_embedding: torch.Tensor | None = None
    trajectory: list[torch.Tensor] | None = None  # z*_0..z*_T
    extras: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


@dataclass
class MethodOutput:
    latents: torch.Tensor  # (2, C, h, w): reconstruction (source row), edit (target row)
    inverted: Inverted
    attention_maps: torch.Tensor | None = None  # (prompts, queries, tokens) averaged mid-low maps, if recorded
    seconds: dict = field(default_factory=dict)


@dataclass(frozen=True)
class InversionMethod:
    name: str
    paper: str
    defaults: str
    invert: Callable[[MethodContext], Inverted]


@dataclass(frozen=True)
class EditMethod:
    name: str
    paper: str
    defaults: str
    inversions: tuple[str, ...]  # the inversions this edit is defined for
    edit: Callable[[MethodContext, Inverted, EditSpec], MethodOutput]


INVERSIONS: dict[str, InversionMethod] = {}
EDITS: dict[str, EditMethod] = {}


def register_inversion(name: str, paper: str, defaults: str = ""):
    def wrap(fn):
        INVERSIONS[name] = InversionMethod(name, paper, defaults, fn)
        return fn
    return wrap


def register_edit(name: str, paper: str, inversions: tuple[str, ...], defaults: str = ""):
    def wrap(fn):
        EDITS[name] = EditMethod(name, paper, defaults, tuple(inversions), fn)
        return fn
    return wrap


def get_inversion(name: str) -> InversionMethod:
    _load_builtin_methods()
    if name not in INVERSIONS:
        raise UserError(f"unknown --inversion {name!r}; registered: {', '.join(sorted(INVERSIONS))}.")
    return INVERSIONS[name]


def get_edit(name: str, inversion: str) -> EditMethod:
    _load_builtin_methods()
    if name not in EDITS:
        raise UserError(f"unknown --edit {name!r}; registered: {', '.join(sorted(EDITS))}.")
    method = EDITS[name]
    if inversion not in method.inversions:
        valid = [f"{inv}+{ed}" for ed, m in sorted(EDITS.items()) for inv in m.inversions if ed == name]
        raise UserError(f"--inversion {inversion} with --edit {name} is not a combination the literature defines; "
                        f"valid with --edit {name}: {', '.join(valid)}.")
    return method


def describe_methods() -> str:
    _load_builtin_methods()
    lines = ["inversions:"]
    lines += [f"  {m.name:<15} {m.paper}" + (f"  [{m.defaults}]" if m.defaults else "") for m in INVERSIONS.values()]
    lines.append("edits:")
    lines += [f"  {m.name:<15} {m.paper}  (with: {', '.join(m.inversions)})" + (f"  [{m.defaults}]" if m.defaults else "")
              for m in EDITS.values()]
    return "\n".join(lines)


def run_method(ctx: MethodContext, spec: EditSpec, inversion: str = "stylediffusion", edit: str = "p2p",
               inverted: Inverted | None = None) -> MethodOutput:
    """Invert (unless ``inverted`` is given) and edit; the combination is checked before any work."""
    edit_method = get_edit(edit, inversion)
    inversion_method = get_inversion(inversion)
    spec.validate()
    t0 = time.perf_counter()
    if inverted is None:
        inverted = inversion_method.invert(ctx)
    t1 = time.perf_counter()
    out = edit_method.edit(ctx, inverted, spec)
    out.seconds = {"inversion": t1 - t0, "edit": time.perf_counter() - t1, **out.seconds}
    return out


def _load_builtin_methods() -> None:
    from . import builtin  # noqa: F401  (registers on import)
