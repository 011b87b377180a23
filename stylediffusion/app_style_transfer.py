"""The demo page's style-transfer section: step 1's inversion is the STYLE; a content image gets its look.

Kept apart from ``app.py``: ``build_ui`` calls ``style_transfer_section`` inside its page, with step 1's inputs.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import UserError
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


def transfer(app, image, prompt, method, steps, inner, content_image, content_prompt=None,
             feature_fraction=None, attention_fraction=None) -> TransferResult:
    """Transfer the style of step 1's (cached) inversion onto ``content_image``."""
    from .app import _save_png_atomic, _whole, _write_json_atomic

    if image is None:
        raise UserError("no style image: upload it in step 1 and press Invert (its inversion is the style).")
    if content_image is None:
        raise UserError("no content image: upload the picture whose structure the transfer keeps.")
    key = app.cache_key(image, (prompt or "").strip(), method, _whole(steps), _whole(inner))
    entry = app.cached(key)
    if entry is None:
        raise UserError("the style image has not been inverted with this prompt and these settings: press Invert first.")
    options = {"transfer_feature_fraction": feature_fraction, "transfer_attention_fraction": attention_fraction}
    content_prompt = (content_prompt or "").strip() or None
    t0 = time.perf_counter()
    with app._lock:
        out = app.editor.transfer_style(app._inversion(key), content_image, content_prompt, progress=False,
                                        **{k: v for k, v in options.items() if v is not None})
    outdir = app.cache_dir / "transfers" / uuid.uuid4().hex[:12]
    _save_png_atomic(out.images[0], outdir / "transfer.png")
    _write_json_atomic(outdir / "edit.json", {
        "inversion": method, "edit": "style_transfer", "style_prompt": entry.prompt,
        "content_prompt": content_prompt or "", **out.options, "num_ddim_steps": entry.num_inference_steps,
        "num_inner_steps": entry.num_inner_steps, "model": app.model_label, "edit_seconds": round(out.seconds, 3)})
    return TransferResult(out.grid(), out.images[0], [outdir / "transfer.png", outdir / "edit.json"],
                          time.perf_counter() - t0)


def style_transfer_section(app, step1: list) -> None:
    """The section's components and wiring; call inside the page's ``gr.Blocks`` (``step1`` = [image, prompt,
    method, steps, inner], the style's inversion inputs)."""
    import gradio as gr

    from .app import for_display, page_errors

    @page_errors
    def on_transfer(image, prompt, method, steps, inner, content, content_prompt, feature_fraction,
                    attention_fraction):
        result = transfer(app, image, prompt, method, steps, inner, content, content_prompt, feature_fraction,
                          attention_fraction)
        return result.grid, for_display(result.transfer), [str(p) for p in result.files], result.summary()

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
    button.click(on_transfer, step1 + [content, content_prompt, feature, attention], [grid, picture, files, status],
                 concurrency_id="model", concurrency_limit=1)
