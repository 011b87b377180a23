"""Web demo: invert an image once (the slow part: StyleDiffusion trains its mapping networks), then
edit it as often as you like (seconds each).

    python -m stylediffusion.app --model testbed --device cpu --port 7860

The page's logic is the plain class ``DemoApp`` (tests call its methods without a browser); ``build_ui``
only lays the page out with Gradio and turns a ``UserError`` into the page's one-line message.
Everything runs on the public Python API (``StyleDiffusionEditor``, ``Inversion``).

Inversions are cached on disk, keyed by the image's pixels, the prompt, the model and the inversion
settings, so an image is trained once for all browser tabs and survives a page reload or a restart.

Served to others it is a shared service: every page input goes through the checks of the command line
and the API (``validate``) and the operator's limits (``demo_limits``), a running request stops at its
time budget or when its visitor cancels it, the cache folder stays under ``--cache_max_mb``
(``demo_cache``), and ``--auth`` puts Gradio's login in front of the page.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

# Gradio would otherwise report usage to its servers; set before gradio is imported anywhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from PIL import Image  # noqa: E402

from . import data_index, optional, validate  # noqa: E402
from .api import StyleDiffusionEditor  # noqa: E402
from .app_style_transfer import style_transfer_section  # noqa: E402
from .defaults import EDIT, EDIT_TYPES, INVERSION, NUM_DDIM_STEPS, NUM_INNER_STEPS, TAU_C, TAU_S, TAU_U, TAU_V  # noqa: E402
from .demo_cache import EDITS, BoundedCache, megabytes  # noqa: E402
from .demo_limits import (  # noqa: E402
    DEFAULT_CACHE_MAX_MB,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_MB,
    RequestGuard,
    ServiceLimits,
)
from .demo_page import (  # noqa: E402
    MAX_FIELD_CHARS,
    _choice,
    _field_text,
    _save_png_atomic,
    _session,
    _short,
    _write_json_atomic,
    for_display,
    own_copy,
    page_errors,
    page_image,
)
from .errors import UserError  # noqa: E402
from .files import writable_folder  # noqa: E402
from .flags import ArgumentParser, add_elite_arguments, add_settings, count_at_least, elite_options, finite_float  # noqa: E402
from .image_io import image_grid  # noqa: E402
from .methods import EDITS as EDIT_METHODS  # noqa: E402  (EDITS here is demo_cache's folder name)
from .methods import INVERSIONS, get_edit, get_inversion  # noqa: E402
from .metrics import psnr  # noqa: E402
from .models import quiet_libraries  # noqa: E402
from .results import Inversion, refuse_old_format  # noqa: E402
from .runner import exit_code, package_notes_on_stdout, started  # noqa: E402
from .specs import SETTINGS, entry_points, spelled  # noqa: E402

logger = logging.getLogger(__spec__.name)  # run with -m, __name__ is "__main__": the logger stays under stylediffusion

DEFAULT_CACHE_DIR = Path("checkpoints") / "demo"
# Test-bed pictures are 32x32: show every picture at the width of its box, pixels kept sharp.
PAGE_CSS = """
#input-image img, #reconstruction img, #strip img, #edits img { image-rendering: pixelated; }
#input-image img, #reconstruction img { width: 100%; height: 100%; object-fit: contain; }
"""
EDIT_TYPE_CHOICES = ("auto", *EDIT_TYPES)
# "auto": Replacement when source and target have the same number of words, else Refinement (the CLI's rule).
_KEY_PATTERN = re.compile(r"^[0-9a-f]{24}$")
# A session's latest inversion and edit downloads stay in the cache this long after its last request.
SESSION_HOLD_SECONDS = 600.0


def image_digest(image: Image.Image) -> str:
    """SHA-256 of the decoded pixels, their mode and size: the picture, whatever file it came in."""
    header = f"{image.mode}:{image.width}x{image.height}:".encode()
    return hashlib.sha256(header + image.tobytes()).hexdigest()


def _whole(value) -> int:
    """A step count from a form field (Gradio's numbers arrive as floats; a raw request may send anything)."""
    number = value
    if isinstance(value, str) and len(value) <= 40:
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
            or not float(number).is_integer() or number < 1:
        raise UserError(f"{spelled('num_ddim_steps')} and {spelled('num_inner_steps')} must be whole numbers of at "
                        f"least 1, got {_short(value)}.")
    return int(number)


def parse_targets(text: str | None) -> list[str]:
    """One target prompt per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def check_targets(text, limits: ServiceLimits) -> list[str]:
    """The target prompts of the page: within the operator's limits, each a prompt as the CLI takes it."""
    text = _field_text(text, "the target prompts", MAX_FIELD_CHARS)
    targets = parse_targets(text)
    limits.check_targets(len(targets))
    for k, target in enumerate(targets):
        limits.check_text(target, f"target prompt {k + 1}")
        validate.prompt(target, f"target prompt {k + 1}")
    return targets


def parse_blend_words(text: str | None, num_targets: int) -> list[tuple[str, str] | None]:
    """LocalBlend words per target: empty = none; one line = the same pair for every target; else one line each.

    A line is ``cat tiger`` (source word, target word), as the CLI's ``--blend_word`` takes it, or ``-``
    for no blend for that target.
    """
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return [None] * num_targets
    if len(lines) not in (1, num_targets):
        raise UserError(f"{spelled('blend_word')}: give one line for all targets or one line per target "
                        f"({num_targets}), not {len(lines)}.")
    pairs = []
    for line in lines:
        if line == "-":
            pairs.append(None)
            continue
        words = tuple(line.replace(",", " ").split())
        if len(words) != 2:
            raise UserError(f"{spelled('blend_word')} needs two words (source word, target word), got {_short(line)}.")
        pairs.append(validate.blend_words(words))
    return pairs * num_targets if len(pairs) == 1 else pairs


def parse_reweight(text: str | None) -> dict | None:
    """Re-weighting as ``word=value, word=value`` (or the CLI's dict literal) -> ``eq_params``."""
    what = spelled("eq_params")
    text = _field_text(text, what, validate.MAX_LITERAL_CHARS).strip()
    if not text:
        return None
    if text.startswith("{"):
        # the command line's reader: parsed as data, its length bounded before parsing
        value = validate.literal(text, what)
        if not isinstance(value, dict) or set(value) != {"words", "values"}:
            raise UserError(f"{what} {_short(text)} must be a dict with exactly the keys 'words' and 'values', "
                            "such as {'words': ['red'], 'values': [2]}.")
        validate.eq_params(value, what)
        return value
    words, values = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        word, sep, number = item.partition("=")
        try:
            values.append(float(number))
        except ValueError:
            sep = ""
        if not sep or not word.strip():
            raise UserError(f"{what}: item {_short(item)} is not word=value (e.g. red=2).")
        words.append(word.strip())
    validate.reweight_factors(zip(words, values), what)
    return {"words": words, "values": values}


@dataclass
class InvertResult:
    key: str
    prompt: str
    method: str
    num_inference_steps: int
    num_inner_steps: int
    upload: Image.Image  # the picture as given (a reload puts it back in the page)
    image: Image.Image  # the input as the model saw it (RGB, square, model size)
    reconstruction: Image.Image
    psnr: float
    seconds: float  # time the inversion took when it was made
    cached: bool  # found on disk instead of trained now

    def summary(self) -> str:
        how = "from the cache (trained earlier" if self.cached else "trained now"
        when = f" in {self.seconds:.1f} s)" if self.cached else f" in {self.seconds:.1f} s"
        return (f"**{self.method}** inversion of *{self.prompt}* (T={self.num_inference_steps}, "
                f"K={self.num_inner_steps}) {how}{when}. Reconstruction PSNR {self.psnr:.2f} dB.")


@dataclass
class PageEdits:
    """What the page shows for one edit request: the strip, each edit with its target, the attention maps
    and the downloads."""

    strip: Image.Image  # input | reconstruction | edit 1 | ... labelled
    edits: list[tuple[Image.Image, str]]  # each edit with its target prompt
    attention_maps: Image.Image | None
    files: list[Path]  # edit_<k>.png and edit_<k>.json per target
    seconds: float

    def summary(self) -> str:
        n = len(self.edits)
        return f"{n} edit{'s' if n > 1 else ''} in {self.seconds:.1f} s" + (
            f" ({self.seconds / n:.1f} s each)." if n > 1 else "."
        )


@entry_points("page")  # its messages name the page's fields by their labels
@dataclass
class DemoApp:
    """One model shared by every browser session; the lock makes its use one request at a time.

    ``session`` (the page passes Gradio's session hash) names whose request it is: ``cancel(session)``
    stops that session's running request, and the session's latest inversion and edit downloads are not
    evicted from the cache for ``SESSION_HOLD_SECONDS`` after its last request."""

    editor: object  # stylediffusion.StyleDiffusionEditor
    cache_dir: Path = DEFAULT_CACHE_DIR
    edit_options: dict = field(default_factory=dict)  # given at launch (--elite_*), passed to the edits that take them
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    cache_max_mb: float = DEFAULT_CACHE_MAX_MB
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loaded: dict = field(default_factory=dict, repr=False)  # key -> Inversion, the last few used
    _running: dict = field(default_factory=dict, repr=False)  # session -> its RequestGuards now queued or running
    _holds: dict = field(default_factory=dict, repr=False)  # session -> (time of its last request, entry names)
    _book: threading.Lock = field(default_factory=threading.Lock, repr=False)  # guards _running and _holds

    def __post_init__(self):
        self.cache_dir = Path(self.cache_dir)
        self.store = BoundedCache(self.cache_dir, megabytes(self.cache_max_mb))
        self.store.make_room()  # a restart with a smaller bound trims the folder before serving

    # ------------------------------------------------------------------ requests
    @contextmanager
    def _request(self, session: str | None, *names: str):
        """One request of ``session``: its guard (deadline, cancel flag) and the cache entries it uses, held
        while it runs; afterwards they stay held for the session (its latest results) until its next
        request starts or SESSION_HOLD_SECONDS pass."""
        guard = RequestGuard(self.limits.max_seconds)
        for name in names:
            self.store.pin(name)
        with self._book:
            now, released = time.monotonic(), []
            for other, (when, held) in list(self._holds.items()):
                if other == session or now - when > SESSION_HOLD_SECONDS:
                    released += held
                    del self._holds[other]
            self._running.setdefault(session, []).append(guard)
        for name in released:
            self.store.unpin(name)
        try:
            yield guard
        finally:
            with self._book:
                self._running[session].remove(guard)
                if not self._running[session]:
                    del self._running[session]
                if session is not None:
                    previous = self._holds.pop(session, (0.0, []))[1]  # a request of its that ran alongside
                    self._holds[session] = (time.monotonic(), previous + list(names))
                else:
                    for name in names:
                        self.store.unpin(name)

    @contextmanager
    def _result_request(self, session: str | None, key: str, outdir: Path, missing: str):
        """A request of ``session`` that works on the finished inversion ``key`` and writes the cache entry
        ``outdir`` (under ``edits/``): yields (the inversion's ``InvertResult``, the request's guard); without
        a finished inversion it is the line ``missing``."""
        with self._request(session, key, f"{EDITS}/{outdir.name}") as guard:
            entry = self.cached(key)
            if entry is None:
                raise UserError(missing)
            self.store.touch(key)
            yield entry, guard

    def cancel(self, session: str | None) -> str:
        """Stop every request of ``session`` (queued or running): it ends with the 'cancelled' line."""
        with self._book:
            guards = list(self._running.get(session, [])) if session is not None else []
        for guard in guards:
            guard.cancelled.set()
        return "cancelling your request..." if guards else "nothing of yours is running."

    def _keep(self, name: str, write) -> None:
        """Write a new cache entry (held by the request), then hold the folder to its bound. A full disk or
        a bound that cannot be met (everything else in use) removes what was written: one line, nothing
        half-kept."""
        self.store.make_room(room_for=name)  # room first: the bound holds while it is written
        try:
            write()
        except UserError as err:
            self.store.remove(name)
            cause = err.__cause__
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError("the server's disk is full: this result could not be kept (nothing half-written "
                                "is left); try again later, or the operator can free space or lower "
                                "--cache_max_mb.") from None
            raise
        self.store.make_room()
        if self.store.total > self.store.max_bytes:
            self.store.remove(name)
            raise UserError(f"the demo's cache is at its bound of {self.cache_max_mb:g} MB and what is in it is "
                            "in use by other sessions: try again in a few minutes, or the operator can raise "
                            "--cache_max_mb.")

    def _steps(self, num_inference_steps, num_inner_steps) -> tuple[int, int]:
        T, K = _whole(num_inference_steps), _whole(num_inner_steps)
        self.limits.check_steps(T, K)
        return T, K

    def _source_prompt(self, prompt) -> str:
        prompt = _field_text(prompt, "the source prompt", MAX_FIELD_CHARS)
        self.limits.check_text(prompt.strip(), "the source prompt")
        return validate.prompt(prompt, "the source prompt").strip()

    @property
    def model_label(self) -> str:
        return self.editor.bundle.model_id

    @property
    def model_fingerprint(self) -> str:
        """What the model computes (config and weights digest), so a retrained model never reuses an entry."""
        return self.editor.bundle.fingerprint

    # ------------------------------------------------------------------ cache
    def cache_key(self, image: Image.Image, prompt: str, method: str, num_inference_steps: int,
                  num_inner_steps: int) -> str:
        record = {"image": image_digest(image), "prompt": prompt.strip(), "model": self.model_fingerprint,
                  "method": method, "T": int(num_inference_steps), "K": int(num_inner_steps)}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]

    def _paths(self, key: str) -> dict[str, Path]:
        base = self.cache_dir / key
        return {"inversion": base.with_suffix(".safetensors"), "record": base.with_suffix(".demo.json"),
                "upload": base.with_suffix(".upload.png"), "image": base.with_suffix(".input.png"),
                "reconstruction": base.with_suffix(".reconstruction.png")}

    def cached(self, key: str | None) -> InvertResult | None:
        """The finished inversion stored under ``key``, or None (the record is written last, so it means done)."""
        if not isinstance(key, str) or not _KEY_PATTERN.match(key):  # the browser's stored key is input too
            return None
        paths = self._paths(key)
        if not (paths["record"].is_file() and paths["inversion"].is_file()):
            return None
        try:
            refuse_old_format(paths["inversion"])
        except UserError:  # written by an earlier version: inverted again (and replaced) on request
            return None

        def picture(name):
            with Image.open(paths[name]) as img:
                img.load()
                return img

        try:
            record = json.loads(paths["record"].read_text())
            return InvertResult(key, record["prompt"], record["method"], record["num_inference_steps"],
                                record["num_inner_steps"], picture("upload"), picture("image"),
                                picture("reconstruction"), record["psnr"], record["seconds"], cached=True)
        except (OSError, ValueError, KeyError, TypeError):  # evicted meanwhile, or not a finished entry
            return None

    def _remember(self, key: str, inversion) -> None:
        """Keep the last few inversions in memory: editing one again skips reading its file."""
        self._loaded.pop(key, None)
        self._loaded[key] = inversion
        while len(self._loaded) > 4:
            self._loaded.pop(next(iter(self._loaded)))

    def _inversion(self, key: str):
        if key not in self._loaded:
            self._remember(key, Inversion.load(self._paths(key)["inversion"]))
        return self._loaded[key]

    # ------------------------------------------------------------------ step 1
    def invert(
        self,
        image: Image.Image | None,
        prompt: str | None,
        method: str = "stylediffusion",
        num_inference_steps: int = NUM_DDIM_STEPS,
        num_inner_steps: int = NUM_INNER_STEPS,
        progress: bool = False,
        session: str | None = None,
    ) -> InvertResult:
        """Invert (image, prompt) with these settings, or return the cached inversion made earlier."""
        image = page_image(image, self.limits)
        if image is None:
            raise UserError("no image: upload one or pick an example.")
        prompt = self._source_prompt(prompt)
        num_inference_steps, num_inner_steps = self._steps(num_inference_steps, num_inner_steps)
        get_inversion(_choice(method, "inversion method"))  # an unknown method: its one line, before any work
        key = self.cache_key(image, prompt, method, num_inference_steps, num_inner_steps)
        with self._request(session, key) as guard, self._lock:  # a second tab waits, then finds it cached
            hit = self.cached(key)
            if hit is not None:
                self.store.touch(key)
                return hit
            with guard.watching(self.editor.bundle.unet):
                t0 = time.perf_counter()
                inv = self.editor.invert(image, prompt, method=method, num_inference_steps=num_inference_steps,
                                         num_inner_steps=num_inner_steps, progress=progress)
                seconds = time.perf_counter() - t0
                # Editing towards the source prompt itself gives the reconstruction (the edit's source branch).
                out = self.editor.edit(inv, prompt, progress=False)
            psnr = _psnr(out.input_image, out.reconstruction)
            paths = self._paths(key)

            def write():
                inv.save(paths["inversion"])
                _save_png_atomic(image, paths["upload"])
                _save_png_atomic(out.input_image, paths["image"])
                _save_png_atomic(out.reconstruction, paths["reconstruction"])
                _write_json_atomic(paths["record"], {  # last: its presence means the entry is complete
                    "prompt": prompt, "method": method, "num_inference_steps": num_inference_steps,
                    "num_inner_steps": num_inner_steps, "model": self.model_label,
                    "image_sha256": image_digest(image), "psnr": psnr, "seconds": round(seconds, 3)})

            self._keep(key, write)
            self._remember(key, inv)
        return InvertResult(key, prompt, method, num_inference_steps, num_inner_steps, image, out.input_image,
                            out.reconstruction, psnr, seconds, cached=False)

    # ------------------------------------------------------------------ step 2
    def edit(self, image: Image.Image | None, prompt: str | None, method: str, num_inference_steps: int,
             num_inner_steps: int, targets: str | None, edit_type: str = "auto", tau_v: float | None = None,
             tau_c: float | None = None, tau_s: float | None = None, tau_u: float | None = None,
             blend_words: str | None = None,
             reweight: str | None = None, edit_method: str = "p2p", session: str | None = None) -> PageEdits:
        """Edit the cached inversion of (image, prompt, settings) towards every target (one per line).

        A τ left at None takes the command line's default (``defaults.TAU_*``)."""
        image = page_image(image, self.limits)
        if image is None:
            raise UserError("no image: upload one or pick an example, then press Invert.")
        prompt = self._source_prompt(prompt)
        num_inference_steps, num_inner_steps = self._steps(num_inference_steps, num_inner_steps)
        method, edit_method = _choice(method, "inversion method"), _choice(edit_method, "edit method")
        key = self.cache_key(image, prompt, method, num_inference_steps, num_inner_steps)
        target_list = check_targets(targets, self.limits)
        if not target_list:
            raise UserError("edit needs a target prompt (the edited caption): type one per line.")
        blend_text = _field_text(blend_words, "blend words", MAX_FIELD_CHARS)
        blends = parse_blend_words(blend_text, len(target_list))
        eq_params = parse_reweight(reweight)
        if edit_type not in (None, "") and (not isinstance(edit_type, str) or edit_type not in EDIT_TYPE_CHOICES):
            raise UserError(f"{spelled('edit_type')} {_short(edit_type)} is not one of {', '.join(EDIT_TYPE_CHOICES)}.")
        kind = None if edit_type in (None, "", "auto") else edit_type
        taus = {name: default if value is None else validate.fraction(value, spelled(name))
                for name, value, default in (("tau_v", tau_v, TAU_V), ("tau_c", tau_c, TAU_C), ("tau_s", tau_s, TAU_S),
                                             ("tau_u", tau_u, TAU_U))}

        declared = {o.name for o in get_edit(edit_method, method).options}
        launch_options = {k: v for k, v in self.edit_options.items() if k in declared}
        outdir = self.cache_dir / EDITS / uuid.uuid4().hex[:12]
        edits, attention, recon = [], None, None
        missing = "this image has not been inverted with this prompt and these settings: press Invert first."
        with self._result_request(session, key, outdir, missing) as (entry, guard):
            t0 = time.perf_counter()
            with self._lock, guard.watching(self.editor.bundle.unet):
                inv = self._inversion(key)
                # One call per distinct blend pair (the API takes one pair per call); each call checks all its
                # targets before it runs any of them.
                for blend in dict.fromkeys(blends):
                    group = [t for t, b in zip(target_list, blends) if b == blend]
                    out = self.editor.edit(inv, group, edit_type=kind, blend_words=blend, eq_params=eq_params,
                                           method=edit_method, progress=False, **taus, **launch_options)
                    per_edit = out.seconds / len(group)
                    for target, picture, spec in zip(group, out.images, out.specs):
                        edits.append((target, picture, spec, per_edit))
                    attention = attention if attention is not None else out.attention_maps
                    recon = out.reconstruction
            order = {t: k for k, t in enumerate(target_list)}
            edits.sort(key=lambda e: order[e[0]])
            files = []

            def write():
                for k, (_target, picture, spec, seconds) in enumerate(edits):
                    report = {"inversion": method, "edit": edit_method, "source": spec.source, "target": spec.target,
                              "edit_type": spec.edit_type, "tau_v": spec.tau_v, "tau_c": spec.tau_c,
                              "tau_s": spec.tau_s, "tau_u": spec.tau_u, "blend_words": spec.blend_words,
                              "eq_params": spec.eq_params, "guidance_scale": spec.guidance_scale,
                              "num_ddim_steps": entry.num_inference_steps, "num_inner_steps": entry.num_inner_steps,
                              "model": self.model_label, "edit_seconds": round(seconds, 3)}
                    _save_png_atomic(picture, outdir / f"edit_{k}.png")
                    _write_json_atomic(outdir / f"edit_{k}.json", report)
                    files.extend([outdir / f"edit_{k}.png", outdir / f"edit_{k}.json"])

            self._keep(f"{EDITS}/{outdir.name}", write)
        strip = image_grid([entry.image, recon] + [e[1] for e in edits],
                           ["input", "reconstruction"] + [f"edit {k + 1}" for k in range(len(edits))])
        return PageEdits(strip, [(e[1], e[0]) for e in edits], attention, files, time.perf_counter() - t0)

    # ------------------------------------------------------------------ examples
    def examples(self) -> list[list]:
        """[image path, prompt, targets, blend words] rows: the data index's cases (test-bed scenes first
        on the test-bed model), with the index's edits as the suggested targets."""
        try:
            images = {}
            for row in data_index.edit_rows(None):
                entry = images.setdefault(row.case_number, [str(row.image_path), row.prompt, [], []])
                entry[2].append(row.target)
                entry[3].append(" ".join(row.blend_word) if row.blend_word else "")
        except UserError:  # no index next to the package (an installed copy): no examples
            return []
        rows = []
        for case, (path, prompt, targets, blends) in sorted(images.items()):
            if not Path(path).is_file():
                continue
            blend = "\n".join(b or "-" for b in blends) if any(blends) else ""
            rows.append((case, [path, prompt, "\n".join(targets), blend]))
        testbed_first = self.editor.bundle.image_size <= 64  # the test-bed model draws 32x32 scenes
        rows.sort(key=lambda r: (("testbed" in Path(r[1][0]).name) != testbed_first, r[0]))
        return [r for _, r in rows]


def _psnr(a: Image.Image, b: Image.Image) -> float:
    return round(float(psnr(a, b)), 2)


# ---------------------------------------------------------------------------- the page
def with_request(fn):
    """Gradio hands a handler its ``gr.Request`` by the parameter's type; this module's annotations are
    strings (``from __future__ import annotations``) naming a local import, so the type is set here."""
    gr = optional.load("gradio")
    fn.__annotations__ = {**fn.__annotations__, "request": gr.Request}
    return fn


def page_handlers(app: DemoApp) -> SimpleNamespace:
    """The page's event handlers (invert, edit, cancel, load): each calls one of ``app``'s methods and turns
    its result into the components' values."""
    gr = optional.load("gradio")

    # The inputs arrive unprocessed (preprocess=False below): the image as Gradio's record of the uploaded
    # file, numbers and text as sent. DemoApp's own checks read them, so no input reaches a library's
    # exception (a decompression bomb, say, is refused from its header instead of inside Gradio's decoder).
    @page_errors
    @with_request
    def on_invert(image, prompt, method, steps, inner, request=None, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="inverting (DDIM steps, then training iterations)")
        result = app.invert(image, prompt, method, steps, inner, progress=True, session=_session(request))
        return result.key, own_copy(for_display(result.reconstruction)), result.summary()

    @page_errors
    @with_request
    def on_edit(image, prompt, method, steps, inner, targets, edit_type, tau_v, tau_c, tau_s, tau_u, blend,
                reweight, edit_method, request=None):
        result = app.edit(image, prompt, method, steps, inner, targets, edit_type, tau_v, tau_c, tau_s, tau_u,
                          blend, reweight, edit_method, session=_session(request))
        return (own_copy(result.strip), [(own_copy(for_display(im)), target) for im, target in result.edits],
                own_copy(result.attention_maps), [str(path) for path in result.files], result.summary())

    @with_request
    def on_cancel(request=None):
        return app.cancel(_session(request))

    def on_load(key):
        """A reload puts back this browser's last finished inversion (its key is kept in localStorage)."""
        hit = app.cached(key)
        if hit is None:
            return [gr.update()] * 7
        return (own_copy(hit.upload), hit.prompt, hit.method, hit.num_inference_steps, hit.num_inner_steps,
                own_copy(for_display(hit.reconstruction)), hit.summary())

    return SimpleNamespace(invert=on_invert, edit=on_edit, cancel=on_cancel, load=on_load)


def count_field(gr, name: str, elem_id: str):
    """A whole-number field of a setting (T, K): its default, label and minimum from ``specs``."""
    s = SETTINGS[name]
    return gr.Number(s.default, label=s.label, precision=0, minimum=s.minimum, elem_id=elem_id)


def fraction_slider(gr, name: str):
    """A τ's slider: its range, step, default and label from ``specs``."""
    s = SETTINGS[name]
    return gr.Slider(s.minimum, s.maximum, s.default, step=s.step, label=s.label)


def limits_line(limits: ServiceLimits) -> str:
    return (f"Limits of this server: T ≤ {limits.max_steps}, K ≤ {limits.max_inner_steps}, "
            f"{limits.max_targets} targets, {limits.max_seconds:g} s per request.")


def invert_section(gr, app: DemoApp, inversion_methods: list[str]) -> SimpleNamespace:
    """Step 1: the image, its prompt and the inversion settings; the reconstruction and the status lines."""
    with gr.Row():
        with gr.Column():
            # PNG in both directions and the image's own mode: the pixels that come back are the ones
            # that were hashed, so an inversion is found again after a reload.
            image = gr.Image(type="pil", image_mode=None, format="png", label="input image",
                             sources=["upload", "clipboard"], elem_id="input-image", height=256)
            prompt = gr.Textbox(label=SETTINGS["prompt"].label, elem_id="prompt")
            with gr.Row():
                method = gr.Dropdown(inversion_methods, value=INVERSION, label=SETTINGS["inversion"].label)
                steps = count_field(gr, "num_ddim_steps", "steps")
                inner = count_field(gr, "num_inner_steps", "inner-steps")
            with gr.Row():
                invert_button = gr.Button("Invert", variant="primary", elem_id="invert")
                cancel_button = gr.Button("Cancel my request", variant="secondary", elem_id="cancel")
        with gr.Column():
            reconstruction = gr.Image(label="reconstruction", interactive=False, format="png",
                                      elem_id="reconstruction", height=256)
            invert_status = gr.Markdown("Upload an image or pick an example, type its prompt, press Invert.",
                                        elem_id="invert-status")
            gr.Markdown(limits_line(app.limits), elem_id="limits")
            cancel_status = gr.Markdown(elem_id="cancel-status")
    return SimpleNamespace(inputs=[image, prompt, method, steps, inner], image=image, prompt=prompt,
                           invert_button=invert_button, cancel_button=cancel_button, reconstruction=reconstruction,
                           invert_status=invert_status, cancel_status=cancel_status)


def edit_inputs(gr, edit_methods: list[str]) -> SimpleNamespace:
    """Step 2's settings: the targets, the edit type, the τ, blend words, re-weighting and the edit method."""
    targets = gr.Textbox(label=SETTINGS["target"].label, lines=3, elem_id="targets")
    kind = SETTINGS["edit_type"]
    edit_type = gr.Dropdown(list(EDIT_TYPE_CHOICES), value="auto", label=kind.label, info=kind.info)
    with gr.Row():
        tau_v, tau_c = fraction_slider(gr, "tau_v"), fraction_slider(gr, "tau_c")
    with gr.Row():
        tau_s, tau_u = fraction_slider(gr, "tau_s"), fraction_slider(gr, "tau_u")
    blend_setting = SETTINGS["blend_word"]
    blend = gr.Textbox(label=f"{blend_setting.label}: {blend_setting.info}", placeholder="cat tiger", lines=1,
                       elem_id="blend")
    reweight = gr.Textbox(label=SETTINGS["eq_params"].label, placeholder="red=2, blue=0.5", elem_id="reweight")
    edit_method = gr.Dropdown(edit_methods, value=EDIT, label=SETTINGS["edit"].label)
    return SimpleNamespace(targets=targets, blend=blend,
                           all=[targets, edit_type, tau_v, tau_c, tau_s, tau_u, blend, reweight, edit_method])


def edit_outputs(gr) -> list:
    """Step 2's results: the strip, the edits, the attention maps, the downloads and the status line."""
    strip = gr.Image(label="input | reconstruction | edits", interactive=False, format="png", elem_id="strip")
    gallery = gr.Gallery(label="edits", columns=4, format="png", elem_id="edits", height="auto")
    attention = gr.Image(label="the source prompt's cross-attention per word", interactive=False, format="png",
                         elem_id="attention")
    files = gr.File(label="downloads: each edit and its edit.json", file_count="multiple", elem_id="downloads")
    return [strip, gallery, attention, files, gr.Markdown(elem_id="edit-status")]


def edit_section(gr, edit_methods: list[str]) -> SimpleNamespace:
    """Step 2: the edit's settings and button beside its results."""
    with gr.Row():
        with gr.Column():
            step2 = edit_inputs(gr, edit_methods)
            step2.edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
        with gr.Column():
            step2.outputs = edit_outputs(gr)
    return step2


def wire(page, handlers: SimpleNamespace, last_key, step1: SimpleNamespace, step2: SimpleNamespace, transferring):
    """The buttons' events. One model: inversions and edits share one queue slot ("model"), so requests take
    turns."""
    inverting = step1.invert_button.click(handlers.invert, step1.inputs,
                                          [last_key, step1.reconstruction, step1.invert_status],
                                          concurrency_id="model", concurrency_limit=1, preprocess=False,
                                          api_name="invert")
    editing = step2.edit_button.click(handlers.edit, step1.inputs + step2.all, step2.outputs, concurrency_id="model",
                                      concurrency_limit=1, preprocess=False, api_name="edit")
    # Gradio's cancels drops the visitor's queued request; the running one is stopped by DemoApp.cancel
    # (at its next model call), which frees the model for the next in the queue.
    step1.cancel_button.click(handlers.cancel, None, [step1.cancel_status], cancels=[inverting, editing, transferring],
                              queue=False, api_name="cancel")
    page.load(handlers.load, [last_key], step1.inputs + [step1.reconstruction, step1.invert_status])


def build_ui(app: DemoApp, inversion_methods: list[str], edit_methods: list[str]):
    """The page: Gradio components wired to ``app``'s methods, nothing else."""
    gr = optional.load("gradio")
    handlers = page_handlers(app)
    with gr.Blocks(title="StyleDiffusion: invert once, edit many", analytics_enabled=False) as page:
        last_key = gr.BrowserState(None, storage_key="stylediffusion-demo-inversion")
        gr.Markdown(f"## StyleDiffusion: invert once, edit many\nModel `{app.model_label}`. **Step 1** trains the "
                    "inversion of an image (slow, once per image and settings; cached on disk). **Step 2** edits "
                    "it (seconds per target).")
        step1 = invert_section(gr, app, inversion_methods)
        gr.Markdown("### Step 2: edit")
        step2 = edit_section(gr, edit_methods)
        examples = app.examples()
        if examples:
            gr.Examples(examples, inputs=[step1.image, step1.prompt, step2.targets, step2.blend],
                        label="examples (the data index)", elem_id="examples")
        transferring = style_transfer_section(app, step1.inputs, with_request)
        wire(page, handlers, last_key, step1, step2, transferring)
    return page


def method_names() -> tuple[list[str], list[str]]:
    """The registered inversions that start from an image, and the registered edits."""
    get_inversion("stylediffusion")  # makes sure the registry has filled itself
    return [name for name in INVERSIONS if name != "generated"], list(EDIT_METHODS)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m stylediffusion.app",
                       description="Web demo: invert an image once, edit it many times.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_settings(p, "model", "image_encoder", "device", model={"default": "testbed"},
                 image_encoder={"help": "CLIP vision tower, hub id or folder"})
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE_DIR, help="where inversions and edits are kept")
    add_elite_arguments(p)  # the 'elite' edit's weights and settings, for every session
    # A shared server: what one request may ask for (checked before any work), the disk, who may come in.
    limits = ServiceLimits()
    p.add_argument("--max_steps", type=count_at_least(1), default=limits.max_steps, help="largest T a request may ask")
    p.add_argument("--max_inner_steps", type=count_at_least(1), default=limits.max_inner_steps,
                   help="largest K (training iterations at step 0) a request may ask")
    p.add_argument("--max_targets", type=count_at_least(1), default=limits.max_targets,
                   help="most target prompts in one edit request")
    p.add_argument("--max_image_pixels", type=count_at_least(1), default=limits.max_image_pixels,
                   help="largest upload, width x height, read from its header before decoding")
    p.add_argument("--max_prompt_chars", type=count_at_least(1), default=limits.max_prompt_chars,
                   help="longest prompt, in characters")
    p.add_argument("--max_seconds", type=finite_float(above=0.0), default=limits.max_seconds,
                   help="time budget of one request: a request still running then is stopped and frees the model")
    p.add_argument("--max_queue", type=count_at_least(1), default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait for the model; one more is refused ('queue is full')")
    p.add_argument("--cache_max_mb", type=finite_float(above=0.0), default=DEFAULT_CACHE_MAX_MB,
                   help="size bound of --cache_dir (inversions and edit downloads), least recently used out first")
    p.add_argument("--max_upload_mb", type=count_at_least(1), default=DEFAULT_MAX_UPLOAD_MB,
                   help="largest upload file Gradio accepts")
    p.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                   help="require a login (Gradio's own); repeat for more users")
    p.add_argument("--auth_file", type=Path, default=None,
                   help="file of USER:PASSWORD lines (keeps passwords off the command line)")
    return p


def read_auth(pairs: list[str] | None, auth_file: Path | None) -> list[tuple[str, str]] | None:
    """``--auth`` and ``--auth_file`` as Gradio's list of (user, password); None when neither is given."""
    lines = list(pairs or [])
    if auth_file is not None:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--auth_file '{auth_file}' cannot be read ({type(err).__name__}): pass a UTF-8 file of "
                            "USER:PASSWORD lines.") from None
        lines += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if pairs is None and auth_file is None:
        return None
    users = []
    for k, line in enumerate(lines):
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise UserError(f"--auth entry {k + 1} is not USER:PASSWORD (a user name, a colon, a password).")
        users.append((user.strip(), password))
    if not users:
        raise UserError(f"--auth_file '{auth_file}' holds no USER:PASSWORD line.")
    return users


def access_warning(host: str, auth) -> str | None:
    """The start-up warning for a page anyone on the network can use."""
    if auth or host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"warning: serving on {host} without --auth: anyone who can reach this machine can use the model "
            "and fill the queue; add --auth USER:PASSWORD (or --auth_file FILE).")


def make_app(args) -> DemoApp:
    writable_folder(args.cache_dir, "--cache_dir")
    limits = ServiceLimits(max_steps=args.max_steps, max_inner_steps=args.max_inner_steps,
                           max_targets=args.max_targets, max_image_pixels=args.max_image_pixels,
                           max_prompt_chars=args.max_prompt_chars, max_seconds=args.max_seconds)
    editor = StyleDiffusionEditor.from_pretrained(args.model, image_encoder=args.image_encoder, device=args.device)

    return DemoApp(editor, Path(args.cache_dir), edit_options=elite_options(args), limits=limits,
                   cache_max_mb=args.cache_max_mb)


# Gradio keeps its own copies of uploads and of every picture and download it sends; they are deleted
# once an hour when older than an hour (our --cache_dir is bounded by --cache_max_mb instead).
GRADIO_CACHE_CLEANUP = (3600, 3600)


def serve(app: DemoApp, host: str = "127.0.0.1", port: int = 7860, block: bool = True, quiet: bool = False,
          auth: list[tuple[str, str]] | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
          max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB):
    """Lay the page out and serve it; ``block=False`` returns the running page (``page.close()`` stops it)."""
    warning = access_warning(host, auth)
    if warning:
        logger.warning(warning)
    page = build_ui(app, *method_names())
    page.delete_cache = GRADIO_CACHE_CLEANUP
    page.queue(max_size=max_queue, default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, ssr_mode=False, share=False, css=PAGE_CSS, quiet=quiet,
                allowed_paths=[str(app.cache_dir.resolve())], show_error=False, prevent_thread_lock=not block,
                auth=auth, max_file_size=f"{int(max_upload_mb)}mb")
    return page


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        optional.load("gradio")
        quiet_libraries()
        auth = read_auth(args.auth, args.auth_file)
        with package_notes_on_stdout("stderr", logging.WARNING):  # the access warning, one plain line
            page = serve(make_app(args), args.host, args.port, block=False, auth=auth, max_queue=args.max_queue,
                         max_upload_mb=args.max_upload_mb)
        started()  # serving: from here Ctrl-C reaches Gradio, which closes the server (finished inversions stay cached)
        page.block_thread()
        return 0

    return exit_code(body, "interrupted: finished inversions stay in the cache.")


if __name__ == "__main__":
    sys.exit(main())
