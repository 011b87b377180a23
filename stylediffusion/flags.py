"""The one flag builder: ``add_settings`` adds the settings ``specs`` describes to an argparse parser, for the
command line (``cli.build_parser``), the benchmark runners (``bench.options``) and the demo's launcher; with the
argument types they share (a bad value is argparse's one ``error:`` line, exit code 2). No torch.
"""
from __future__ import annotations

import argparse

from . import validate
from .defaults import MAX_GUIDANCE, MAX_SEED
from .errors import UserError, one_line
from .specs import SETTINGS


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line on stderr (exit 2), like every other bad input,
    instead of the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def _argtype(check, name: str):
    """An argparse ``type=`` from a ``validate`` check: its UserError becomes argparse's one-line error."""
    def parse(text: str):
        try:
            return check(text)
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    parse.__name__ = name  # argparse names the type in its messages
    return parse


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError as err:
        raise UserError(f"{what}: {text!r} is not a whole number.") from err


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError as err:
        raise UserError(f"{what}: {text!r} is not a number.") from err


def count_at_least(minimum: int):
    """``type=`` for a whole number >= ``minimum`` (steps, iterations, --limit)."""
    return _argtype(lambda t: validate.number(_int(t, "value"), "value", minimum=minimum, integer=True),
                    f"int>={minimum}")


def finite_float(minimum: float | None = None, maximum: float | None = None, above: float | None = None):
    """``type=`` for a finite number (NaN and inf refused) in the given range."""
    return _argtype(lambda t: validate.number(_float(t, "value"), "value", minimum=minimum, maximum=maximum,
                                              above=above), "finite float")


seed_int = _argtype(lambda t: validate.number(_int(t, "seed"), "seed", minimum=0, maximum=MAX_SEED, integer=True),
                    "seed")
guidance_float = finite_float(minimum=0.0, maximum=MAX_GUIDANCE)
lr_float = finite_float(above=0.0)


def str2bool(text: str) -> bool:
    """Parse a boolean word. (``type=bool`` would turn the string "False" into True.)"""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def fraction_or_dict(text: str):
    """``0.6`` or a per-word dict literal such as ``{'default_': 0.6, 'wooden': 0.2}``."""
    try:
        value = validate.literal(text, "value")
    except UserError as err:
        raise argparse.ArgumentTypeError(f"expected a number or a dict literal: {err}") from err
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise argparse.ArgumentTypeError(f"expected a number or a dict literal, got {text!r}")
    return value  # its range is checked with every other tau by EditSpec.validate


def literal(text: str):
    """A Python literal flag value (parsed as data, length-capped), e.g. ``--eq_params``."""
    try:
        return validate.literal(text, "value")
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _parser(setting):
    """The ``type=`` of a setting's flag, from its kind and range (``specs.Setting``)."""
    kind = setting.kind
    if kind == "count":
        return count_at_least(setting.minimum)
    if kind == "finite":
        return finite_float(setting.minimum, setting.maximum, setting.above)
    return {"text": None, "float": float, "bool": str2bool, "seed": seed_int, "fraction_or_dict": fraction_or_dict,
            "literal": literal}[kind]


def setting_arguments(name: str) -> dict:
    """``add_argument`` keywords of one setting's flag."""
    s = SETTINGS[name]
    kwargs = {"default": s.flag_default, "help": s.help}
    if name == "method_option":  # repeatable KEY=VALUE pairs
        return {**kwargs, "action": "append", "default": [], "metavar": s.metavar}
    parse = _parser(s)
    if parse is not None:
        kwargs["type"] = parse
    if s.choices is not None:
        kwargs["choices"] = s.choices
    if s.kind == "bool":
        kwargs["metavar"] = "True|False"
    elif s.metavar is not None:
        kwargs["metavar"] = s.metavar
    return kwargs


def add_settings(group, *names: str, **changes: dict) -> None:
    """Add the flags of ``names`` (``specs.SETTINGS``), in that order, to a parser or argument group;
    ``changes`` replaces keywords of one flag where a program means something more (``progress={"default":
    False}``). A flag whose setting has no help line gets none (argparse then shows no default either)."""
    for name in names:
        kwargs = {**setting_arguments(name), **changes.get(name, {})}
        if kwargs.get("help") is None:
            kwargs.pop("help")
        group.add_argument(SETTINGS[name].flag, **kwargs)


# --edit elite's flags, each the method option of the same name (docs/methods.md, ELITE)
ELITE_FLAGS = ("elite_global", "elite_local", "elite_reference", "elite_mask", "elite_lambda", "elite_placeholder",
               "elite_word", "elite_projections", "elite_image_encoder")


def add_elite_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--edit elite (SPDInv + ELITE): weights from 'python -m stylediffusion.convert_elite'")
    g.add_argument("--elite_global", default=None, help="converted global mapper (.safetensors)")
    g.add_argument("--elite_local", default=None, help="converted local mapper (.safetensors), optional")
    g.add_argument("--elite_reference", default=None, help="image of the concept (default: the source image)")
    g.add_argument(
        "--elite_mask", default=None, help="object mask of the reference (white = object), for --elite_local"
    )
    g.add_argument("--elite_lambda", type=finite_float(minimum=0.0, maximum=20.0), default=None,
                   help="weight of the local values (0.8)")
    g.add_argument("--elite_placeholder", default=None, help="the target prompt's placeholder word ('*')")
    g.add_argument("--elite_word", type=count_at_least(0), default=None, help="which of the five words (0)")
    g.add_argument("--elite_projections", choices=("elite", "unet"), default=None,
                   help="target rows' cross-attention keys/values: ELITE's fine-tuned projections or the UNet's")
    g.add_argument("--elite_image_encoder", default=None, help="CLIP ViT-L/14, hub id or folder "
                                                              "(openai/clip-vit-large-patch14)")


def elite_options(args) -> dict:
    """The ``--elite_*`` flags that were given, as method options."""
    return {name: getattr(args, name) for name in ELITE_FLAGS if getattr(args, name, None) is not None}


def method_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> dict; values parsed as Python literals where they are (numbers, booleans)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--method_option {pair!r} is not KEY=VALUE.")
        try:
            options[key.strip()] = validate.literal(value, f"--method_option {key.strip()}")
        except UserError:
            if len(value) > validate.MAX_LITERAL_CHARS:
                raise
            options[key.strip()] = value.strip()  # a word, e.g. embedding=key_value
    return options
