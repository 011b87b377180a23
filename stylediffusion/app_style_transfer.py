"""The demo page's style-transfer section: step 1's inversion is the STYLE; a content image gets its look.

Kept apart from ``app.py``: ``build_ui`` calls ``style_transfer_section`` inside its page, with step 1's inputs.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import optional, validate
from .demo_cache import EDITS
from .demo_page import (
    MAX_FIELD_CHARS,
    _choice,
    _field_text,
    _save_png_atomic,
    _session,
    _write_json_atomic,
    for_display,
    own_copy,
    page_errors,
    page_image,
)
from .errors import UserError
from .specs import asked_from
from .style_transfer import TRANSFER_OPTIONS

_DEFAULTS = {o.name: o.default for o in TRANSFER_OPTIONS}


@dataclass
class TransferResult:
    grid: Image.Image  # content | style | transfer
    transfer: Image.Image
    files: list[Path]  # transfer.png and edit.json
    seconds: float

    def summary(self) -> str:
        return f"style transfer in {self.seconds:.1f} s."


@asked_from("page")  # its messages name the page's fields by their labels
def transfer(app, image, prompt, method, steps, inner, content_image, content_prompt=None,
             feature_fraction=None, attention_fraction=None, session=None) -> TransferResult:
    """Transfer the style of step 1's (cached) inversion onto ``content_image``: the same checks, limits,
    time budget, cancel and bounded cache as ``DemoApp.edit`` (the result is an entry under ``edits/``)."""
    image = page_image(image, app.limits)
    if image is None:
        raise UserError("no style image: upload it in step 1 and press Invert (its inversion is the style).")
    content_image = page_image(content_image, app.limits)
    if content_image is None:
        raise UserError("no content image: upload the picture whose structure the transfer keeps.")
    prompt = app._source_prompt(prompt)
    steps, inner = app._steps(steps, inner)
    method = _choice(method, "inversion method")
    content_prompt = _field_text(content_prompt, "the content prompt", MAX_FIELD_CHARS).strip()
    app.limits.check_text(content_prompt, "the content prompt")
    content_prompt = validate.prompt(content_prompt, "the content prompt") if content_prompt else None
    options = {name: validate.fraction(value, name) for name, value in
               (("transfer_feature_fraction", feature_fraction), ("transfer_attention_fraction", attention_fraction))
               if value is not None}
    key = app.cache_key(image, prompt, method, steps, inner)
    outdir = app.cache_dir / EDITS / uuid.uuid4().hex[:12]
    missing = "the style image has not been inverted with this prompt and these settings: press Invert first."
    with app._result_request(session, key, outdir, missing) as (entry, guard):
        t0 = time.perf_counter()
        with app._lock, guard.watching(app.editor.bundle.unet):
            out = app.editor.transfer_style(app._inversion(key), content_image, content_prompt, progress=False,
                                            **options)

        def write():
            _save_png_atomic(out.images[0], outdir / "transfer.png")
            _write_json_atomic(outdir / "edit.json", {
                "inversion": method, "edit": "style_transfer", "style_prompt": entry.prompt,
                "content_prompt": content_prompt or "", **out.options, "num_ddim_steps": entry.num_inference_steps,
                "num_inner_steps": entry.num_inner_steps, "model": app.model_label,
                "edit_seconds": round(out.seconds, 3)})

        app._keep(f"{EDITS}/{outdir.name}", write)
    return TransferResult(out.grid(), out.images[0], [outdir / "transfer.png", outdir / "edit.json"],
                          time.perf_counter() - t0)


def style_transfer_section(app, step1: list, with_request):
    """The section's components and wiring; call inside the page's ``gr.Blocks`` (``step1`` = [image, prompt,
    method, steps, inner], the style's inversion inputs). Returns the click event (for the page's cancel)."""
    gr = optional.load("gradio")

    @page_errors
    @with_request
    def on_transfer(image, prompt, method, steps, inner, content, content_prompt, feature_fraction,
                    attention_fraction, request=None):
        result = transfer(app, image, prompt, method, steps, inner, content, content_prompt, feature_fraction,
                          attention_fraction, session=_session(request))
        return (own_copy(result.grid), own_copy(for_display(result.transfer)), [str(p) for p in result.files],
                result.summary())

    gr.Markdown("### Style transfer (the paper's §5.2.7)\nThe image inverted in step 1 (StyleDiffusion) is the "
                "**style**; the content image keeps its structure (Plug-and-Play's feature injection).")
    with gr.Row():
        with gr.Column():
            content = gr.Image(type="pil", image_mode=None, format="png", label="content image",
                               sources=["upload", "clipboard"], elem_id="content-image", height=256)
            content_prompt = gr.Textbox(label="content prompt (optional; empty = the empty prompt)",
                                        elem_id="content-prompt")
            with gr.Row():
                feature = gr.Slider(0, 1, _DEFAULTS["transfer_feature_fraction"], step=0.05,
                                    label="feature injection (fraction of steps)")
                attention = gr.Slider(0, 1, _DEFAULTS["transfer_attention_fraction"], step=0.05,
                                      label="self-attention injection (fraction of steps)")
            button = gr.Button("Transfer style", variant="primary", elem_id="transfer")
        with gr.Column():
            grid = gr.Image(label="content | style | transfer", interactive=False, format="png",
                            elem_id="transfer-grid")
            picture = gr.Image(label="transfer", interactive=False, format="png", elem_id="transfer-image",
                               height=256)
            files = gr.File(label="downloads: the transfer and its edit.json", file_count="multiple",
                            elem_id="transfer-downloads")
            status = gr.Markdown(elem_id="transfer-status")
    return button.click(on_transfer, step1 + [content, content_prompt, feature, attention],
                        [grid, picture, files, status], concurrency_id="model", concurrency_limit=1,
                        preprocess=False)
