"""Web demo: invert an image once (the slow part: StyleDiffusion trains its mapping networks), then
edit it as often as you like (seconds each).

    python -m stylediffusion.app --model testbed --device cpu --port 7860

The page's logic is the plain class ``DemoApp`` (tests call its methods without a browser); ``build_ui``
only lays the page out with Gradio and turns a ``UserError`` into the page's one-line message.
Everything runs on the public Python API (``StyleDiffusionEditor``, ``Inversion``).

Inversions are cached on disk, keyed by the image's pixels, the prompt, the model and the inversion
settings, so an image is trained once for all browser tabs and survives a page reload or a restart.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# Gradio would otherwise report usage to its servers; set before gradio is imported anywhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from PIL import Image  # noqa: E402

from .errors import UserError, one_line  # noqa: E402

DEFAULT_CACHE_DIR = Path("checkpoints") / "demo"
# Test-bed pictures are 32x32: show every picture at the width of its box, pixels kept sharp.
PAGE_CSS = """
#input-image img, #reconstruction img, #strip img, #edits img { image-rendering: pixelated; }
#input-image img, #reconstruction img { width: 100%; height: 100%; object-fit: contain; }
"""
EDIT_TYPE_CHOICES = ("auto", "Replacement", "Refinement", "Reweight")
# "auto": Replacement when source and target have the same number of words, else Refinement (the CLI's rule).
_KEY_PATTERN = re.compile(r"^[0-9a-f]{24}$")


def image_digest(image: Image.Image) -> str:
    """SHA-256 of the decoded pixels, their mode and size: the picture, whatever file it came in."""
    header = f"{image.mode}:{image.width}x{image.height}:".encode()
    return hashlib.sha256(header + image.tobytes()).hexdigest()


def _whole(value) -> int:
    """A step count from a form field (Gradio's numbers arrive as floats)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise UserError(f"num_inference_steps and num_inner_steps must be whole numbers of at least 1, got {value!r}.")
    return int(number)


def parse_targets(text: str | None) -> list[str]:
    """One target prompt per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_blend_words(text: str | None, num_targets: int) -> list[tuple[str, str] | None]:
    """LocalBlend words per target: empty = none; one line = the same pair for every target; else one line each.

    A line is ``cat tiger`` (source word, target word), as the CLI's ``--blend_word`` takes it, or ``-``
    for no blend for that target.
    """
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return [None] * num_targets
    if len(lines) not in (1, num_targets):
        raise UserError(f"blend words: give one line for all targets or one line per target "
                        f"({num_targets}), not {len(lines)}.")
    pairs = []
    for line in lines:
        if line == "-":
            pairs.append(None)
            continue
        words = tuple(line.replace(",", " ").split())
        if len(words) != 2:
            raise UserError(f"--blend_word needs two words (source word, target word), got {line!r}.")
        pairs.append(words)
    return pairs * num_targets if len(pairs) == 1 else pairs


def parse_reweight(text: str | None) -> dict | None:
    """Re-weighting as ``word=value, word=value`` (or the CLI's dict literal) -> ``eq_params``."""
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise UserError(f"re-weighting {text!r} is not a dict literal such as "
                            "{'words': ['red'], 'values': [2]}.") from err
        if not isinstance(value, dict) or set(value) != {"words", "values"}:
            raise UserError(f"re-weighting {text!r} must have exactly the keys 'words' and 'values'.")
        return value
    words, values = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        word, sep, number = item.partition("=")
        try:
            values.append(float(number))
        except ValueError:
            sep = ""
        if not sep or not word.strip():
            raise UserError(f"re-weighting item {item!r} is not word=value (e.g. red=2).")
        words.append(word.strip())
    return {"words": words, "values": values}


def _write_json_atomic(path: Path, record: dict) -> None:
    from .files import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    from .image_io import save_atomic

    save_atomic(image, path)


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
class EditResult:
    strip: Image.Image  # input | reconstruction | edit 1 | ... labelled
    edits: list[tuple[Image.Image, str]]  # each edit with its target prompt
    attention_maps: Image.Image | None
    files: list[Path]  # edit_<k>.png and edit_<k>.json per target
    seconds: float

    def summary(self) -> str:
        n = len(self.edits)
        return f"{n} edit{'s' if n > 1 else ''} in {self.seconds:.1f} s" + (f" ({self.seconds / n:.1f} s each)." if n > 1 else ".")


@dataclass
class DemoApp:
    """One model shared by every browser session; the lock makes its use one request at a time."""

    editor: object  # stylediffusion.StyleDiffusionEditor
    cache_dir: Path = DEFAULT_CACHE_DIR
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loaded: dict = field(default_factory=dict, repr=False)  # key -> Inversion, the last few used

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
        if not key or not _KEY_PATTERN.match(key):
            return None
        paths = self._paths(key)
        if not (paths["record"].is_file() and paths["inversion"].is_file()):
            return None
        record = json.loads(paths["record"].read_text())

        def picture(name):
            with Image.open(paths[name]) as img:
                img.load()
                return img

        return InvertResult(key, record["prompt"], record["method"], record["num_inference_steps"],
                            record["num_inner_steps"], picture("upload"), picture("image"), picture("reconstruction"),
                            record["psnr"], record["seconds"], cached=True)

    def _remember(self, key: str, inversion) -> None:
        """Keep the last few inversions in memory: editing one again skips reading its file."""
        self._loaded.pop(key, None)
        self._loaded[key] = inversion
        while len(self._loaded) > 4:
            self._loaded.pop(next(iter(self._loaded)))

    def _inversion(self, key: str):
        from . import Inversion

        if key not in self._loaded:
            self._remember(key, Inversion.load(self._paths(key)["inversion"]))
        return self._loaded[key]

    # ------------------------------------------------------------------ step 1
    def invert(self, image: Image.Image | None, prompt: str | None, method: str = "stylediffusion",
               num_inference_steps: int = 30, num_inner_steps: int = 100, progress: bool = False) -> InvertResult:
        """Invert (image, prompt) with these settings, or return the cached inversion made earlier."""
        if image is None:
            raise UserError("no image: upload one or pick an example.")
        prompt = (prompt or "").strip()
        num_inference_steps, num_inner_steps = _whole(num_inference_steps), _whole(num_inner_steps)
        key = self.cache_key(image, prompt, method, num_inference_steps, num_inner_steps)
        with self._lock:  # a second tab asking for the same inversion waits, then finds it cached
            hit = self.cached(key)
            if hit is not None:
                return hit
            t0 = time.perf_counter()
            inv = self.editor.invert(image, prompt, method=method, num_inference_steps=num_inference_steps,
                                     num_inner_steps=num_inner_steps, progress=progress)
            seconds = time.perf_counter() - t0
            # Editing towards the source prompt itself gives the reconstruction (the edit's source branch).
            out = self.editor.edit(inv, prompt, progress=False)
            psnr = _psnr(out.input_image, out.reconstruction)
            paths = self._paths(key)
            inv.save(paths["inversion"])
            _save_png_atomic(image, paths["upload"])
            _save_png_atomic(out.input_image, paths["image"])
            _save_png_atomic(out.reconstruction, paths["reconstruction"])
            _write_json_atomic(paths["record"], {  # last: its presence means the entry is complete
                "prompt": prompt, "method": method, "num_inference_steps": num_inference_steps,
                "num_inner_steps": num_inner_steps, "model": self.model_label, "image_sha256": image_digest(image),
                "psnr": psnr, "seconds": round(seconds, 3)})
            self._remember(key, inv)
        return InvertResult(key, prompt, method, num_inference_steps, num_inner_steps, image, out.input_image,
                            out.reconstruction, psnr, seconds, cached=False)

    # ------------------------------------------------------------------ step 2
    def edit(self, image: Image.Image | None, prompt: str | None, method: str, num_inference_steps: int,
             num_inner_steps: int, targets: str | None, edit_type: str = "auto", tau_v: float | None = None,
             tau_c: float | None = None, tau_s: float | None = None, tau_u: float | None = None,
             blend_words: str | None = None,
             reweight: str | None = None, edit_method: str = "p2p") -> EditResult:
        """Edit the cached inversion of (image, prompt, settings) towards every target (one per line).

        A τ left at None takes the command line's default (``editing.TAU_*``)."""
        from .editing import TAU_C, TAU_S, TAU_U, TAU_V
        from .image_io import image_grid

        if image is None:
            raise UserError("no image: upload one or pick an example, then press Invert.")
        key = self.cache_key(image, (prompt or "").strip(), method, _whole(num_inference_steps),
                             _whole(num_inner_steps))
        entry = self.cached(key)
        if entry is None:
            raise UserError("this image has not been inverted with this prompt and these settings: press Invert first.")
        target_list = parse_targets(targets)
        if not target_list:
            raise UserError("edit needs a target prompt (the edited caption): type one per line.")
        blends = parse_blend_words(blend_words, len(target_list))
        eq_params = parse_reweight(reweight)
        kind = None if edit_type in (None, "", "auto") else edit_type
        taus = {name: default if value is None else value
                for name, value, default in (("tau_v", tau_v, TAU_V), ("tau_c", tau_c, TAU_C), ("tau_s", tau_s, TAU_S),
                                             ("tau_u", tau_u, TAU_U))}
        t0 = time.perf_counter()
        edits, attention, recon = [], None, None
        with self._lock:
            inv = self._inversion(key)
            # One call per distinct blend pair (the API takes one pair per call); each call checks all its
            # targets before it runs any of them.
            for blend in dict.fromkeys(blends):
                group = [t for t, b in zip(target_list, blends) if b == blend]
                out = self.editor.edit(inv, group, edit_type=kind, blend_words=blend, eq_params=eq_params,
                                       method=edit_method, progress=False, **taus)
                per_edit = out.seconds / len(group)
                for target, picture, spec in zip(group, out.images, out.specs):
                    edits.append((target, picture, spec, per_edit))
                attention = attention if attention is not None else out.attention_maps
                recon = out.reconstruction
        order = {t: k for k, t in enumerate(target_list)}
        edits.sort(key=lambda e: order[e[0]])
        outdir = self.cache_dir / "edits" / uuid.uuid4().hex[:12]
        files = []
        for k, (target, picture, spec, seconds) in enumerate(edits):
            report = {"inversion": method, "edit": edit_method, "source": spec.source, "target": spec.target,
                      "edit_type": spec.edit_type, "tau_v": spec.tau_v, "tau_c": spec.tau_c, "tau_s": spec.tau_s,
                      "tau_u": spec.tau_u, "blend_words": spec.blend_words, "eq_params": spec.eq_params,
                      "guidance_scale": spec.guidance_scale, "num_ddim_steps": entry.num_inference_steps,
                      "num_inner_steps": entry.num_inner_steps, "model": self.model_label,
                      "edit_seconds": round(seconds, 3)}
            _save_png_atomic(picture, outdir / f"edit_{k}.png")
            _write_json_atomic(outdir / f"edit_{k}.json", report)
            files += [outdir / f"edit_{k}.png", outdir / f"edit_{k}.json"]
        strip = image_grid([entry.image, recon] + [e[1] for e in edits],
                           ["input", "reconstruction"] + [f"edit {k + 1}" for k in range(len(edits))])
        return EditResult(strip, [(e[1], e[0]) for e in edits], attention, files, time.perf_counter() - t0)

    # ------------------------------------------------------------------ examples
    def examples(self) -> list[list]:
        """[image path, prompt, targets, blend words] rows: the data index's cases (test-bed scenes first
        on the test-bed model), with the index's edits as the suggested targets."""
        from . import data_index

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
    from .metrics import psnr

    return round(float(psnr(a, b)), 2)


# ---------------------------------------------------------------------------- the page
def page_errors(fn):
    """A UserError becomes the page's one-line message (no traceback), and the server keeps serving."""
    import functools

    import gradio as gr

    @functools.wraps(fn)  # keeps the signature: Gradio finds the gr.Progress argument through it
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise gr.Error(one_line(err), print_exception=False) from None
    return wrapper


def for_display(image: Image.Image | None, side: int = 256) -> Image.Image | None:
    """Small model outputs (the test bed's 32x32) enlarged with nearest pixels, so they are seen as they are."""
    if image is None or image.width >= side:
        return image
    factor = -(-side // image.width)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def build_ui(app: DemoApp, inversion_methods: list[str], edit_methods: list[str]):
    """The page: Gradio components wired to ``app``'s methods, nothing else."""
    import gradio as gr

    from .editing import TAU_C, TAU_S, TAU_U, TAU_V

    @page_errors
    def on_invert(image, prompt, method, steps, inner, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="inverting (DDIM steps, then training iterations)")
        result = app.invert(image, prompt, method, steps, inner, progress=True)
        return result.key, for_display(result.reconstruction), result.summary()

    @page_errors
    def on_edit(image, prompt, method, steps, inner, targets, edit_type, tau_v, tau_c, tau_s, tau_u, blend,
                reweight, edit_method):
        result = app.edit(image, prompt, method, steps, inner, targets, edit_type, tau_v, tau_c, tau_s, tau_u,
                          blend, reweight, edit_method)
        return (result.strip, [(for_display(im), target) for im, target in result.edits], result.attention_maps,
                [str(path) for path in result.files], result.summary())

    def on_load(key):
        """A reload puts back this browser's last finished inversion (its key is kept in localStorage)."""
        hit = app.cached(key)
        if hit is None:
            return [gr.update()] * 7
        return (hit.upload, hit.prompt, hit.method, hit.num_inference_steps, hit.num_inner_steps,
                for_display(hit.reconstruction), hit.summary())

    with gr.Blocks(title="StyleDiffusion: invert once, edit many", analytics_enabled=False) as page:
        last_key = gr.BrowserState(None, storage_key="stylediffusion-demo-inversion")
        gr.Markdown(f"## StyleDiffusion: invert once, edit many\nModel `{app.model_label}`. **Step 1** trains the "
                    "inversion of an image (slow, once per image and settings; cached on disk). **Step 2** edits "
                    "it (seconds per target).")
        with gr.Row():
            with gr.Column():
                # PNG in both directions and the image's own mode: the pixels that come back are the ones
                # that were hashed, so an inversion is found again after a reload.
                image = gr.Image(type="pil", image_mode=None, format="png", label="input image",
                                 sources=["upload", "clipboard"], elem_id="input-image", height=256)
                prompt = gr.Textbox(label="prompt (caption of the image)", elem_id="prompt")
                with gr.Row():
                    method = gr.Dropdown(inversion_methods, value="stylediffusion", label="inversion method")
                    steps = gr.Number(30, label="T (DDIM steps)", precision=0, minimum=1, elem_id="steps")
                    inner = gr.Number(100, label="K (training iterations at step 0)", precision=0, minimum=1,
                                      elem_id="inner-steps")
                invert_button = gr.Button("Invert", variant="primary", elem_id="invert")
            with gr.Column():
                reconstruction = gr.Image(label="reconstruction", interactive=False, format="png",
                                          elem_id="reconstruction", height=256)
                invert_status = gr.Markdown("Upload an image or pick an example, type its prompt, press Invert.",
                                            elem_id="invert-status")
        gr.Markdown("### Step 2: edit")
        with gr.Row():
            with gr.Column():
                targets = gr.Textbox(label="target prompt(s), one per line", lines=3, elem_id="targets")
                edit_type = gr.Dropdown(list(EDIT_TYPE_CHOICES), value="auto", label="edit type",
                                        info="auto: Replacement when the word counts match, else Refinement")
                with gr.Row():
                    tau_v = gr.Slider(0, 1, TAU_V, step=0.05, label="τ_v (learned values)")
                    tau_c = gr.Slider(0, 1, TAU_C, step=0.05, label="τ_c (cross-attention)")
                with gr.Row():
                    tau_s = gr.Slider(0, 1, TAU_S, step=0.05, label="τ_s (self-attention)")
                    tau_u = gr.Slider(0, 1, TAU_U, step=0.05, label="τ_u (P2Plus: unconditional self-attention)")
                blend = gr.Textbox(label="blend words: source word, target word (one line for all targets, or one "
                                         "per target)", placeholder="cat tiger", lines=1, elem_id="blend")
                reweight = gr.Textbox(label="re-weighting of target words", placeholder="red=2, blue=0.5",
                                      elem_id="reweight")
                edit_method = gr.Dropdown(edit_methods, value="p2p", label="edit method")
                edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
            with gr.Column():
                strip = gr.Image(label="input | reconstruction | edits", interactive=False, format="png",
                                 elem_id="strip")
                gallery = gr.Gallery(label="edits", columns=4, format="png", elem_id="edits", height="auto")
                attention = gr.Image(label="the source prompt's cross-attention per word", interactive=False,
                                     format="png", elem_id="attention")
                files = gr.File(label="downloads: each edit and its edit.json", file_count="multiple",
                                elem_id="downloads")
                edit_status = gr.Markdown(elem_id="edit-status")
        examples = app.examples()
        if examples:
            gr.Examples(examples, inputs=[image, prompt, targets, blend], label="examples (the data index)",
                        elem_id="examples")

        step1 = [image, prompt, method, steps, inner]
        from .app_style_transfer import style_transfer_section

        style_transfer_section(app, step1)
        # One model: inversions and edits share one queue slot ("model"), so requests take turns.
        invert_button.click(on_invert, step1, [last_key, reconstruction, invert_status], concurrency_id="model",
                            concurrency_limit=1)
        edit_button.click(on_edit, step1 + [targets, edit_type, tau_v, tau_c, tau_s, tau_u, blend, reweight,
                                            edit_method],
                          [strip, gallery, attention, files, edit_status], concurrency_id="model",
                          concurrency_limit=1)
        page.load(on_load, [last_key], step1 + [reconstruction, invert_status])
    return page


def method_names() -> tuple[list[str], list[str]]:
    """The registered inversions that start from an image, and the registered edits."""
    from .methods import EDITS, INVERSIONS, get_inversion

    get_inversion("stylediffusion")  # makes sure the registry has filled itself
    return [name for name in INVERSIONS if name != "generated"], list(EDITS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stylediffusion.app",
                                description="Web demo: invert an image once, edit it many times.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="testbed",
                   help="hub id or local diffusers folder; 'testbed' = bundled test-bed model, 'tiny' = untrained")
    p.add_argument("--image_encoder", default=None, help="CLIP vision tower, hub id or folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE_DIR, help="where inversions and edits are kept")
    return p


def make_app(args) -> DemoApp:
    from . import StyleDiffusionEditor

    editor = StyleDiffusionEditor.from_pretrained(args.model, image_encoder=args.image_encoder, device=args.device)
    return DemoApp(editor, Path(args.cache_dir))


def serve(app: DemoApp, host: str = "127.0.0.1", port: int = 7860, block: bool = True, quiet: bool = False):
    """Lay the page out and serve it; ``block=False`` returns the running page (``page.close()`` stops it)."""
    page = build_ui(app, *method_names())
    page.queue()
    page.launch(server_name=host, server_port=port, ssr_mode=False, share=False, css=PAGE_CSS, quiet=quiet,
                allowed_paths=[str(app.cache_dir.resolve())], show_error=False, prevent_thread_lock=not block)
    return page


def main(argv: list[str] | None = None) -> int:
    from .errors import exit_code, quiet_libraries, started

    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            import gradio  # noqa: F401
        except ImportError as err:
            raise UserError("the web demo needs Gradio: pip install -e '.[demo]'") from err
        quiet_libraries()
        page = serve(make_app(args), args.host, args.port, block=False)
        started()  # serving: from here Ctrl-C reaches Gradio, which closes the server (finished inversions stay cached)
        page.block_thread()
        return 0

    return exit_code(body, "interrupted: finished inversions stay in the cache.")


if __name__ == "__main__":
    sys.exit(main())
