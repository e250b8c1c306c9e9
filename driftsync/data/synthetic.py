"""Embedded default dataset: procedurally drawn glyphs, so a fresh machine needs no downloads.

Every sample is a pure function of (seed, index) through a counter-based hash, so any slice can
be regenerated anywhere (cloud or edge) without storing data: generate(5, 3) == generate(0, 10)[5:8].
Classes differ in fine structure (outlines, holes, corners, stripes, checks) on top of random
colours, gradient/cloudy backgrounds and thin clutter lines, so noise, blur, fog, contrast and
compression corruptions genuinely hurt while clean images remain easy to learn.
numpy only (no torch): edge devices import this module.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "disc",
    "ring",
    "square",
    "frame",
    "triangle",
    "cross",
    "star",
    "stripes",
    "checker",
    "crescent",
)

SIZE = 32
_CHUNK = 256
_NUM_PARAMS = 64  # hashed uniforms drawn per sample; fixed so the stream never shifts
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_YX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres, (2, 32, 32)
# (4, 32) tent weights: bilinear upsampling of a 4x4 grid of background "clouds" to 32x32.
_CLOUD = np.clip(1.0 - np.abs((np.arange(SIZE) + 0.5) * (3.0 / SIZE) - np.arange(4)[:, None]), 0.0, 1.0)
_CLOUD = _CLOUD.astype(np.float32)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Counter-based mixing: a stateless hash makes each sample independent of batch layout."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, idx: np.ndarray, k: int) -> np.ndarray:
    """(n, k) float32 uniforms in [0, 1) that depend only on (seed, index, column)."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
        keys = _splitmix64(base ^ _splitmix64(idx.astype(np.uint64)))
        cols = keys[:, None] + np.arange(1, k + 1, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)
        bits = _splitmix64(cols & _MASK64) >> np.uint64(40)
    return bits.astype(np.float32) / np.float32(1 << 24)


def labels(start: int, count: int, seed: int = 0) -> np.ndarray:
    """Class of samples start..start+count-1 (a hash of the index, so roughly balanced)."""
    idx = np.arange(start, start + count, dtype=np.int64)
    salt = np.uint64((seed * 2 + 1) & 0xFFFFFFFFFFFFFFFF)
    bits = _splitmix64(_splitmix64(idx.astype(np.uint64)) ^ salt)
    return (bits % np.uint64(len(CLASS_NAMES))).astype(np.int64)


def _box(u: np.ndarray, v: np.ndarray, a: float | np.ndarray, b: float | np.ndarray) -> np.ndarray:
    """Signed distance (approx.) to an axis-aligned box of half sizes a, b."""
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _shape_sdf(cls: int, u: np.ndarray, v: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """Signed distance in shape units (radius 1) for class cls; thick is the stroke half-width."""
    rad = np.sqrt(u * u + v * v)
    name = CLASS_NAMES[cls]
    if name in ("disc", "stripes", "checker"):
        return rad - 1.0
    if name == "ring":
        return np.abs(rad - (1.0 - thick)) - thick
    if name == "square":
        return _box(u, v, 0.8, 0.8)
    if name == "frame":
        return np.abs(_box(u, v, 0.85 - thick, 0.85 - thick)) - thick
    if name == "triangle":
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) - 0.5
    if name == "cross":
        arm = thick + 0.05
        return np.minimum(_box(u, v, 1.0, arm), _box(u, v, arm, 1.0))
    if name == "star":
        phase = (np.arctan2(v, u) * 5.0 / (2 * np.pi)) % 1.0
        return rad - (0.45 + 0.55 * np.abs(2.0 * phase - 1.0))
    if name == "crescent":
        return np.maximum(rad - 1.0, 0.8 - np.sqrt((u - 0.55) ** 2 + v * v))
    raise ValueError(name)


def _texture(cls: int, u: np.ndarray, v: np.ndarray, period: np.ndarray) -> np.ndarray:
    """Foreground weight in [0, 1]: soft-edged stripes/checks inside the disc, solid elsewhere."""
    name = CLASS_NAMES[cls]
    if name == "stripes":
        return np.clip(0.5 + 2.0 * np.sin(u * (2 * np.pi) / period), 0.0, 1.0)
    if name == "checker":
        wave = np.sin(u * (2 * np.pi) / period) * np.sin(v * (2 * np.pi) / period)
        return np.clip(0.5 + 4.0 * wave, 0.0, 1.0)
    return np.ones_like(u)


def _colours(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Random background/foreground RGB pairs, the foreground pushed 0.3-0.65 away in brightness."""
    bg = p[:, 0:3]
    lum = bg.mean(axis=1, keepdims=True)
    sign = np.where(lum > 0.5, np.float32(-1), np.float32(1))
    gap = 0.3 + 0.35 * p[:, 3:4]
    tint = (p[:, 4:7] - 0.5) * 0.5
    fg = np.clip(bg + sign * (gap + tint), 0.0, 1.0)
    return bg, fg


def generate(start: int, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples start..start+count-1 as (x uint8 (count, 32, 32, 3) NHWC RGB, y int64 (count,))."""
    if count < 0 or start < 0:
        raise ValueError("start and count must be >= 0")
    y = labels(start, count, seed)
    x = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    for lo in range(0, count, _CHUNK):  # small chunks stay in cache: ~2x faster than one big batch
        hi = min(lo + _CHUNK, count)
        idx = np.arange(start + lo, start + hi, dtype=np.int64)
        x[lo:hi] = _render(y[lo:hi], _uniforms(seed, idx, _NUM_PARAMS))
    return x, y


def _render(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Draw one chunk from its labels and per-sample uniforms p (n, _NUM_PARAMS)."""
    count = len(y)
    bg, fg = _colours(p[:, 0:7])

    # Background: colour + linear gradient + low-frequency clouds, so the shape is not the only structure.
    gy, gx = (_YX - SIZE / 2) / SIZE
    grad_dir = p[:, 7] * 2 * np.pi
    cos, sin, amp = np.cos(grad_dir)[:, None, None], np.sin(grad_dir)[:, None, None], (0.3 * p[:, 8])[:, None, None]
    grad = (cos * gx + sin * gy) * amp
    clouds = _CLOUD.T @ (p[:, 9:25].reshape(-1, 4, 4) - 0.5) @ _CLOUD * np.float32(0.25)
    toward_mid = np.where(bg.mean(1) > 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
    img = bg[:, None, None, :] + ((grad + clouds) * toward_mid)[..., None]

    # Thin clutter segments in a muted colour.
    for j in range(2):
        q = p[:, 25 + 5 * j : 30 + 5 * j]
        a = q[:, 0:2] * SIZE
        b = a + (q[:, 2:4] - 0.5) * SIZE
        ab = b - a
        t = (_YX[1][None] - a[:, 0, None, None]) * ab[:, 0, None, None]
        t = t + (_YX[0][None] - a[:, 1, None, None]) * ab[:, 1, None, None]
        t = np.clip(t / np.maximum((ab**2).sum(1), 1e-3)[:, None, None], 0.0, 1.0)
        dx = _YX[1][None] - (a[:, 0, None, None] + t * ab[:, 0, None, None])
        dy = _YX[0][None] - (a[:, 1, None, None] + t * ab[:, 1, None, None])
        line = np.clip(1.0 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0) * (q[:, 4] < 0.7)[:, None, None]
        mix = (0.35 * line)[..., None]
        img = img * (1 - mix) + fg[:, None, None, :] * mix

    # The glyph: random scale, position, rotation; anti-aliased edge from the signed distance.
    radius = 7.0 + 6.0 * p[:, 35]
    margin = SIZE / 2 - radius - 1.0
    cx = SIZE / 2 + (2 * p[:, 36] - 1) * np.maximum(margin, 0.0)
    cy = SIZE / 2 + (2 * p[:, 37] - 1) * np.maximum(margin, 0.0)
    theta = p[:, 38] * 2 * np.pi
    period = (2.6 + 1.6 * p[:, 39]) / radius  # stripe period 2.6..4.2 px, in shape units
    alpha = np.empty((count, SIZE, SIZE), dtype=np.float32)
    for cls in range(len(CLASS_NAMES)):
        sel = np.flatnonzero(y == cls)
        if sel.size == 0:
            continue
        r = radius[sel, None, None]
        dx = (_YX[1][None] - cx[sel, None, None]) / r
        dy = (_YX[0][None] - cy[sel, None, None]) / r
        c, s = np.cos(theta[sel])[:, None, None], np.sin(theta[sel])[:, None, None]
        u, v = c * dx + s * dy, -s * dx + c * dy
        sdf = _shape_sdf(cls, u, v, (0.2 + 0.12 * p[sel, 40])[:, None, None])
        cover = np.clip(0.5 - sdf * r, 0.0, 1.0)
        alpha[sel] = cover * _texture(cls, u, v, period[sel, None, None])
    a4 = alpha[..., None]
    img = img * (1 - a4) + fg[:, None, None, :] * a4
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
