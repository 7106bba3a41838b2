"""Seed-addressed image augmentation, part of an episode: a function of the episode id only.

The recipes of the papers distort training images: MetaOptNet crops miniImageNet
at random after zero padding, flips it horizontally and jitters its colours;
Siamese nets on Omniglot use small random affine maps (rotation, shear, scale,
translation). Here each is a knob of ``Augment``, applied in a fixed order
(affine, crop, flip, colour jitter) to float32 images in [0, 1], [n, C, H, W].

Randomness comes from the episode's own augmentation generator
(``episode_rng(..., stream=AUGMENT)``), never a global one, and it is drawn
first (``draw``) and applied after (``apply``), so a batch of episodes is
augmented in one vectorized pass while each image's result depends only on its
own draws: an episode is the same bytes alone, in a batch, in any process.
Everything per pixel is IEEE arithmetic (no BLAS, no multi-axis reductions), so
thread counts do not change a bit; the few transcendental values (one rotation
per image) come from Python's ``math``, the same on every machine.

Each op follows its torchvision namesake where one exists: ``crop_padding``
is ``RandomCrop(size, padding)`` (zero fill, offsets in [0, 2p]); ``jitter``
is ``ColorJitter(brightness, contrast, saturation)`` with the factors drawn in
[1 - v, 1 + v], applied in that fixed order rather than a random one;
``affine`` is ``RandomAffine(degrees, translate, scale, shear)`` about the
image centre with bilinear sampling and zero fill, its translation not rounded
to whole pixels.

>>> aug = Augment(crop_padding=4, flip=True, jitter=Jitter(0.4, 0.4, 0.4))
>>> out = aug(images, episode_rng(seed, step, index, stream=AUGMENT))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (np.float32(0.299), np.float32(0.587), np.float32(0.114))


@dataclass(frozen=True)
class Jitter:
    """Colour jitter strengths: each factor is drawn in [max(0, 1 - v), 1 + v]; 0 leaves that property alone."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0


@dataclass(frozen=True)
class Affine:
    """Random affine map about the centre: rotation in [-degrees, degrees], x-shear in [-shear, shear] degrees,
    scale in [scale[0], scale[1]], translation up to ``translate`` of the width/height each way."""

    degrees: float = 0.0
    shear: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0


@dataclass(frozen=True)
class Augment:
    """Which distortions to apply; ``draw`` then ``apply`` (or call it) on float32 [n, C, H, W] in [0, 1]."""

    crop_padding: int = 0
    flip: bool = False
    jitter: Jitter | None = None
    affine: Affine | None = None

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.flip or self.jitter or self.affine)

    def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """The random parameters of ``n`` images, in a fixed order from ``rng``."""
        d: dict[str, np.ndarray] = {}
        if self.affine is not None:
            a = self.affine
            d["angle"] = rng.uniform(-a.degrees, a.degrees, n)
            d["shear"] = rng.uniform(-a.shear, a.shear, n)
            d["scale"] = rng.uniform(a.scale[0], a.scale[1], n)
            d["shift"] = rng.uniform(-a.translate, a.translate, (n, 2))
        if self.crop_padding:
            d["offset"] = rng.integers(0, 2 * self.crop_padding + 1, (n, 2))
        if self.flip:
            d["flip"] = rng.random(n) < 0.5
        if self.jitter is not None:
            for name in ("brightness", "contrast", "saturation"):
                v = getattr(self.jitter, name)
                d[name] = rng.uniform(max(0.0, 1.0 - v), 1.0 + v, n).astype(np.float32)
        return d

    def apply(self, images: np.ndarray, d: dict[str, np.ndarray]) -> np.ndarray:
        """``images`` distorted by the draws ``d`` (one row per image); a new array, ``images`` is untouched."""
        x = images
        if "angle" in d:
            x = _affine(x, d["angle"], d["shear"], d["scale"], d["shift"])
        if "offset" in d:
            x = _crop(x, self.crop_padding, d["offset"])
        if "flip" in d:
            x = _flip(x, d["flip"])
        if "brightness" in d:
            x = _jitter(x, d["brightness"], d["contrast"], d["saturation"])
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(images, self.draw(rng, len(images)))


def concat_draws(draws: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The draws of several groups of images as one, in order (for one vectorized ``apply``)."""
    return {k: np.concatenate([d[k] for d in draws]) for k in draws[0]} if draws else {}


def _crop(x: np.ndarray, padding: int, offset: np.ndarray) -> np.ndarray:
    """RandomCrop(size, padding): the [H, W] window at ``offset`` (row, column) of the zero-padded image.

    That is the image shifted by ``padding - offset`` with zeros shifted in: one block copy per image. (A
    vectorized gather pays an index per pixel and measured 6x slower than this loop at 84x84.)
    """
    _, _, h, w = x.shape
    out = np.zeros_like(x)
    for i, (r, c) in enumerate((offset - padding).tolist()):
        out[i, :, max(0, -r):h - max(0, r), max(0, -c):w - max(0, c)] = \
            x[i, :, max(0, r):h + min(0, r), max(0, c):w + min(0, c)]
    return out


def _flip(x: np.ndarray, flip: np.ndarray) -> np.ndarray:
    out = np.array(x)
    out[flip] = x[flip][..., ::-1]
    return out


def _jitter(x: np.ndarray, brightness: np.ndarray, contrast: np.ndarray, saturation: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation (torchvision's blends, clipped to [0, 1] after each), in place on a copy."""
    n, c = x.shape[:2]
    f = (slice(None), None, None, None)
    x = x * brightness[f]
    np.clip(x, 0, 1, out=x)
    # A per-image mean over one contiguous row: the same sum order whatever the batch, so batching never changes a bit.
    mean = _gray(x).reshape(n, -1).mean(axis=1, dtype=np.float32)
    _blend(x, contrast, mean[f])
    if c == 3:
        _blend(x, saturation, _gray(x))
    return x


def _blend(x: np.ndarray, ratio: np.ndarray, other: np.ndarray) -> None:
    """x <- clip(ratio x + (1 - ratio) other, 0, 1), in place; ``ratio`` per image."""
    r = ratio[:, None, None, None]
    x *= r
    x += (1 - r) * other
    np.clip(x, 0, 1, out=x)


def _gray(x: np.ndarray) -> np.ndarray:
    if x.shape[1] == 1:
        return np.ascontiguousarray(x)
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def _affine(x: np.ndarray, angle: np.ndarray, shear: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Each image mapped by translate(shift) . rotate(angle) . shear_x(shear) . scale, about its centre.

    Output pixel p takes the input at A^-1 (p - c - t) + c, A = R Sh S, bilinear, zero outside. The source
    coordinates are affine in the output's row and column, so each is the sum of a per-row and a per-column
    term (one full-size pass); a 2-pixel zero border lets every neighbour be read without masks.
    """
    n, c, h, w = x.shape
    # Per image, A^-1 in float64 from math's cos/sin/tan (the same on every machine), then float32 per pixel.
    inv = np.empty((n, 4))
    for i, (a, s, k) in enumerate(zip(np.radians(angle).tolist(), np.radians(shear).tolist(), scale.tolist())):
        cos, sin, tan = math.cos(a), math.sin(a), math.tan(s)
        a11, a12, a21, a22 = k * cos, k * (cos * tan - sin), k * sin, k * (sin * tan + cos)
        det = a11 * a22 - a12 * a21
        inv[i] = (a22 / det, -a12 / det, -a21 / det, a11 / det)
    inv = inv.astype(np.float32)
    cy, cx = np.float32((h - 1) / 2), np.float32((w - 1) / 2)
    u = np.arange(w, dtype=np.float32) - cx - (shift[:, 0] * w).astype(np.float32)[:, None]  # [n, W]
    v = np.arange(h, dtype=np.float32) - cy - (shift[:, 1] * h).astype(np.float32)[:, None]  # [n, H]
    col = (inv[:, 0, None] * u)[:, None, :] + (inv[:, 1, None] * v + cx)[:, :, None]  # [n, H, W]
    row = (inv[:, 2, None] * u)[:, None, :] + (inv[:, 3, None] * v + cy)[:, :, None]
    c0, r0 = np.floor(col), np.floor(row)
    wc, wr = col - c0, row - r0
    pw, plane = w + 4, (h + 4) * (w + 4)
    padded = np.zeros((n, c, h + 4, pw), np.float32)
    padded[:, :, 2:h + 2, 2:w + 2] = x
    flat = padded.reshape(-1)
    # Clipped to [-2, h] x [-2, w], a neighbour far outside still lands in the zero border.
    at = ((np.clip(r0, -2, h).astype(np.intp) + 2) * pw + np.clip(c0, -2, w).astype(np.intp) + 2
          + (np.arange(n, dtype=np.intp) * (c * plane))[:, None, None])
    out = np.empty_like(x)
    for ch in range(c):
        i = at + ch * plane if ch else at
        p00, p01, p10, p11 = flat[i], flat[i + 1], flat[i + pw], flat[i + pw + 1]
        top = p00 + wc * (p01 - p00)
        bottom = p10 + wc * (p11 - p10)
        out[:, ch] = top + wr * (bottom - top)
    return out
