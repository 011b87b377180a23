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
from ..results import Inversion
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


# One result type for every inversion (``results.Inversion``); ``Inverted`` is its former name.
Inverted = Inversion


@dataclass
class MethodOutput:
    latents: torch.Tensor  # (2, C, h, w): reconstruction (source row), edit (target row)
    inverted: Inverted
    attention_maps: torch.Tensor | None = None  # (prompts, queries, tokens) averaged mid-low maps, if recorded
    seconds: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodOption:
    """A ``--method_option`` a method takes: its default (whose type every value must have), and the
    allowed values (``choices``) or range. ``convert`` is the one check every value goes through."""

    name: str
    default: bool | int | float | str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None

    def convert(self, value):
        from .. import validate

        what = f"--method_option {self.name}"
        if isinstance(self.default, bool):
            words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                     "off": False}
            key = str(value).strip().lower()
            if isinstance(value, (bool, int, str)) and key in words:
                return words[key]
            raise UserError(f"{what}={value!r} is not True or False.")
        if isinstance(self.default, str):
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise UserError(f"{what}={value!r} is not one of {', '.join(self.choices)}." if self.choices
                                else f"{what}={value!r} is not text.")
            return value
        return validate.number(value, what, minimum=self.minimum, maximum=self.maximum,
                               integer=isinstance(self.default, int))

    def describe(self) -> str:
        allowed = "|".join(self.choices) if self.choices else (
            f"{type(self.default).__name__}" + (f" in [{self.minimum}, {self.maximum}]"
                                                if self.minimum is not None or self.maximum is not None else ""))
        return f"{self.name}={self.default} ({allowed})"


@dataclass(frozen=True)
class InversionMethod:
    name: str
    paper: str
    defaults: str
    invert: Callable[[MethodContext], Inverted]
    options: tuple[MethodOption, ...] = ()


@dataclass(frozen=True)
class EditMethod:
    name: str
    paper: str
    defaults: str
    inversions: tuple[str, ...]  # the inversions this edit is defined for
    edit: Callable[[MethodContext, Inverted, EditSpec], MethodOutput]
    options: tuple[MethodOption, ...] = ()


INVERSIONS: dict[str, InversionMethod] = {}
EDITS: dict[str, EditMethod] = {}
OPTIONS: dict[str, MethodOption] = {}  # every declared option by name (names carry their method's prefix)


def _declare(options) -> tuple[MethodOption, ...]:
    for opt in options:
        if OPTIONS.get(opt.name, opt) != opt:
            raise ValueError(f"method option {opt.name!r} is declared twice, differently")
        OPTIONS[opt.name] = opt
    return tuple(options)


def register_inversion(name: str, paper: str, defaults: str = "", options: tuple[MethodOption, ...] = ()):
    def wrap(fn):
        INVERSIONS[name] = InversionMethod(name, paper, defaults, fn, _declare(options))
        return fn
    return wrap


def register_edit(name: str, paper: str, inversions: tuple[str, ...], defaults: str = "",
                  options: tuple[MethodOption, ...] = ()):
    def wrap(fn):
        EDITS[name] = EditMethod(name, paper, defaults, tuple(inversions), fn, _declare(options))
        return fn
    return wrap


def check_method_options(options: dict, inversion: str, edit: str | None = None) -> dict:
    """The user's method options, converted to their declared types; an option that neither the
    inversion nor the edit takes (a typo, or another method's option) is refused, naming those they take."""
    declared = {o.name: o for o in get_inversion(inversion).options}
    if edit is not None:
        declared.update({o.name: o for o in get_edit(edit, inversion).options})
    out = {}
    for key, value in options.items():
        if key not in declared:
            takes = ", ".join(o.describe() for o in declared.values()) or "none"
            where = inversion + (f" + {edit}" if edit else "")
            raise UserError(f"--method_option {key!r} is not an option of {where} (options: {takes}).")
        out[key] = declared[key].convert(value)
    return out


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
