"""Deterministic generator of captioned scenes with exact ground truth.

A scene is one or two flat-coloured shapes on a background.  Everything is
rendered by sampling analytic shapes at pixel centres (no anti-aliasing), so
every pixel inside an object's mask has exactly that object's palette colour
and the caption, masks and attributes describe the image exactly.

Geometry: each object has an integer centre ``(cx, cy)`` (a pixel corner) and a
radius ``r`` given by its size word; every shape fits inside the disc of radius
``r`` around the centre.  Objects are placed so that their discs (plus a gap of
two pixels) never overlap, hence swapping the shape of an object in place never
makes it touch another object.

Only numpy is needed for rendering (Pillow is used for convenience conversions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

DEFAULT_SIZE = 32

#: Object palette (exact RGB values).
OBJECT_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (245, 225, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
COLOUR_NAMES: Tuple[str, ...] = tuple(OBJECT_COLOURS)

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Size word -> radius at 32x32 (scaled linearly with the image side).
#: ``None`` is the default size, which the caption does not mention.
SIZES: Dict[Optional[str], float] = {"small": 4.5, None: 6.5, "large": 8.5}
SIZE_WORDS: Tuple[Optional[str], ...] = ("small", None, "large")

#: Backgrounds by caption name: (kind, colour A, colour B).
BACKGROUNDS: Dict[str, Tuple[str, Tuple[int, int, int], Tuple[int, int, int]]] = {
    "black": ("plain", (0, 0, 0), (0, 0, 0)),
    "gray": ("plain", (120, 120, 120), (120, 120, 120)),
    "blue": ("plain", (20, 30, 100), (20, 30, 100)),
    "striped gray": ("striped", (80, 80, 80), (150, 150, 150)),
    "checkered": ("checkered", (40, 40, 40), (100, 100, 100)),
    "gradient": ("gradient", (20, 20, 20), (140, 140, 140)),
}
BACKGROUND_NAMES: Tuple[str, ...] = tuple(BACKGROUNDS)

#: (colour, shape) combinations that never occur in the training split.  One per
#: shape, five different colours, so every colour and every shape is still seen
#: in training; only the combination is new.
HELDOUT_COMBOS = frozenset(
    {
        ("red", "triangle"),
        ("green", "star"),
        ("blue", "cross"),
        ("yellow", "circle"),
        ("purple", "square"),
    }
)

TRAIN_COMBOS: Tuple[Tuple[str, str], ...] = tuple(
    (c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELDOUT_COMBOS
)
HELDOUT_COMBO_LIST: Tuple[Tuple[str, str], ...] = tuple(sorted(HELDOUT_COMBOS))

_GAP = 2.0  # minimal free pixels between the discs of two objects


# --------------------------------------------------------------------------- shapes


def _points_in_polygon(u: np.ndarray, v: np.ndarray, poly: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Even-odd rule point-in-polygon, vectorised over the points."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


_TRIANGLE = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
_STAR = [
    ((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
     (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5))
    for k in range(10)
]


def unit_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points ``(u, v)`` (unit-disc coordinates, v pointing down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.7) & (np.abs(v) <= 0.7)
    if shape == "triangle":
        return _points_in_polygon(u, v, _TRIANGLE)
    if shape == "star":
        return _points_in_polygon(u, v, _STAR)
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.3) & (b <= 0.95)) | ((b <= 0.3) & (a <= 0.95))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Boolean ``(height, width)`` mask of ``shape`` sampled at pixel centres."""
    ys = (np.arange(height, dtype=np.float64) + 0.5 - cy) / r
    xs = (np.arange(width, dtype=np.float64) + 0.5 - cx) / r
    v, u = np.meshgrid(ys, xs, indexing="ij")
    return unit_shape(shape, u, v)


@lru_cache(maxsize=None)
def _template(shape: str, r: float) -> Tuple[np.ndarray, int]:
    """Patch of ``shape`` with radius ``r`` for an integer centre; returns (patch, R)."""
    R = int(math.ceil(r)) + 1
    patch = shape_mask(shape, R, R, r, 2 * R, 2 * R)
    patch.setflags(write=False)
    return patch, R


def _stamp(shape: str, cx: int, cy: int, r: float, height: int, width: int) -> np.ndarray:
    patch, R = _template(shape, r)
    out = np.zeros((height, width), dtype=bool)
    y0, x0 = cy - R, cx - R
    ys0, xs0 = max(0, y0), max(0, x0)
    ys1, xs1 = min(height, y0 + 2 * R), min(width, x0 + 2 * R)
    out[ys0:ys1, xs0:xs1] = patch[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0]
    return out


# ------------------------------------------------------------------- backgrounds


def texture_period(name: str, size: int = DEFAULT_SIZE) -> Tuple[int, int]:
    """(rows, columns) after which a textured background repeats itself: its phase is the offset
    modulo this.  (1, 1) for a background with no phase to shift (plain, and the gradient, which
    must not move)."""
    kind = BACKGROUNDS[name][0]
    if kind == "striped":
        return (max(2, (4 * size) // 32), 1)
    if kind == "checkered":
        cell = max(1, (4 * size) // 32)
        return (2 * cell, 2 * cell)
    return (1, 1)


@lru_cache(maxsize=None)
def _background_image(name: str, height: int, width: int, offset: Tuple[int, int] = (0, 0)) -> np.ndarray:
    kind, a, b = BACKGROUNDS[name]
    dy, dx = offset
    a_arr, b_arr = np.array(a, np.float64), np.array(b, np.float64)
    img = np.empty((height, width, 3), dtype=np.uint8)
    if kind == "plain":
        img[:] = np.array(a, np.uint8)
    elif kind == "striped":
        period = texture_period(name, height)[0]
        rows = ((np.arange(height) + dy) % period) < period // 2
        img[rows] = np.array(a, np.uint8)
        img[~rows] = np.array(b, np.uint8)
    elif kind == "checkered":
        cell = texture_period(name, height)[0] // 2
        yy, xx = np.meshgrid((np.arange(height) + dy) // cell, (np.arange(width) + dx) // cell, indexing="ij")
        on = ((yy + xx) % 2) == 0
        img[on] = np.array(a, np.uint8)
        img[~on] = np.array(b, np.uint8)
    elif kind == "gradient":
        t = (np.arange(height, dtype=np.float64) / max(1, height - 1))[:, None]
        rows = np.rint(a_arr[None, :] * (1 - t) + b_arr[None, :] * t).astype(np.uint8)
        img[:] = rows[:, None, :]
    else:  # pragma: no cover - table is fixed
        raise ValueError(kind)
    img.setflags(write=False)
    return img


def background_image(name: str, size: int = DEFAULT_SIZE, offset: Tuple[int, int] = (0, 0)) -> np.ndarray:
    """Exact rendering (uint8, HxWx3, a fresh copy) of a named background.

    ``offset`` = (rows, columns) the texture is shifted by (its phase): "checkered" says checks, not
    where the first one starts.  Taken modulo :func:`texture_period`, so it changes nothing on a plain
    background or the gradient."""
    if name not in BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}; known: {BACKGROUND_NAMES}")
    py, px = texture_period(name, size)
    offset = (int(offset[0]) % py, int(offset[1]) % px)
    return _background_image(name, size, size, offset).copy()


# ------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Background:
    name: str  # caption words, e.g. "striped gray"
    kind: str  # plain | striped | checkered | gradient
    colours: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    offset: Tuple[int, int] = (0, 0)  # texture phase (rows, columns); see background_image

    @classmethod
    def named(cls, name: str, offset: Tuple[int, int] = (0, 0)) -> "Background":
        kind, a, b = BACKGROUNDS[name]
        return cls(name=name, kind=kind, colours=(a, b), offset=(int(offset[0]), int(offset[1])))

    def image(self, size: int = DEFAULT_SIZE) -> np.ndarray:
        return background_image(self.name, size, self.offset)


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: Optional[str]  # "small" | "large" | None (default, not mentioned)
    center: Tuple[int, int]  # (cx, cy), integer pixel corner
    radius: float
    mask: np.ndarray = field(repr=False)  # bool HxW, exact
    bbox: Tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 (exclusive)

    @property
    def rgb(self) -> Tuple[int, int, int]:
        return OBJECT_COLOURS[self.colour]

    def phrase(self) -> str:
        words = ["a"]
        if self.size:
            words.append(self.size)
        words += [self.colour, self.shape]
        return " ".join(words)


@dataclass
class Scene:
    caption: str
    image: np.ndarray = field(repr=False)  # uint8 HxWx3
    objects: List[SceneObject]
    background: Background

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def pil(self):
        return Image.fromarray(self.image)

    def layout(self) -> List[np.ndarray]:
        return [o.mask for o in self.objects]


@dataclass
class SceneEdit:
    """One edit of a scene with its exact ground truth: the source and target scenes and what changed."""

    kind: str  # "colour" | "shape" | "background"
    source: Scene
    target: Scene
    index: Optional[int]  # edited object (None for background edits)
    old: str
    new: str

    @property
    def source_caption(self) -> str:
        return self.source.caption

    @property
    def target_caption(self) -> str:
        return self.target.caption


# --------------------------------------------------------------------- rendering


def caption_for(objects: Sequence[SceneObject], background: str) -> str:
    return " and ".join(o.phrase() for o in objects) + f" on a {background} background"


def _bbox(mask: np.ndarray) -> Tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def radius_for(size: Optional[str], image_size: int = DEFAULT_SIZE) -> float:
    return SIZES[size] * image_size / 32.0


def make_scene(
    objects: Sequence[Tuple[str, str, Optional[str], Tuple[int, int]]],
    background: str,
    size: int = DEFAULT_SIZE,
    background_offset: Tuple[int, int] = (0, 0),
) -> Scene:
    """Render a scene from ``[(colour, shape, size_word, (cx, cy)), ...]`` on ``background`` with its
    texture shifted by ``background_offset`` (see :func:`background_image`)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}")
    img = background_image(background, size, background_offset)
    objs: List[SceneObject] = []
    for colour, shape, size_word, (cx, cy) in objects:
        if colour not in OBJECT_COLOURS:
            raise ValueError(f"unknown colour {colour!r}")
        r = radius_for(size_word, size)
        mask = _stamp(shape, int(cx), int(cy), r, size, size)
        img[mask] = np.array(OBJECT_COLOURS[colour], np.uint8)
        objs.append(
            SceneObject(shape=shape, colour=colour, size=size_word, center=(int(cx), int(cy)),
                        radius=r, mask=mask, bbox=_bbox(mask))
        )
    return Scene(caption=caption_for(objs, background), image=img, objects=objs,
                 background=Background.named(background, background_offset))


def _place(rng: np.random.Generator, radii: Sequence[float], size: int,
           max_tries: int = 200) -> Optional[List[Tuple[int, int]]]:
    centres: List[Tuple[int, int]] = []
    for r in radii:
        lo, hi = int(math.ceil(r)), size - int(math.ceil(r))
        for _ in range(max_tries):
            c = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
            if all(math.hypot(c[0] - o[0], c[1] - o[1]) >= r + ro + _GAP
                   for o, ro in zip(centres, radii)):
                centres.append(c)
                break
        else:
            return None
    return centres


def sample_scene(
    rng: np.random.Generator,
    split: str = "train",
    size: int = DEFAULT_SIZE,
    n_objects: Optional[int] = None,
    p_two: float = 0.5,
    backgrounds: Optional[Sequence[str]] = None,
    sizes: Optional[Sequence[Optional[str]]] = None,
    texture_phase: str = "fixed",
) -> Scene:
    """Draw a random scene.

    ``split="train"``: no object uses a held-out (colour, shape) combination.
    ``split="heldout"``: the first object always uses a held-out combination
    (any other object is unconstrained), so every held-out caption contains a
    combination the model never saw in training.

    ``texture_phase="random"``: a striped or checkered background is shifted by a random even number
    of pixels (a whole latent cell of the test-bed VAE), drawn after everything else; ``"fixed"``
    (the default: the benchmarks' scenes) keeps every texture at offset (0, 0) and draws nothing more.
    """
    if texture_phase not in ("fixed", "random"):
        raise ValueError("texture_phase must be 'fixed' or 'random'")
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'")
    if isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(int(rng))
    bgs = tuple(backgrounds) if backgrounds else BACKGROUND_NAMES
    size_words = tuple(sizes) if sizes else SIZE_WORDS
    n = n_objects if n_objects is not None else (2 if rng.random() < p_two else 1)
    bg = bgs[int(rng.integers(len(bgs)))]
    while True:
        specs = []
        for k in range(n):
            if split == "heldout" and k == 0:
                colour, shape = HELDOUT_COMBO_LIST[int(rng.integers(len(HELDOUT_COMBO_LIST)))]
            else:
                colour, shape = TRAIN_COMBOS[int(rng.integers(len(TRAIN_COMBOS)))] if split == "train" else (
                    COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], SHAPES[int(rng.integers(len(SHAPES)))])
            specs.append((colour, shape, size_words[int(rng.integers(len(size_words)))]))
        centres = _place(rng, [radius_for(s[2], size) for s in specs], size)
        if centres is not None:
            break
    offset = (0, 0)
    py, px = texture_period(bg, size)
    if texture_phase == "random" and (py > 1 or px > 1):
        offset = (2 * int(rng.integers(max(1, py // 2))), 2 * int(rng.integers(max(1, px // 2))))
    return make_scene([(c, s, z, p) for (c, s, z), p in zip(specs, centres)], bg, size, offset)


def sample_batch(rng: np.random.Generator, n: int, split: str = "train", size: int = DEFAULT_SIZE,
                 **kw) -> Tuple[np.ndarray, List[str]]:
    """``n`` fresh scenes as a uint8 array ``(n, H, W, 3)`` plus their captions."""
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    caps: List[str] = []
    for i in range(n):
        s = sample_scene(rng, split=split, size=size, **kw)
        imgs[i] = s.image
        caps.append(s.caption)
    return imgs, caps


# ------------------------------------------------------------------------- edits


def _respec(scene: Scene) -> List[Tuple[str, str, Optional[str], Tuple[int, int]]]:
    return [(o.colour, o.shape, o.size, o.center) for o in scene.objects]


def edit(
    scene: Scene,
    kind: str,
    rng: Optional[np.random.Generator] = None,
    index: int = 0,
    to: Optional[str] = None,
) -> SceneEdit:
    """Ground-truth edit of ``scene``: everything else (layout, sizes, other
    objects, background) stays exactly the same.

    kind: ``"colour"`` (object ``index`` gets colour ``to``), ``"shape"`` (object
    ``index`` becomes shape ``to`` with the same centre and radius) or
    ``"background"`` (background becomes ``to``).  When ``to`` is None a
    different value is drawn with ``rng`` (default seed 0).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    specs = _respec(scene)
    bg = scene.background.name
    if kind in ("colour", "color"):
        kind = "colour"
        old = specs[index][0]
        new = to or [c for c in COLOUR_NAMES if c != old][int(rng.integers(len(COLOUR_NAMES) - 1))]
        if new not in OBJECT_COLOURS:
            raise ValueError(f"unknown colour {new!r}")
        c, s, z, p = specs[index]
        specs[index] = (new, s, z, p)
    elif kind == "shape":
        old = specs[index][1]
        new = to or [s for s in SHAPES if s != old][int(rng.integers(len(SHAPES) - 1))]
        if new not in SHAPES:
            raise ValueError(f"unknown shape {new!r}")
        c, s, z, p = specs[index]
        specs[index] = (c, new, z, p)
    elif kind == "background":
        old = bg
        new = to or [b for b in BACKGROUND_NAMES if b != old][int(rng.integers(len(BACKGROUND_NAMES) - 1))]
        if new not in BACKGROUNDS:
            raise ValueError(f"unknown background {new!r}")
        bg = new
        index = None  # type: ignore[assignment]
    else:
        raise ValueError("kind must be 'colour', 'shape' or 'background'")
    target = make_scene(specs, bg, scene.size, scene.background.offset)
    return SceneEdit(kind=kind, source=scene, target=target, index=index, old=old, new=new)


def fixed_scene(colour: str, shape: str, background: str = "black", size_word: Optional[str] = None,
                size: int = DEFAULT_SIZE) -> Scene:
    """A single centred object: handy for checks with a known layout."""
    return make_scene([(colour, shape, size_word, (size // 2, size // 2))], background, size)
