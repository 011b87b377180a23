"""Pictures a person looks at: the input | reconstruction | edit strip and per-word attention maps."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from . import seq_aligner


def word_attention_maps(
    maps: torch.Tensor, prompt: str, tokenizer, grid_hw: tuple[int, int]
) -> list[tuple[str, np.ndarray]]:
    """(queries, tokens) averaged cross-attention -> one [0, 1] map per word of the prompt."""
    out = []
    for k, word in enumerate(seq_aligner.words(prompt)):
        idx = seq_aligner.word_token_indices(prompt, k, tokenizer)
        m = maps[:, idx].sum(-1).reshape(1, 1, *grid_hw).float()
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        out.append((word, m[0, 0].cpu().numpy()))
    return out


def attention_figure(maps: torch.Tensor, prompt: str, tokenizer, grid_hw: tuple[int, int],
                     image: Image.Image) -> Image.Image:
    """One panel per word: the image with that word's cross-attention overlaid, titled by the word."""
    per_word = word_attention_maps(maps, prompt, tokenizer, grid_hw)
    # matplotlib's Agg canvas without pyplot: no global backend switch, no figure left open
    fig = Figure(figsize=(2.2 * len(per_word), 2.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(per_word), squeeze=False)
    size = image.size[::-1]
    for ax, (word, m) in zip(axes[0], per_word):
        up = F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(image)
        ax.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(word)
        ax.axis("off")
    fig.suptitle("source prompt cross-attention (mid-low layers, averaged over steps)", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()  # rendered in memory: the caller decides whether and where it is written
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba()).copy())
