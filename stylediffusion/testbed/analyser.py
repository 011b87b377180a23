"""Read colours and shapes back from pixels.

Two entry points:

* :func:`analyse` -- with a *layout* (the object masks of a scene, or the
  :class:`~stylediffusion.testbed.world.SceneObject` list, or a whole ``Scene``):
  for each region says which palette colour it shows (nearest palette colour to
  the per-channel median of the eroded mask) and which shape (IoU of the
  region's thresholded foreground silhouette against rendered templates of
  every shape fitted to that region), and, given a reference image, how much
  the background changed (PSNR outside the dilated object masks).
* :func:`analyse_free` -- without a layout (generated images): the foreground
  is every pixel that differs clearly from the rendering of the background
  named in the caption (a texture at the phase that fits each neighbourhood);
  the largest connected foreground component is read as above.

Nothing here looks at captions or model internals: the verdicts come from
pixels alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .world import (
    BACKGROUNDS,
    OBJECT_COLOURS,
    SHAPES,
    Background,
    Scene,
    SceneObject,
    background_image,
    shape_mask,
    texture_period,
    unit_shape,
)

_PALETTE_NAMES = list(OBJECT_COLOURS)
_PALETTE = np.array([OBJECT_COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float64)

#: Pixels within this RGB distance of the object's median colour are foreground.
SILHOUETTE_THRESHOLD = 60.0
#: Pixels farther than this (max-channel abs difference) from the expected
#: background are foreground in :func:`analyse_free`.
FREE_FOREGROUND_THRESHOLD = 50.0
#: In :func:`analyse_free`, a pixel of a striped or checkered background is compared with the
#: texture's phase that fits its neighbourhood best: the square window of this radius, as a
#: fraction of the image width (6 px at 32: one and a half periods of the checks).
FREE_PHASE_RADIUS = 3 / 16


# ------------------------------------------------------------------------ helpers


def to_array(image) -> np.ndarray:
    """uint8 HxWx3 array from a PIL image / array (float arrays in [0,1] or [0,255])."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.max() <= 1.0 + 1e-6:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr[:, :, :3]


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    m = mask.astype(bool)
    for _ in range(steps):
        p = np.pad(m, 1, constant_values=False)
        m = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def box_mean(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the (2 radius + 1)^2 window around each pixel, the image's edge repeated."""
    k = 2 * radius + 1
    c = np.pad(np.pad(a.astype(np.float64), radius, mode="edge").cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    m = mask.astype(bool)
    for _ in range(steps):
        p = np.pad(m, 1, constant_values=False)
        m = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return m


def nearest_colour(rgb: Sequence[float]) -> Tuple[str, float]:
    d = np.linalg.norm(_PALETTE - np.asarray(rgb, np.float64)[None, :], axis=1)
    k = int(np.argmin(d))
    return _PALETTE_NAMES[k], float(d[k])


def psnr(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if mask is not None:
        if not mask.any():
            return float("inf")
        a, b = a[mask], b[mask]
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _bbox(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _unit_extents(shape: str) -> Tuple[float, float, float, float]:
    g = (np.arange(801) - 400) / 400.0
    v, u = np.meshgrid(g, g, indexing="ij")
    m = unit_shape(shape, u, v)
    us, vs = u[m], v[m]
    return float(us.min()), float(us.max()), float(vs.min()), float(vs.max())


_EXTENTS: Dict[str, Tuple[float, float, float, float]] = {}


def _extents(shape: str) -> Tuple[float, float, float, float]:
    if shape not in _EXTENTS:
        _EXTENTS[shape] = _unit_extents(shape)
    return _EXTENTS[shape]


def shape_scores(silhouette: np.ndarray, center: Optional[Tuple[float, float]] = None,
                 radius: Optional[float] = None) -> Dict[str, float]:
    """Best IoU of ``silhouette`` against every shape's template.

    Templates are fitted to the silhouette's bounding box (radius and centre
    solved from each shape's extents, then a small search around them); if the
    layout's ``center``/``radius`` are known they are tried as well.
    """
    h, w = silhouette.shape
    bb = _bbox(silhouette)
    scores = {s: 0.0 for s in SHAPES}
    if bb is None:
        return scores
    # work on a crop around the silhouette (templates are fitted to its bbox)
    pad = 3
    oy, ox = max(0, bb[1] - pad), max(0, bb[0] - pad)
    silhouette = silhouette[oy: bb[3] + pad, ox: bb[2] + pad]
    h, w = silhouette.shape
    x0, y0, x1, y1 = bb[0] - ox, bb[1] - oy, bb[2] - ox, bb[3] - oy
    if center is not None:
        center = (center[0] - ox, center[1] - oy)
    for s in SHAPES:
        umin, umax, vmin, vmax = _extents(s)
        # pixel centres span [x0+0.5, x1-0.5] so the shape's true extent is
        # between (width - 1) and (width + 1) pixels: search radii in that range
        ex, ey = umax - umin, vmax - vmin
        radii = set()
        for t in (-1.0, -0.5, 0.0, 0.5, 1.0):
            radii.add(round((x1 - x0 + t) / ex, 4))
            radii.add(round((y1 - y0 + t) / ey, 4))
        mx, my = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
        cands = []
        for r in radii:
            cx = mx - 0.5 * (umin + umax) * r
            cy = my - 0.5 * (vmin + vmax) * r
            for dx in (-0.5, -0.25, 0.0, 0.25, 0.5):
                for dy in (-0.5, -0.25, 0.0, 0.25, 0.5):
                    cands.append((cx + dx, cy + dy, r))
        if center is not None and radius is not None:
            cands.append((float(center[0]), float(center[1]), float(radius)))
        c = np.array([x for x in cands if x[2] > 0.5], dtype=np.float64)
        ys = np.arange(h, dtype=np.float64) + 0.5
        xs = np.arange(w, dtype=np.float64) + 0.5
        v = (ys[None, :, None] - c[:, 1, None, None]) / c[:, 2, None, None]
        u = (xs[None, None, :] - c[:, 0, None, None]) / c[:, 2, None, None]
        u, v = np.broadcast_arrays(u, v)
        tm = unit_shape(s, u, v)
        inter = (tm & silhouette[None]).sum(axis=(1, 2))
        union = (tm | silhouette[None]).sum(axis=(1, 2))
        best = float(np.max(np.where(union > 0, inter / np.maximum(union, 1), 0.0)))
        scores[s] = best
    return scores


# ----------------------------------------------------------------------- reports


@dataclass
class RegionReport:
    colour: str
    colour_distance: float  # RGB distance of the median to the chosen palette colour
    median_rgb: Tuple[float, float, float]
    shape: str
    shape_iou: float
    shape_scores: Dict[str, float] = field(default_factory=dict)
    area: int = 0


@dataclass
class Analysis:
    regions: List[RegionReport]
    background_psnr: Optional[float] = None  # vs the reference, outside dilated masks

    @property
    def colours(self) -> List[str]:
        return [r.colour for r in self.regions]

    @property
    def shapes(self) -> List[str]:
        return [r.shape for r in self.regions]


LayoutLike = Union[Scene, Sequence[SceneObject], Sequence[np.ndarray]]


def _normalise_layout(layout: LayoutLike):
    if isinstance(layout, Scene):
        layout = layout.objects
    out = []
    for item in layout:
        if isinstance(item, SceneObject):
            out.append((item.mask.astype(bool), item.center, item.radius))
        else:
            out.append((np.asarray(item).astype(bool), None, None))
    return out


def read_region(img: np.ndarray, mask: np.ndarray, exclude: Optional[np.ndarray] = None,
                center=None, radius=None, bg_image: Optional[np.ndarray] = None) -> RegionReport:
    """Colour and shape of the object occupying ``mask`` in ``img``.

    The silhouette is the connected set of pixels near the region's median
    colour: nearer to it than to ``bg_image`` (the expected background, when
    known) or else within :data:`SILHOUETTE_THRESHOLD`.
    """
    h, w = mask.shape
    core = erode(mask, 1)
    if not core.any():
        core = mask
    if not core.any():
        return RegionReport("none", float("inf"), (0.0, 0.0, 0.0), "none", 0.0, {}, 0)
    med = np.median(img[core].astype(np.float64), axis=0)
    colour, dist = nearest_colour(med)
    # window where the object (in any shape) may lie
    if center is not None and radius is not None:
        R = int(math.ceil(radius)) + 2
        cx, cy = center
        win = np.zeros((h, w), dtype=bool)
        win[max(0, int(cy) - R): int(cy) + R, max(0, int(cx) - R): int(cx) + R] = True
    else:
        win = dilate(mask, 3)
    if exclude is not None:
        win &= ~exclude
    pix = img.astype(np.float64)
    d_obj = np.linalg.norm(pix - med[None, None, :], axis=2)
    if bg_image is not None:
        # a pixel belongs to the silhouette when it is nearer the object colour
        # than the (known) background there: blurred edges split half-way
        d_bg = np.linalg.norm(pix - bg_image.astype(np.float64), axis=2)
        close = (d_obj < d_bg) & (d_obj < 2.5 * SILHOUETTE_THRESHOLD)
    else:
        close = d_obj < SILHOUETTE_THRESHOLD
    sil = close & win
    # keep the connected component that overlaps the mask core most
    sil = _component_touching(sil, core)
    scores = shape_scores(sil, center, radius)
    shape = max(scores, key=scores.get)
    return RegionReport(colour, dist, tuple(float(x) for x in med), shape, scores[shape], scores,
                        int(np.count_nonzero(sil)))


def analyse(image, layout: LayoutLike, reference=None, background="auto") -> Analysis:
    """Analyse ``image`` region by region using ``layout``.

    ``reference`` (image or Scene) enables ``background_psnr``: the PSNR
    between ``image`` and ``reference`` on the pixels outside every object
    mask dilated by two pixels (for shape edits pass both layouts' masks, e.g.
    ``source.objects + target.objects``, or just the source: every shape with
    the same centre and radius lies inside the same disc).

    ``background``: the expected background (a world background name, a
    ``Background`` with its texture's offset, or an image) used to split
    blurred object edges from the background; ``"auto"`` takes it from
    ``layout`` when that is a ``Scene``; ``None`` uses a fixed colour threshold
    instead.
    """
    img = to_array(image)
    bg_image = None
    if isinstance(background, str) and background == "auto":
        background = layout.background if isinstance(layout, Scene) else None
    if isinstance(background, Background):
        bg_image = background.image(img.shape[0])
    elif isinstance(background, str):
        bg_image = background_image(background, img.shape[0])
    elif background is not None:
        bg_image = to_array(background)
    items = _normalise_layout(layout)
    dil = [dilate(m, 2) for m, _, _ in items]
    reports = []
    for k, (m, c, r) in enumerate(items):
        others = np.zeros_like(m)
        for j, d in enumerate(dil):
            if j != k:
                others |= d & ~m
        reports.append(read_region(img, m, exclude=others, center=c, radius=r, bg_image=bg_image))
    bpsnr = None
    if reference is not None:
        ref = to_array(reference.image if isinstance(reference, Scene) else reference)
        outside = np.ones(img.shape[:2], dtype=bool)
        for (m, c, r), d in zip(items, dil):
            outside &= ~d
            if c is not None:
                # the whole disc an in-place shape swap may use
                disc = shape_mask("circle", c[0], c[1], r + 1.5, *m.shape)
                outside &= ~disc
        bpsnr = psnr(img, ref, outside)
    return Analysis(reports, bpsnr)


def _components(mask: np.ndarray) -> List[np.ndarray]:
    """4-connected components (small images: a plain flood fill)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                comp = np.zeros_like(mask, dtype=bool)
                stack = [(y, x)]
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    comp[cy, cx] = True
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
                comps.append(comp)
    return comps


def _component_touching(sil: np.ndarray, core: np.ndarray) -> np.ndarray:
    comps = _components(sil)
    if not comps:
        return sil
    return max(comps, key=lambda c: (np.count_nonzero(c & core), np.count_nonzero(c)))


def analyse_free(image, background: str, min_area: int = 4) -> Analysis:
    """Analyse an image with no layout (e.g. a generated one).

    Foreground = pixels whose max-channel difference from the rendering of
    ``background`` exceeds :data:`FREE_FOREGROUND_THRESHOLD`.  A striped or
    checkered background is rendered at every phase, and each pixel is compared
    with the phase that fits its neighbourhood best (window radius
    :data:`FREE_PHASE_RADIUS` of the width): a caption names a texture, not where
    it starts, and a drawn texture may change phase along a seam.  Differences are
    clipped at the threshold for that choice, so an object's pixels, far from
    every phase, do not choose it.  Connected
    components (4-connectivity, area >= ``min_area``) are read largest first,
    each as a region (colour of the median of the eroded component, shape by
    template IoU of the component).  ``background_psnr`` is the PSNR of the
    non-foreground pixels (dilated by 1) against the ideal background (at each
    pixel's phase).
    """
    img = to_array(image)
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}")
    if img.shape[0] != img.shape[1]:
        raise ValueError("image must be square with the world's size")
    size = img.shape[0]
    py, px = texture_period(background, size)
    radius = max(1, round(FREE_PHASE_RADIUS * size))
    pixels = img.astype(np.int32)
    best_fit = np.full((size, size), np.inf)
    bg, diff = np.zeros_like(img), np.zeros((size, size), np.int32)
    for offset in [(dy, dx) for dy in range(py) for dx in range(px)]:
        cand = background_image(background, size, offset)
        cand_diff = np.abs(pixels - cand.astype(np.int32)).max(axis=2)
        fit = box_mean(np.minimum(cand_diff, FREE_FOREGROUND_THRESHOLD), radius)
        better = fit < best_fit
        best_fit[better], bg[better], diff[better] = fit[better], cand[better], cand_diff[better]
    fg = diff > FREE_FOREGROUND_THRESHOLD
    comps = [c for c in _components(fg) if np.count_nonzero(c) >= min_area]
    comps.sort(key=lambda c: -np.count_nonzero(c))
    reports = []
    for c in comps:
        core = erode(c, 1)
        if not core.any():
            core = c
        med = np.median(img[core].astype(np.float64), axis=0)
        colour, dist = nearest_colour(med)
        scores = shape_scores(c)
        shape = max(scores, key=scores.get)
        reports.append(RegionReport(colour, dist, tuple(float(x) for x in med), shape, scores[shape],
                                    scores, int(np.count_nonzero(c))))
    outside = ~dilate(fg, 1)
    return Analysis(reports, psnr(img, bg, outside))
