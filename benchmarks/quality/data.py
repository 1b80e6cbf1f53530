"""Procedural images and the benchmark's tasks, generated offline and reproducibly.

Glyphs (26 capital letters, 10 digits, 8 shapes, 8 math symbols) are polylines and arcs in the
unit square. Each sample moves the glyph's points through a random affine map (rotation,
anisotropic scale, shear, shift) and a smooth random warp (elastic distortion), then rasterises
the strokes analytically with anti-aliasing at 16x16, with random stroke width, contrast,
background noise and an occasional distractor stroke. Textures (oriented gratings) are
procedural. Task-specific transforms then act on the pixels (rotation, circular shift, inversion,
heavy noise) or on the geometry (small, off-centre digits).

* The backbone is pretrained on **letters** (26 classes): generic stroke features; it has never
  seen a digit, a shape, a symbol, a texture, or any task's transform.
* The T = 8 tasks (``TASKS``) each have their own source, transform and label map.

Everything is a pure function of a seed: the same call returns the same images on every machine.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SIZE = 16  #: images are SIZE x SIZE, one channel, values in [0, 1]
Stroke = list[tuple[float, float]]


# -- glyph templates -----------------------------------------------------------------------------
def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 0) -> Stroke:
    """Points of an elliptic arc; angles in degrees, y grows downwards (90 degrees = bottom)."""
    n = n or max(4, int(abs(a1 - a0) / 15) + 1)
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a))) for a in np.linspace(a0, a1, n)]


DIGITS: list[list[Stroke]] = [
    [_arc(0.5, 0.5, 0.21, 0.33, 0, 360)],  # 0
    [[(0.36, 0.30), (0.53, 0.16), (0.53, 0.85)]],  # 1
    [_arc(0.5, 0.34, 0.2, 0.18, 190, 380) + [(0.30, 0.85), (0.72, 0.85)]],  # 2
    [_arc(0.5, 0.32, 0.18, 0.16, 200, 450), _arc(0.5, 0.66, 0.2, 0.19, 270, 520)],  # 3
    [[(0.62, 0.85), (0.62, 0.15), (0.27, 0.62), (0.76, 0.62)]],  # 4
    [[(0.70, 0.16), (0.35, 0.16), (0.33, 0.48)] + _arc(0.5, 0.64, 0.2, 0.2, 220, 520)],  # 5
    [_arc(0.62, 0.56, 0.3, 0.4, 245, 180) + _arc(0.5, 0.66, 0.19, 0.19, 180, 540)],  # 6
    [[(0.27, 0.16), (0.73, 0.16), (0.42, 0.85)]],  # 7
    [_arc(0.5, 0.32, 0.16, 0.15, 90, 450), _arc(0.5, 0.66, 0.2, 0.19, -90, 270)],  # 8
    [_arc(0.5, 0.34, 0.19, 0.18, 0, 360), _arc(0.4, 0.34, 0.29, 0.51, 0, 85)],  # 9
]

LETTERS: list[list[Stroke]] = [
    [[(0.25, 0.85), (0.5, 0.15), (0.75, 0.85)], [(0.35, 0.6), (0.65, 0.6)]],  # A
    [[(0.3, 0.85), (0.3, 0.15), (0.55, 0.15)] + _arc(0.55, 0.32, 0.15, 0.17, 270, 450) + [(0.3, 0.49), (0.57, 0.49)] + _arc(0.57, 0.67, 0.17, 0.18, 270, 450) + [(0.3, 0.85)]],  # B
    [_arc(0.55, 0.5, 0.27, 0.34, 315, 45)],  # C
    [[(0.3, 0.15), (0.3, 0.85), (0.45, 0.85)] + _arc(0.45, 0.5, 0.27, 0.35, 90, -90) + [(0.3, 0.15)]],  # D
    [[(0.7, 0.15), (0.3, 0.15), (0.3, 0.85), (0.7, 0.85)], [(0.3, 0.5), (0.62, 0.5)]],  # E
    [[(0.7, 0.15), (0.3, 0.15), (0.3, 0.85)], [(0.3, 0.5), (0.62, 0.5)]],  # F
    [_arc(0.52, 0.5, 0.26, 0.34, 310, 90) + [(0.75, 0.85), (0.75, 0.55), (0.55, 0.55)]],  # G
    [[(0.3, 0.15), (0.3, 0.85)], [(0.7, 0.15), (0.7, 0.85)], [(0.3, 0.5), (0.7, 0.5)]],  # H
    [[(0.5, 0.15), (0.5, 0.85)], [(0.35, 0.15), (0.65, 0.15)], [(0.35, 0.85), (0.65, 0.85)]],  # I
    [[(0.65, 0.15), (0.65, 0.65)] + _arc(0.47, 0.65, 0.18, 0.2, 0, 180)],  # J
    [[(0.3, 0.15), (0.3, 0.85)], [(0.72, 0.15), (0.3, 0.55)], [(0.42, 0.45), (0.72, 0.85)]],  # K
    [[(0.3, 0.15), (0.3, 0.85), (0.7, 0.85)]],  # L
    [[(0.22, 0.85), (0.25, 0.15), (0.5, 0.6), (0.75, 0.15), (0.78, 0.85)]],  # M
    [[(0.28, 0.85), (0.28, 0.15), (0.72, 0.85), (0.72, 0.15)]],  # N
    [_arc(0.5, 0.5, 0.27, 0.35, 0, 360)],  # O
    [[(0.3, 0.85), (0.3, 0.15), (0.52, 0.15)] + _arc(0.52, 0.33, 0.18, 0.18, 270, 450) + [(0.3, 0.51)]],  # P
    [_arc(0.5, 0.48, 0.26, 0.33, 0, 360), [(0.55, 0.65), (0.78, 0.88)]],  # Q
    [[(0.3, 0.85), (0.3, 0.15), (0.52, 0.15)] + _arc(0.52, 0.33, 0.18, 0.18, 270, 450) + [(0.3, 0.51)], [(0.48, 0.51), (0.72, 0.85)]],  # R
    [_arc(0.5, 0.32, 0.19, 0.17, 340, 90) + _arc(0.5, 0.66, 0.21, 0.19, 270, 520)],  # S
    [[(0.25, 0.15), (0.75, 0.15)], [(0.5, 0.15), (0.5, 0.85)]],  # T
    [[(0.28, 0.15), (0.28, 0.62)] + _arc(0.5, 0.62, 0.22, 0.23, 180, 0) + [(0.72, 0.15)]],  # U
    [[(0.25, 0.15), (0.5, 0.85), (0.75, 0.15)]],  # V
    [[(0.18, 0.15), (0.33, 0.85), (0.5, 0.4), (0.67, 0.85), (0.82, 0.15)]],  # W
    [[(0.27, 0.15), (0.73, 0.85)], [(0.73, 0.15), (0.27, 0.85)]],  # X
    [[(0.25, 0.15), (0.5, 0.5), (0.75, 0.15)], [(0.5, 0.5), (0.5, 0.85)]],  # Y
    [[(0.27, 0.15), (0.73, 0.15), (0.27, 0.85), (0.73, 0.85)]],  # Z
]


def _star(points: int, outer: float, inner: float) -> Stroke:
    angles = np.arange(2 * points + 1) * math.pi / points - math.pi / 2
    return [(0.5 + (outer if i % 2 == 0 else inner) * math.cos(a), 0.52 + (outer if i % 2 == 0 else inner) * math.sin(a)) for i, a in enumerate(angles)]


SHAPES: list[list[Stroke]] = [
    [_arc(0.5, 0.5, 0.3, 0.3, 0, 360)],  # circle
    [[(0.5, 0.16), (0.83, 0.78), (0.17, 0.78), (0.5, 0.16)]],  # triangle
    [[(0.22, 0.22), (0.78, 0.22), (0.78, 0.78), (0.22, 0.78), (0.22, 0.22)]],  # square
    [[(0.5, 0.14), (0.84, 0.5), (0.5, 0.86), (0.16, 0.5), (0.5, 0.14)]],  # diamond
    [_star(5, 0.34, 0.14)],  # star
    [_arc(0.5, 0.5, 0.32, 0.32, 30, 390, 7)],  # hexagon
    [_arc(0.5, 0.5, 0.34, 0.2, 0, 360)],  # flat ellipse
    [[(0.2, 0.3), (0.8, 0.3), (0.8, 0.7), (0.2, 0.7), (0.2, 0.3)]],  # wide rectangle
]

_DOT_ABOVE, _DOT_BELOW = _arc(0.5, 0.27, 0.045, 0.045, 0, 360, 6), _arc(0.5, 0.73, 0.045, 0.045, 0, 360, 6)
SYMBOLS: list[list[Stroke]] = [
    [[(0.5, 0.22), (0.5, 0.78)], [(0.22, 0.5), (0.78, 0.5)]],  # +
    [[(0.22, 0.5), (0.78, 0.5)]],  # -
    [[(0.28, 0.28), (0.72, 0.72)], [(0.72, 0.28), (0.28, 0.72)]],  # x
    [[(0.22, 0.5), (0.78, 0.5)], _DOT_ABOVE, _DOT_BELOW],  # ÷
    [[(0.22, 0.4), (0.78, 0.4)], [(0.22, 0.6), (0.78, 0.6)]],  # =
    [[(0.72, 0.22), (0.28, 0.5), (0.72, 0.78)]],  # <
    [[(0.28, 0.22), (0.72, 0.5), (0.28, 0.78)]],  # >
    [[(0.72, 0.2), (0.28, 0.8)], _arc(0.32, 0.3, 0.08, 0.08, 0, 360, 8), _arc(0.68, 0.7, 0.08, 0.08, 0, 360, 8)],  # %
]


def _segments(glyph: list[Stroke], step: float = 0.06) -> np.ndarray:
    """The glyph's strokes as short segments [S, 2, 2] (densified so that a warp can bend them)."""
    out: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for stroke in glyph:
        for (x0, y0), (x1, y1) in zip(stroke[:-1], stroke[1:]):
            n = max(1, int(math.ceil(math.hypot(x1 - x0, y1 - y0) / step)))
            xs, ys = np.linspace(x0, x1, n + 1), np.linspace(y0, y1, n + 1)
            out.extend(((xs[i], ys[i]), (xs[i + 1], ys[i + 1])) for i in range(n))
    return np.asarray(out, dtype=np.float32)


def _padded(glyphs: list[list[Stroke]]) -> tuple[np.ndarray, np.ndarray]:
    """All glyphs' segments padded to the same count: segments [G, S, 2, 2] and a validity mask [G, S]."""
    segs = [_segments(g) for g in glyphs]
    longest = max(len(s) for s in segs)
    table = np.zeros((len(segs), longest, 2, 2), dtype=np.float32)
    valid = np.zeros((len(segs), longest), dtype=bool)
    for i, s in enumerate(segs):
        table[i, : len(s)], valid[i, : len(s)] = s, True
    return table, valid


# -- rendering -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Style:
    """How samples vary: geometric jitter, stroke and pixel statistics."""

    rotation_deg: float = 10.0  #: std of the rotation
    scale: tuple[float, float] = (0.8, 1.1)  #: uniform range of the overall scale
    aspect: float = 0.12  #: std of the log aspect ratio
    shear: float = 0.15  #: uniform range of the shear
    shift: float = 0.08  #: uniform range of the shift (unit square)
    warp: float = 0.03  #: amplitude of the smooth random displacement (elastic distortion)
    width: tuple[float, float] = (0.035, 0.07)  #: stroke half-width range (unit square)
    contrast: tuple[float, float] = (0.6, 1.0)
    noise: float = 0.06  #: std of the additive Gaussian pixel noise
    clutter: int = 1  #: up to this many distractor strokes per image


def render(labels: np.ndarray, glyphs: list[list[Stroke]], style: Style, rng: np.random.Generator, chunk: int = 1024) -> np.ndarray:
    """Images [N, SIZE, SIZE] float32 in [0, 1] of ``glyphs[labels[i]]``, each with its own jitter."""
    table, valid = _padded(glyphs)
    out = np.empty((len(labels), SIZE, SIZE), dtype=np.float32)
    for start in range(0, len(labels), chunk):
        idx = labels[start : start + chunk]
        out[start : start + len(idx)] = _render_chunk(table[idx], valid[idx], style, rng)
    return out


def _render_chunk(seg: np.ndarray, valid: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    n = seg.shape[0]
    pts = seg.reshape(n, -1, 2) - 0.5  # [N, 2S, 2], centred
    # affine: rotation, anisotropic scale, shear, shift
    angle = np.radians(rng.normal(0, style.rotation_deg, n))
    scale = rng.uniform(*style.scale, n)
    aspect = np.exp(rng.normal(0, style.aspect, n))
    shear = rng.uniform(-style.shear, style.shear, n)
    cos, sin = np.cos(angle), np.sin(angle)
    a = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [N, 2, 2]
    s = np.zeros((n, 2, 2))
    s[:, 0, 0], s[:, 0, 1], s[:, 1, 1] = scale * aspect, shear * scale, scale / aspect
    pts = np.einsum("nij,npj->npi", a @ s, pts) + rng.uniform(-style.shift, style.shift, (n, 1, 2)) + 0.5
    # elastic distortion: a sum of three random low-frequency waves, displacing each point
    for _ in range(3):
        freq = rng.normal(0, 2.5, (n, 1, 2))
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        amp = rng.normal(0, style.warp, (n, 1, 2))
        pts = pts + amp * np.sin(2 * np.pi * (pts * freq).sum(-1, keepdims=True) + phase)
    seg = pts.reshape(n, -1, 2, 2).astype(np.float32)
    # distractor strokes: short random segments in place of some padding (or appended)
    if style.clutter:
        extra = np.zeros((n, style.clutter, 2, 2), dtype=np.float32)
        start = rng.uniform(0.0, 1.0, (n, style.clutter, 2))
        direction = rng.normal(0, 0.15, (n, style.clutter, 2))
        extra[:, :, 0], extra[:, :, 1] = start, start + direction
        use = rng.random((n, style.clutter)) < 0.5
        seg = np.concatenate([seg, extra], 1)
        valid = np.concatenate([valid, use], 1)
    # analytic anti-aliased rasterisation: distance from each pixel centre to the nearest segment
    # (x and y kept apart and in float32: this loop is where data generation spends its time)
    cx, cy = ((np.arange(SIZE * SIZE, dtype=np.float32) % SIZE + 0.5) / SIZE, (np.arange(SIZE * SIZE, dtype=np.float32) // SIZE + 0.5) / SIZE)
    x0, y0 = seg[:, :, 0, 0, None], seg[:, :, 0, 1, None]  # [N, S, 1]
    dx, dy = seg[:, :, 1, 0, None] - x0, seg[:, :, 1, 1, None] - y0
    rx, ry = cx - x0, cy - y0  # [N, S, P]
    t = np.clip((rx * dx + ry * dy) / np.maximum(dx * dx + dy * dy, 1e-8), 0, 1)
    rx -= t * dx
    ry -= t * dy
    dist2 = rx * rx + ry * ry
    dist2[~valid] = np.inf
    dist2 = dist2.min(1)  # [N, P]
    width = rng.uniform(*style.width, (n, 1))
    ink = np.clip(0.5 + (width - np.sqrt(dist2)) * SIZE, 0, 1)
    img = ink * rng.uniform(*style.contrast, (n, 1)) + rng.normal(0, style.noise, ink.shape)
    return np.clip(img, 0, 1).reshape(n, SIZE, SIZE).astype(np.float32)


def gratings(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Oriented sinusoidal gratings (texture classes): label = 4 orientations x 2 frequency bands."""
    n = len(labels)
    theta = (labels % 4) * np.pi / 4 + rng.normal(0, np.radians(6), n)
    freq = np.where(labels < 4, rng.uniform(1.5, 2.5, n), rng.uniform(3.5, 5.0, n)) / SIZE  # cycles per pixel
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    phase = (xs[None] * np.cos(theta)[:, None, None] + ys[None] * np.sin(theta)[:, None, None]) * freq[:, None, None]
    waves = np.sin(2 * np.pi * phase + rng.uniform(0, 2 * np.pi, (n, 1, 1)))
    img = 0.5 + 0.5 * rng.uniform(0.3, 0.9, (n, 1, 1)) * waves + rng.normal(0, 0.12, waves.shape)
    return np.clip(img, 0, 1).astype(np.float32)


# -- pixel transforms ----------------------------------------------------------------------------
def _noisy(images: np.ndarray, rng: np.random.Generator, std: float = 0.3, salt: float = 0.08) -> np.ndarray:
    out = images + rng.normal(0, std, images.shape)
    flip = rng.random(images.shape) < salt
    out[flip] = rng.random(int(flip.sum()))
    return np.clip(out, 0, 1).astype(np.float32)


# -- tasks -----------------------------------------------------------------------------------------
PixelFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]

#: stroke-drawn sources: their glyph templates
GLYPH_SOURCES: dict[str, list[list[Stroke]]] = {"letters": LETTERS, "digits": DIGITS, "shapes": SHAPES, "symbols": SYMBOLS}
#: procedural sources: (items, rng) -> images
PROCEDURAL_SOURCES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {"gratings": gratings}


def _identity(items: np.ndarray) -> np.ndarray:
    return items


def _keep(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images


@dataclass(frozen=True)
class TaskSpec:
    """One task: ``num_items`` kinds of item drawn from ``source`` in ``style``, then ``pixels``; label = ``labels(item)``."""

    name: str
    description: str
    source: str
    num_items: int
    num_classes: int
    labels: Callable[[np.ndarray], np.ndarray] = _identity
    pixels: PixelFn = _keep
    style: Style = field(default_factory=Style)

    def draw(self, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.source in PROCEDURAL_SOURCES:
            return PROCEDURAL_SOURCES[self.source](items, rng)
        return render(items, GLYPH_SOURCES[self.source], self.style, rng)


_UPRIGHT = Style(rotation_deg=5.0, shear=0.1)  # shapes and symbols: a large rotation could change the class

TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("inverted", "digits, dark on a light background; 10-way", "digits", 10, 10, pixels=lambda x, rng: 1.0 - x),
    TaskSpec("rot90", "digits rotated by 90 degrees; 10-way", "digits", 10, 10, pixels=lambda x, rng: np.rot90(x, 1, axes=(1, 2)).copy()),
    TaskSpec("rolled", "digits rolled (circularly shifted) by half the width; 10-way", "digits", 10, 10,
             pixels=lambda x, rng: np.roll(x, SIZE // 2, axis=2)),
    TaskSpec("parity", "is the digit odd? under heavy Gaussian and salt-and-pepper noise; 2-way", "digits", 10, 2, lambda d: d % 2, _noisy),
    TaskSpec("greater4", "is the digit > 4? small (0.55-0.7 scale) and anywhere in the frame; 2-way", "digits", 10, 2,
             lambda d: (d > 4).astype(np.int64), style=Style(scale=(0.55, 0.7), shift=0.2)),
    TaskSpec("shapes", "outlined circle, triangle, square, diamond, star, hexagon, ellipse, rectangle; 8-way", "shapes", 8, 8, style=_UPRIGHT),
    TaskSpec("symbols", "math symbols + - x ÷ = < > %; 8-way", "symbols", 8, 8, style=_UPRIGHT),
    TaskSpec("gratings", "noisy sinusoidal textures, 4 orientations x 2 frequency bands; 8-way", "gratings", 8, 8),
)
TASK_NAMES = tuple(t.name for t in TASKS)
PRETRAIN_CLASSES = len(LETTERS)


def get_task(name: str) -> TaskSpec:
    for task in TASKS:
        if task.name == name:
            return task
    raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}")


def seed_for(*parts: object) -> int:
    """A stable 32-bit seed from names (crc32; Python's hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def task_split(task: TaskSpec, split: str, n: int, base_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images [n, SIZE, SIZE] and labels [n] of one task's split (train, val or test)."""
    rng = np.random.default_rng(seed_for(base_seed, task.name, split))
    items = rng.integers(0, task.num_items, n)
    images = task.pixels(task.draw(items, rng), rng)
    return images.astype(np.float32), task.labels(items).astype(np.int64)


def pretrain_split(n: int, base_seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Letters (26 classes) in the default style: the generic pretraining data of the backbone."""
    rng = np.random.default_rng(seed_for(base_seed, "letters", split))
    letters = rng.integers(0, PRETRAIN_CLASSES, n)
    return render(letters, LETTERS, Style(), rng), letters.astype(np.int64)
