"""The settings a user gives, each described once: its name, default (from ``defaults``), kind and range, the
help line of its flag, its label on the demo's form, and how each surface spells it in a message.

``flags.add_settings`` turns these into the flags of the command line and of ``bench``; the demo's form
(``app.build_ui``) takes its defaults, ranges and labels from here; the input checks (``validate``) name a
setting through ``spelled`` / ``given``, so the same bad value reads ``--edit_type 'x'`` on the command line,
``edit_type='x'`` from Python and ``edit type 'x'`` on the page.

Which surface is asking is set where a call enters: ``asked_from("cli")`` around the command lines,
``asked_from("api")`` on the API's public methods, ``asked_from("page")`` on the demo's. The outermost one
speaks: the command line calls the API, and its messages stay the command line's. Nothing set means the
command line's spelling. Plain values only, no torch.
"""
from __future__ import annotations

import contextvars
import functools
from contextlib import contextmanager
from dataclasses import dataclass

from .defaults import (
    DTYPE_NAMES,
    EDIT,
    EDIT_TYPES,
    GUIDANCE_SCALE,
    IMAGE_ENCODER,
    LEARNING_RATE,
    MAX_GUIDANCE,
    MAX_SEED,
    MODEL,
    NUM_DDIM_STEPS,
    NUM_INNER_STEPS,
    SEED,
    TAU_C,
    TAU_S,
    TAU_U,
    TAU_V,
    VARIANT,
    VARIANTS,
)

SURFACES = ("cli", "api", "page")


@dataclass(frozen=True)
class Setting:
    """One setting. ``kind`` says how a flag's text is read (``flags.PARSERS``): text, float, bool, count (a
    whole number >= ``minimum``), seed, finite (a finite number in [minimum, maximum], > ``above``),
    fraction_or_dict, literal. ``unset``: the flag's default is None, so that an index row (or, failing
    that, ``default``) decides. ``keyword``: the API's name for it (default ``name``); ``label``: the
    demo's field (default ``name``)."""

    name: str
    default: object = None
    help: str | None = None
    kind: str = "text"
    choices: tuple | None = None
    metavar: str | None = None
    unset: bool = False
    keyword: str | None = None
    label: str | None = None
    info: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    step: float | None = None  # the demo's slider step

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def flag_default(self):
        return None if self.unset else self.default

    def spelled(self, surface: str) -> str:
        if surface == "api":
            return f"{self.keyword or self.name}="
        if surface == "page":
            return self.label or self.name
        return self.flag


def _fraction(name: str, default: float, help: str, label: str, kind: str = "float") -> Setting:
    """A τ: a fraction of the DDIM steps, unset on the command line (the index row, else ``default``)."""
    return Setting(name, default, f"{help} ({default})", kind, unset=True, label=label, minimum=0.0, maximum=1.0,
                   step=0.05)


_SETTINGS = (
    # the run: what to work on
    Setting("prompt", None, "direct mode: caption of the image (source prompt)", label="prompt (caption of the image)"),
    Setting("target", None, "direct mode: the edited prompt", label="target prompt(s), one per line"),
    # the models
    Setting("model", MODEL, "hub id or local diffusers folder; 'testbed' = bundled test-bed model, 'tiny' = untrained"),
    Setting("image_encoder", None, "CLIP vision tower, hub id or folder (default: the model's image_encoder/ or "
            f"{IMAGE_ENCODER})"),
    Setting("device", "auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)"),
    Setting("dtype", "auto", "dtype of the frozen UNet and encoders (auto: bfloat16 on GPUs that compute it natively, "
            "compute capability 8.0+; float16 with loss scaling on older GPUs; float32 on the CPU; mapping networks, "
            "DDIM math and losses always run in float32)", choices=DTYPE_NAMES),
    Setting("seed", SEED, f"0 .. {MAX_SEED}", "seed", minimum=0, maximum=MAX_SEED),
    # the inversion (training)
    Setting("num_ddim_steps", NUM_DDIM_STEPS, "T (at most the scheduler's num_train_timesteps, 1000 for SD)", "count",
            keyword="num_inference_steps", label="T (DDIM steps)", minimum=1),
    Setting("num_inner_steps", NUM_INNER_STEPS, "K: iterations at the first step, K_i = ceil(K e^-0.1i)", "count",
            label="K (training iterations at step 0)", minimum=1),
    Setting("guidance_scale", GUIDANCE_SCALE, f"w, in [0, {MAX_GUIDANCE:g}]", "finite", minimum=0.0,
            maximum=MAX_GUIDANCE),
    Setting("lr", LEARNING_RATE, "Adam learning rate at step 0 (decays as 1 - i/100)", "finite", above=0.0),
    Setting("variant", VARIANT, "mapping network: released code's c*gamma+beta (modulate) or the paper's direct value "
            "(replace)", choices=VARIANTS),
    Setting("attention_loss", True, kind="bool"),
    Setting("early_stop", True, kind="bool"),
    # the edit
    Setting("edit_type", None, choices=EDIT_TYPES, label="edit type",
            info="auto: Replacement when the word counts match, else Refinement"),
    _fraction("tau_v", TAU_V, "fraction of steps the target uses the learned values", "τ_v (learned values)"),
    _fraction("tau_c", TAU_C, "cross-attention replacement fraction or per-word dict", "τ_c (cross-attention)",
              kind="fraction_or_dict"),
    _fraction("tau_s", TAU_S, "self-attention replacement fraction, conditional branch", "τ_s (self-attention)"),
    _fraction("tau_u", TAU_U, "P2Plus: self-attention replacement in the unconditional branch",
              "τ_u (P2Plus: unconditional self-attention)"),
    Setting("blend_word", None, "LocalBlend words: \"cat tiger\" or \"('cat', 'tiger')\"", keyword="blend_words",
            label="blend words", info="source word, target word (one line for all targets, or one per target)"),
    Setting("eq_params", None, "re-weighting: \"{'words': ['red'], 'values': [2]}\"", "literal",
            label="re-weighting of target words"),
    # the methods
    Setting("inversion", None, "inversion method (see --list_methods; default: the edit's own, spdinv for "
            "--edit elite, else stylediffusion)", keyword="method", label="inversion method"),
    Setting("edit", EDIT, "edit method (see --list_methods)", keyword="method", label="edit method"),
    Setting("method_option", (), "method-specific option, repeatable (e.g. sdedit_strength=0.6, embedding=key_value, "
            "generated_seed=3); see --list_methods and docs/methods.md", metavar="KEY=VALUE", label="option"),
    Setting("progress", True, "show progress bars", "bool"),
)
SETTINGS: dict[str, Setting] = {s.name: s for s in _SETTINGS}

_asking: contextvars.ContextVar[str | None] = contextvars.ContextVar("stylediffusion_surface", default=None)


@contextmanager
def asked_from(surface: str):
    """While it runs, messages are spelled for ``surface`` (unless an outer surface is already asking). Also a
    decorator: ``@asked_from("cli") def run(args): ...``."""
    if surface not in SURFACES:
        raise ValueError(f"surface {surface!r} is not one of {SURFACES}")
    token = _asking.set(surface) if _asking.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _asking.reset(token)


def entry_points(surface: str):
    """Class decorator: every public method (classmethods too) is a call entering from ``surface``."""
    def wrap(fn):
        @functools.wraps(fn)
        def entered(*args, **kwargs):
            with asked_from(surface):
                return fn(*args, **kwargs)
        return entered

    def decorate(cls):
        for name, attr in list(vars(cls).items()):
            if name.startswith("_"):
                continue
            if isinstance(attr, classmethod):
                setattr(cls, name, classmethod(wrap(attr.__func__)))
            elif callable(attr) and not isinstance(attr, (type, staticmethod)):
                setattr(cls, name, wrap(attr))
        return cls
    return decorate


def surface() -> str:
    """Which surface is asking now (the command line when none said)."""
    return _asking.get() or "cli"


def spelled(name: str) -> str:
    """The setting as the caller spells it: ``--edit_type`` (command line), ``edit_type=`` (API), ``edit type``
    (the demo's label)."""
    return SETTINGS[name].spelled(surface())


def given(name: str, value) -> str:
    """A value of the setting as the caller gave it: ``--edit_type 'x'``, ``edit_type='x'``, ``edit type 'x'``."""
    return named(spelled(name), value)


def named(what: str, value) -> str:
    """``what`` with ``value``: ``tau_v=2`` where ``what`` is an API keyword (ends in ``=``), else ``what 2``."""
    return f"{what}{value!r}" if what.endswith("=") else f"{what} {value!r}"


def option(key: str) -> str:
    """A method option as the caller spells it: ``--method_option key`` (command line), ``key=`` (API: a
    keyword argument), ``option key`` (the page)."""
    where = surface()
    return f"{key}=" if where == "api" else f"{SETTINGS['method_option'].spelled(where)} {key}"
