"""One check per kind of input, shared by the CLI, the benchmark runners, the index readers and the API.

Every function raises ``UserError`` with a message naming ``what`` (the flag, file or field the value
came from), so that whoever calls it answers with the same one line; a setting is named as the caller
spells it (``specs.spelled``: ``--tau_v`` on the command line, ``tau_v=`` from Python, the field's label on
the demo's page). Nothing here imports torch: the checks run before any model loads.
"""
from __future__ import annotations

import ast
import math
import unicodedata
from collections.abc import Mapping
from pathlib import Path

from .defaults import EDIT_TYPES, MAX_GUIDANCE  # noqa: F401 (MAX_GUIDANCE: read as validate.MAX_GUIDANCE)
from .errors import UserError
from .specs import given, named, spelled

# A literal longer than this is refused before it is parsed: ``ast.literal_eval`` builds a syntax
# tree first, whose size (and nesting depth) grows with the text, so an unbounded input can exhaust
# memory or the C stack. The longest literal the project ever reads (a per-word tau_c dict, an
# eq_params dict) is well under a hundred characters.
MAX_LITERAL_CHARS = 10_000
# A file or folder name built from data or flags is one path component of at most this many bytes
# (the common file-system limit is 255; the suffixes added to a name need the rest).
MAX_COMPONENT_BYTES = 200
# A re-weighting factor multiplies attention probabilities; P2P's own examples use factors of -5..10.
# Far beyond that the attention output is dominated by one word and the image turns blank.
MAX_REWEIGHT = 20.0


def safe_component(name, what: str) -> str:
    """``name`` as one file or folder name that stays inside the folder it is joined to, or a UserError.

    Refused: empty or whitespace-only names, ``.``, ``..`` (and other all-dot names), separators (``/``,
    ``\\``), NUL and other control characters, and names longer than MAX_COMPONENT_BYTES.
    """
    text = str(name)
    bad = None
    if not text.strip():
        bad = "is empty"
    elif text in (".", "..") or set(text) <= {"."}:
        bad = "is a relative folder reference"
    elif "/" in text or "\\" in text:
        bad = "contains a path separator"
    elif any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text):
        bad = "contains a control character"
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        bad = f"is longer than {MAX_COMPONENT_BYTES} bytes"
    if bad:
        raise UserError(f"{what} {_short(text)} {bad}: it becomes a file name, which must stay inside its folder.")
    return text


def inside(folder: str | Path, path: str | Path, what: str) -> Path:
    """``path`` if it resolves to a place under ``folder`` (symlinks followed), else a UserError."""
    root, target = Path(folder).resolve(), Path(path).resolve()
    if target != root and root not in target.parents:
        raise UserError(f"{what} '{path}' would be outside '{folder}'.")
    return Path(path)


def prompt(text, what: str) -> str:
    """A prompt: a string with at least one visible character."""
    if not isinstance(text, str):
        raise UserError(f"{what} must be text, not {type(text).__name__} {_short(text)}.")
    if not text.strip():
        raise UserError(f"{what} is empty: give the words of the prompt.")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in text):
        raise UserError(f"{what} {_short(text)} contains a control character.")
    return text


def number(value, what: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, integer: bool = False) -> float | int:
    """A finite number (an int when ``integer``) in [minimum, maximum] and > ``above``; booleans refused."""
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "a whole number" if integer else "a number"
        raise UserError(f"{_bare(what)} must be {kind}, not {_short(value)}.")
    if not integer and not math.isfinite(value):
        raise UserError(f"{_bare(what)} must be a finite number, not {value!r}.")
    if minimum is not None and value < minimum:
        raise UserError(f"{_is(what, value)} is below its minimum {minimum!r}.")
    if maximum is not None and value > maximum:
        raise UserError(f"{_is(what, value)} is above its maximum {maximum!r}.")
    if above is not None and not value > above:
        raise UserError(f"{_is(what, value)} must be greater than {above!r}.")
    return value


def fraction(value, what: str) -> float:
    """A fraction of the DDIM steps (a τ): a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"{_is(what, value)} is outside [0, 1]: it is a fraction of the DDIM steps.")
    return value


def tau_c(value, what: str = "tau_c"):
    """τ_c: a fraction, or a dict of word -> fraction (``default_`` for every other word)."""
    if isinstance(value, dict):
        for word, frac in value.items():
            if not isinstance(word, str) or not word.strip():
                raise UserError(f"{_bare(what)} keys must be words (or 'default_'), not {_short(word)}.")
            fraction(frac, f"{_bare(what)}[{word}]")
        return value
    return fraction(value, what)


def blend_words(value, what: str | None = None):
    """LocalBlend words: None, or two non-empty words (source word, target word) as a pair or as the text
    ``"cat tiger"``. The one check of every surface: the command line and the demo parse their own text
    forms (a literal pair; one line per target) into what this takes, the API passes its argument."""
    if value is None:
        return None
    words = tuple(value.split()) if isinstance(value, str) else value
    if (
        not isinstance(words, (tuple, list))
        or len(words) != 2
        or not all(isinstance(w, str) and w.strip() for w in words)
    ):
        raise UserError(
            f"{_bare(what or spelled('blend_word'))} needs two words (source word, target word), got {_short(value)}."
        )
    return tuple(words)


def reweight_factors(pairs, what: str | None = None) -> None:
    """Re-weighting (word, factor) pairs: finite factors within ±MAX_REWEIGHT."""
    what = _bare(what or spelled("eq_params"))
    for word, factor in pairs:
        number(factor, f"{what} factor of {word!r}", minimum=-MAX_REWEIGHT, maximum=MAX_REWEIGHT)


def reweight_pairs(words_and_factors: object) -> list[tuple[str | int, float]]:
    """Normalise ``{"words": [...], "values": [...]}``, ``{word: factor}`` or ``(words, factors)`` (the one reader
    of the re-weighting forms; ``seq_aligner`` reads them through it)."""
    if isinstance(words_and_factors, Mapping) and set(words_and_factors) == {"words", "values"}:
        ws, fs = words_and_factors["words"], words_and_factors["values"]
    elif isinstance(words_and_factors, Mapping):
        ws, fs = list(words_and_factors.keys()), list(words_and_factors.values())
    elif isinstance(words_and_factors, (list, tuple)) and len(words_and_factors) == 2:
        ws, fs = words_and_factors
    else:
        raise UserError(
            f"Reweighting parameters {words_and_factors!r} are not understood; pass "
            '{"words": [...], "values": [...]}, {word: factor} or a (words, factors) pair.'
        )
    ws = [ws] if isinstance(ws, (str, int)) else list(ws)
    fs = [fs] * len(ws) if isinstance(fs, (int, float)) else list(fs)
    if len(ws) != len(fs):
        raise UserError(
            f"Got {len(ws)} words but {len(fs)} factors to reweight them by; give one factor per word."
        )
    out = []
    for w, f in zip(ws, fs):
        try:
            value = float(f)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"The reweighting factor for {w!r} must be a finite number, not {f!r}.")
        out.append((w, value))
    return out


def eq_params(value, what: str | None = None) -> None:
    """Re-weighting parameters: the forms ``seq_aligner`` reads, with finite factors within ±MAX_REWEIGHT."""
    if value is None:
        return
    what = _bare(what or spelled("eq_params"))
    _eq_params_shape(value, what)
    pairs = reweight_pairs(value)  # the one reader of the re-weighting forms (words as text or indices)
    for word, _ in pairs:
        if isinstance(word, bool) or not isinstance(word, (str, int)) or (isinstance(word, str) and not word.strip()):
            raise UserError(f"{what}: {_short(word)} is not a word of the target prompt.")
    reweight_factors(pairs, what)


def _eq_params_shape(value, what: str) -> None:
    """The words and the factors of a re-weighting are a word, a number, or lists of them (a literal from
    a form or a flag may hold anything: ``{'words': None, 'values': {}}``)."""
    if isinstance(value, dict) and set(value) == {"words", "values"}:
        words, factors = value["words"], value["values"]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        words, factors = value
    else:
        return  # seq_aligner's own message
    if isinstance(words, bool) or not isinstance(words, (str, int, list, tuple)):
        raise UserError(f"{what}: the words {_short(words)} are not a word or a list of words.")
    if isinstance(factors, bool) or not isinstance(factors, (int, float, list, tuple)):
        raise UserError(f"{what}: the values {_short(factors)} are not a number or a list of numbers.")


def edit_spec(spec) -> None:
    """Everything an ``EditSpec`` says that can be checked without a tokenizer (the words themselves are
    checked against the prompts by ``editing.build_controller``)."""
    prompt(spec.source, "the source prompt")
    prompt(spec.target, f"the target prompt ({spelled('target')})")
    if spec.edit_type not in EDIT_TYPES:
        raise UserError(f"{given('edit_type', spec.edit_type)} is not one of {', '.join(EDIT_TYPES)}.")
    fraction(spec.tau_v, spelled("tau_v"))
    tau_c(spec.tau_c, spelled("tau_c"))
    fraction(spec.tau_s, spelled("tau_s"))
    fraction(spec.tau_u, spelled("tau_u"))
    number(spec.guidance_scale, spelled("guidance_scale"), minimum=0.0, maximum=MAX_GUIDANCE)
    blend_words(spec.blend_words)
    eq_params(spec.eq_params)
    if spec.edit_type == "Reweight" and not spec.eq_params:
        raise UserError(f"a Reweight edit needs {named(spelled('eq_params'), {'words': ['red'], 'values': [2]})}.")


def literal(text, what: str):
    """A Python literal (number, string, tuple, list, dict) parsed as data, never evaluated as code."""
    text = str(text).strip()
    if len(text) > MAX_LITERAL_CHARS:
        raise UserError(f"{what} is {len(text)} characters long: a literal here has at most {MAX_LITERAL_CHARS}.")
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        raise UserError(f"{what} {_short(text)} is not a literal (number, tuple, list or dict): "
                        f"{type(err).__name__}.") from err


def _bare(what: str) -> str:
    """A name to start a sentence with: an API keyword without its ``=`` (``tau_v``, not ``tau_v=``)."""
    return what[:-1] if what.endswith("=") else what


def _is(what: str, value) -> str:
    """``tau_v=2`` for an API keyword, else ``--tau_v = 2`` / ``tau_v = 2``."""
    return f"{what}{value!r}" if what.endswith("=") else f"{what} = {value!r}"


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def num_ddim_steps(num_steps: int, scheduler) -> None:
    """T DDIM steps need T distinct training timesteps of the model's scheduler."""
    limit = int(scheduler.config.num_train_timesteps)
    if num_steps > limit:
        raise UserError(f"{given('num_ddim_steps', num_steps)} is more than the scheduler's {limit} training "
                        f"timesteps: use at most {limit}.")
