"""The test-bed training losses beyond the plain epsilon MSE: object-weighted pixel/latent losses, and
the cross-attention losses that use the world's exact geometry (where each caption word's object is)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from stylediffusion import seq_aligner
from stylediffusion.attention_control import AttentionController

from .evaluate import background_word_positions, cell_fractions, object_disc, object_word_positions


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of ``a`` and ``b`` (edge sharpness)."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(a), dx(b)) + F.l1_loss(dy(a), dy(b))


def object_loss_weights(scenes, latent_hw, weight: float, dilate: int = 1) -> torch.Tensor:
    """(batch, 1, h, w) weights of the epsilon loss: ``weight`` on latent cells that hold any pixel of
    an object's mask dilated by ``dilate`` px, 1 elsewhere.

    Most of a scene is background, so an unweighted loss spends little of its signal on the few cells
    where one shape differs from another; this puts it back there."""
    masks = np.zeros((len(scenes), 1, scenes[0].size, scenes[0].size), dtype=np.float32)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            masks[i, 0][obj.mask] = 1.0
    m = torch.from_numpy(masks)
    if dilate:
        m = F.max_pool2d(m, 2 * dilate + 1, 1, dilate)
    m = F.adaptive_max_pool2d(m, latent_hw)
    return 1.0 + (weight - 1.0) * m


def weighted_mean(values: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values`` with per-cell weights (broadcast), normalised by their mean so a loss keeps
    its scale; ``None`` is the plain mean."""
    if weights is None:
        return values.mean()
    return (values * weights).mean() / weights.mean()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return weighted_mean((pred - target) ** 2, weights)


class AttentionMapKeeper(AttentionController):
    """Attention controller (ptp_utils API) that keeps, with gradients, the cross-attention
    softmax maps of every layer whose query grid is the latent's or up to 4x coarser
    (latent/1, /2, /4 = 16, 8, 4 cells a side here); the 2x2 mid block is left out."""

    def __init__(self, max_downscale: float = 4.0):
        self.max_downscale = max_downscale
        self.maps: List[torch.Tensor] = []  # (batch, heads, queries, tokens), forward order

    def needs_maps(self, place, state) -> bool:
        return place.is_cross and place.downscale <= self.max_downscale + 1e-6

    def __call__(self, probs, place, state):
        self.maps.append(probs)
        return probs


def object_word_targets(scene, caption_tokens: Dict[str, List[List[int]]], tok, dilate: float = 2.0,
                        background: bool = False):
    """[(token indices, mask HxW)] for the colour and the shape word of every object (mask: its disc
    dilated by ``dilate`` px) and, with ``background``, for each background word (mask: every pixel
    outside the objects).

    The words are found by position (``a [size] colour shape [and ...] on a <bg> background``),
    so a background word equal to an object's colour ("blue") is never confused with it.
    ``caption_tokens`` caches the token indices of (caption, word) across calls."""

    def token_indices(word_index):
        key = f"{scene.caption}\t{word_index}"
        if key not in caption_tokens:
            caption_tokens[key] = seq_aligner.word_token_indices(scene.caption, word_index, tok)
        return caption_tokens[key]

    out = []
    for k, obj in enumerate(scene.objects):
        disc = object_disc(obj, scene.size, dilate)
        for word_index in object_word_positions(scene, k):
            out.append((token_indices(word_index), disc))
    if background:
        outside = ~np.any([obj.mask for obj in scene.objects], axis=0)
        for word_index in background_word_positions(scene):
            out.append((token_indices(word_index), outside))
    return out


def attention_inside_loss(maps: List[torch.Tensor], rows: List[int], tokens: List[List[int]],
                          discs: List[np.ndarray], weights: torch.Tensor) -> torch.Tensor:
    """Mean over (layer, word) of weight * (1 - fraction of the word's attention mass inside its disc).

    ``maps``: per layer (batch, heads, queries, tokens) softmax maps on a square query grid;
    ``rows[i]``, ``tokens[i]``, ``discs[i]``: batch row, token positions and pixel mask of word i.
    Each cell's mass counts inside in proportion to the fraction of its pixels in the mask."""
    if not rows:
        return maps[0].new_zeros(())
    n_tok = maps[0].shape[-1]
    select = torch.zeros(len(rows), n_tok)
    for i, idx in enumerate(tokens):
        select[i, idx] = 1.0
    row_index = torch.as_tensor(rows)
    total = maps[0].new_zeros(())
    for probs in maps:
        grid = int(round(math.sqrt(probs.shape[2])))
        word_maps = torch.einsum("nqk,nk->nq", probs.mean(1)[row_index], select)  # (words, queries)
        word_maps = word_maps / word_maps.sum(-1, keepdim=True).clamp_min(1e-12)
        frac = torch.from_numpy(np.stack([cell_fractions(d, (grid, grid)) for d in discs]).reshape(len(rows), -1))
        inside = (word_maps * frac.to(word_maps.dtype)).sum(-1)
        total = total + (weights * (1.0 - inside)).mean()
    return total / len(maps)


def pixel_word_targets(scene, targets, grid: int, n_tokens: int,
                       purity: float = 0.99) -> Tuple[np.ndarray, np.ndarray]:
    """Which tokens each cell of a ``grid`` x ``grid`` query map should read, for the query-side loss.

    ``targets``: :func:`object_word_targets` of ``scene`` (with the background).  A cell at least
    ``purity`` inside one object's mask reads that object's colour and shape words; a cell at least
    ``purity`` outside every object reads the background's words; mixed cells are left out.
    Returns (cells x ``n_tokens`` bool selection, cells bool valid)."""
    n_obj = len(scene.objects)
    select = np.zeros((grid * grid, n_tokens), dtype=bool)
    valid = np.zeros(grid * grid, dtype=bool)
    object_tokens = [sorted({i for idx, _ in targets[2 * k: 2 * k + 2] for i in idx}) for k in range(n_obj)]
    background_tokens = sorted({i for idx, _ in targets[2 * n_obj:] for i in idx})
    regions = [(obj.mask, object_tokens[k]) for k, obj in enumerate(scene.objects)]
    regions.append((targets[-1][1], background_tokens))
    for mask, tokens in regions:
        pure = cell_fractions(mask, (grid, grid)).reshape(-1) >= purity
        select[np.ix_(pure, tokens)] = True
        valid |= pure
    return select, valid


def attention_share_loss(maps: List[torch.Tensor], scenes, rows: List[int], targets: List[list],
                         weights: torch.Tensor) -> torch.Tensor:
    """Mean over (layer, scene, pure cell) of weight * (1 - share of the cell's attention on its words).

    :func:`attention_inside_loss` says where a word's attention goes; this says what a pixel reads:
    a pixel that gives its attention to padding tokens gets little of its own words' values, so the
    caption's background (a few percent of a background pixel's attention otherwise) barely reaches it."""
    if not rows:
        return maps[0].new_zeros(())
    total = maps[0].new_zeros(())
    cells: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}  # layers share a few grids
    for probs in maps:
        grid = int(round(math.sqrt(probs.shape[2])))
        per_scene = []
        for i, (r, scene, tg) in enumerate(zip(rows, scenes, targets)):
            if (i, grid) not in cells:
                cells[i, grid] = pixel_word_targets(scene, tg, grid, probs.shape[-1])
            select, valid = cells[i, grid]
            if not valid.any():
                per_scene.append(probs.new_zeros(()))
                continue
            p = probs[r].mean(0)[torch.from_numpy(valid)]  # (pure cells, tokens)
            share = (p * torch.from_numpy(select[valid]).to(p.dtype)).sum(-1)
            per_scene.append((1.0 - share).mean())
        total = total + (weights * torch.stack(per_scene)).mean()
    return total / len(maps)
