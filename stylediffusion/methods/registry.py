"""The registry of inversion and edit methods, and how they are combined.

An inversion (``InversionMethod`` subclass) turns (image, source prompt) into an ``Inversion``: z_T plus
whatever its edits need (StyleDiffusion's mapping networks, Null-text's per-step embeddings,
DirectInversion's offsets...), and owns what it changes in the edit loop (``edit_hooks``,
``edit_inputs``). An edit (``EditMethod`` subclass) turns an ``Inversion`` and an ``EditSpec`` into
latents [reconstruction, edit] and lists the inversions it is defined for. Instances are registered
explicitly, in ``methods/__init__.py``; docs/methods.md shows how to add one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import validate
from ..ddim import DDIMSchedule
from ..defaults import NUM_DDIM_STEPS
from ..editing import EditHooks, EditSpec
from ..errors import UserError
from ..models import ModelBundle
from ..results import Inversion
from ..specs import given, option
from ..training import TrainConfig


@dataclass
class MethodContext:
    bundle: ModelBundle
    image: torch.Tensor  # (1, 3, S, S) in [-1, 1]
    source: str
    num_steps: int = NUM_DDIM_STEPS
    train_cfg: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: Path | None = None  # where an optimising inversion stores/loads its result
    progress: bool = True
    options: dict = field(default_factory=dict)  # method-specific options (e.g. {"variant": "replace"})
    # The caller's generator (``generator=`` of the API): every draw of the method comes from it when it
    # is given; None = each method's own seed option (``generated_seed``, ``sdedit_seed``).
    generator: torch.Generator | None = None
    # Called after every denoising step (of an edit, or a generating inversion) with (step index, latents); what it
    # returns (None = unchanged) are the latents from then on (the API's ``callback_on_step_end``).
    step_callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None

    @property
    def schedule(self) -> DDIMSchedule:
        return DDIMSchedule(self.bundle.scheduler, self.num_steps)

    def randn(self, shape, seed: int) -> torch.Tensor:
        """N(0, I) float32 noise of ``shape``: drawn from the caller's generator (on its device) when one
        was given, else from a fresh CPU generator seeded with ``seed`` (the method's seed option)."""
        generator = self.generator if self.generator is not None else torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)

    def after_step(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """The latents after step ``i`` as ``step_callback`` leaves them (unchanged without one)."""
        if self.step_callback is None:
            return z
        new = self.step_callback(i, z)
        return z if new is None else new


# The one result type of every inversion is ``results.Inversion``; ``Inverted`` is its former name.
Inverted = Inversion


@dataclass
class MethodOutput:
    latents: torch.Tensor  # (2, C, h, w): reconstruction (source row), edit (target row)
    inverted: Inversion
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
        what = option(self.name)  # "--method_option name" on the command line, "name=" from Python
        if isinstance(self.default, bool):
            words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                     "off": False}
            key = str(value).strip().lower()
            if isinstance(value, (bool, int, str)) and key in words:
                return words[key]
            raise UserError(f"{_assigned(what, value)} is not True or False.")
        if isinstance(self.default, str):
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise UserError(f"{_assigned(what, value)} is not one of {', '.join(self.choices)}." if self.choices
                                else f"{_assigned(what, value)} is not text.")
            return value
        return validate.number(value, what, minimum=self.minimum, maximum=self.maximum,
                               integer=isinstance(self.default, int))

    def describe(self) -> str:
        allowed = "|".join(self.choices) if self.choices else (
            f"{type(self.default).__name__}" + (f" in [{self.minimum}, {self.maximum}]"
                                                if self.minimum is not None or self.maximum is not None else ""))
        return f"{self.name}={self.default} ({allowed})"


class InversionMethod:
    """One inversion method. A subclass sets ``name``, ``paper``, ``defaults`` (and ``options``) and
    implements ``invert``; when the inversion changes the edit loop it says how in ``edit_hooks``
    (per-step text, guidance or latents) and ``edit_inputs`` (further ``editing.run_edit`` arguments)."""

    name: str = ""
    paper: str = ""
    defaults: str = ""  # one line for --list_methods
    options: tuple[MethodOption, ...] = ()
    trains_inner_steps: bool = False  # whether it trains for K (``num_inner_steps``) iterations: K names its files
    denoising_steps: bool = False  # whether ``invert`` samples (and calls ``ctx.step_callback`` after each step)

    def invert(self, ctx: MethodContext) -> Inversion:
        raise NotImplementedError

    def edit_hooks(self, ctx: MethodContext, inv: Inversion) -> EditHooks | None:
        """What this inversion changes in every step of an edit (None: nothing)."""
        return None

    def edit_inputs(self, ctx: MethodContext, inv: Inversion) -> dict:
        """Further ``run_edit`` keyword arguments (StyleDiffusion: its learned values)."""
        return {}


class EditMethod:
    """One edit method. A subclass sets ``name``, ``paper``, ``defaults``, ``options`` and the
    inversions it is defined for (``defined_for``; None = every registered inversion), and implements
    ``edit``; it reaches the inversion's contribution through ``edit_loop_inputs(ctx, inv)``."""

    name: str = ""
    paper: str = ""
    defaults: str = ""
    options: tuple[MethodOption, ...] = ()
    defined_for: tuple[str, ...] | None = None
    default_inversion: str = "stylediffusion"  # what --inversion is when the command line does not say

    @property
    def inversions(self) -> tuple[str, ...]:
        """The inversions this edit is defined for, in registration order when it takes every one."""
        return tuple(INVERSIONS) if self.defined_for is None else tuple(self.defined_for)

    def edit(self, ctx: MethodContext, inv: Inversion, spec: EditSpec) -> MethodOutput:
        raise NotImplementedError

    # The model families (``families.ModelFamily.name``) the edit is defined on; None = every family.
    families: tuple[str, ...] | None = None
    family_reason: str = ""

    def check_family(self, bundle: ModelBundle) -> None:
        """One line when the edit is not defined on the loaded model's family."""
        if self.families is not None and bundle.family.name not in self.families:
            raise UserError(f"--edit {self.name} is defined on {' / '.join(self.families)} only, not on "
                            f"{bundle.family.name}: {self.family_reason}")

    def check(self, spec: EditSpec, options: dict) -> None:
        """Refuse, before any work (model loading, inversion), inputs of this edit that need no model: its
        files, words of the prompts it relies on. ``options``: the checked method options. Default: none."""


INVERSIONS: dict[str, InversionMethod] = {}
EDITS: dict[str, EditMethod] = {}
OPTIONS: dict[str, MethodOption] = {}  # every declared option by name (names carry their method's prefix)


def _declare(options) -> tuple[MethodOption, ...]:
    for opt in options:
        if OPTIONS.get(opt.name, opt) != opt:
            raise ValueError(f"method option {opt.name!r} is declared twice, differently")
        OPTIONS[opt.name] = opt
    return tuple(options)


def register(method: InversionMethod | EditMethod) -> InversionMethod | EditMethod:
    """Add a method (an instance) to the registry; ``methods/__init__.py`` registers every built-in one."""
    if isinstance(method, InversionMethod):
        table = INVERSIONS
    elif isinstance(method, EditMethod):
        table = EDITS
    else:
        raise TypeError(f"register() takes an InversionMethod or EditMethod instance, not {type(method).__name__}")
    if not method.name or method.name in table:
        raise ValueError(f"method name {method.name!r} is empty or registered twice")
    _declare(method.options)
    table[method.name] = method
    return method


def edit_loop_inputs(ctx: MethodContext, inv: Inversion) -> dict:
    """The ``editing.run_edit`` keyword arguments that carry what ``inv``'s method contributes to an edit:
    its ``edit_inputs``, its hooks, and the context's ``step_callback`` (when one is given)."""
    method = get_inversion(inv.method)
    inputs = dict(method.edit_inputs(ctx, inv))
    hooks = method.edit_hooks(ctx, inv)
    if ctx.step_callback is not None:
        inputs["step_callback"] = ctx.after_step
    if hooks is not None:
        inputs["hooks"] = hooks
    return inputs


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
            raise UserError(f"{option(key)} is not an option of {where} (options: {takes}).")
        out[key] = declared[key].convert(value)
    return out


def split_method_options(options: dict, inversion: str, edit: str | None = None) -> tuple[dict, dict]:
    """Method options split into those the inversion declares and those the edit declares; the rest (a
    command line's ``variant`` for an inversion without variants) is dropped. Values are not converted."""
    inversion_names = {o.name for o in get_inversion(inversion).options}
    edit_names = set() if edit is None else {o.name for o in get_edit(edit, inversion).options}
    return ({k: v for k, v in options.items() if k in inversion_names},
            {k: v for k, v in options.items() if k in edit_names})


def default_inversion(edit: str | None) -> str:
    """The inversion an edit runs with when none is named (``EditMethod.default_inversion``)."""
    return EDITS[edit].default_inversion if edit in EDITS else "stylediffusion"


def get_inversion(name: str) -> InversionMethod:
    if name not in INVERSIONS:
        raise UserError(f"unknown {given('inversion', name)}; registered: {', '.join(sorted(INVERSIONS))}.")
    return INVERSIONS[name]


def get_edit(name: str, inversion: str) -> EditMethod:
    if name not in EDITS:
        raise UserError(f"unknown {given('edit', name)}; registered: {', '.join(sorted(EDITS))}.")
    method = EDITS[name]
    if inversion not in method.inversions:
        valid = [f"{inv}+{ed}" for ed, m in sorted(EDITS.items()) for inv in m.inversions if ed == name]
        raise UserError(f"--inversion {inversion} with --edit {name} is not a combination the literature defines; "
                        f"valid with --edit {name}: {', '.join(valid)}.")
    return method


def _assigned(what: str, value) -> str:
    """``--method_option name='x'`` on the command line, ``name='x'`` from Python."""
    return f"{what}{value!r}" if what.endswith("=") else f"{what}={value!r}"


def describe_methods() -> str:
    lines = ["inversions:"]
    lines += [f"  {m.name:<15} {m.paper}" + (f"  [{m.defaults}]" if m.defaults else "") for m in INVERSIONS.values()]
    lines.append("edits:")
    lines += [
        f"  {m.name:<15} {m.paper}  (with: {', '.join(m.inversions)})" + (f"  [{m.defaults}]" if m.defaults else "")
        for m in EDITS.values()
    ]
    return "\n".join(lines)


def run_method(ctx: MethodContext, spec: EditSpec, inversion: str = "stylediffusion", edit: str = "p2p",
               inverted: Inversion | None = None) -> MethodOutput:
    """Invert (unless ``inverted`` is given) and edit; the combination is checked before any work."""
    edit_method = get_edit(edit, inversion)
    inversion_method = get_inversion(inversion)
    spec.validate()
    edit_method.check_family(ctx.bundle)
    edit_method.check(spec, ctx.options)
    t0 = time.perf_counter()
    if inverted is None:
        inverted = inversion_method.invert(ctx)
    t1 = time.perf_counter()
    out = edit_method.edit(ctx, inverted, spec)
    out.seconds = {"inversion": t1 - t0, "edit": time.perf_counter() - t1, **out.seconds}
    return out
