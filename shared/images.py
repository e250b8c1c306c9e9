"""Image compression for uploads: the device encodes, the server decodes and checks."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.protocol import ImageCodec

JPEG_QUALITY = 90
RESIZE_RATIO = 256 / 224  # ImageNet eval recipe: shorter side 256, centre crop 224
WEBP_QUALITY = 90  # lossless WebP: the compression effort, not a fidelity
MIN_UPLOAD_SIDE = 8  # a downscaled upload smaller than this carries nothing to learn from
# "auto": lossless WebP up to AUTO_LOSSLESS_MAX_SIDE px, webp:75 above (BENCHMARKS.md, "Issue 12:
# upload codec" and "Issue 16: what the teacher sees"): at 32 px lossy WebP cost the teacher 10
# points of error on the uploads, for 1.2 kB saved per image; at 224 px it cost no error and saves 26 kB.
DEFAULT_UPLOAD_CODEC = "auto"
AUTO_LOSSLESS_MAX_SIDE = 64
AUTO_QUALITY = 75
UPLOAD_CODECS = f"auto (lossless up to {AUTO_LOSSLESS_MAX_SIDE} px, else webp:{AUTO_QUALITY}), webp-lossless, webp:Q, jpeg:Q (Q 1-100), png or raw"
_SPEC = re.compile(r"(webp|jpeg):(\d{1,3})")
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class ImageDecodeError(ValueError):
    """Upload bytes that are not an image of the expected shape."""


@dataclass(frozen=True)
class UploadEncoding:
    """How a device compresses what it uploads: the wire format, a quality (None: lossless, or
    JPEG's default) and an optional downscale, the uplink's trade of bytes for fidelity. Only the
    format travels: the server decodes any quality and scales a smaller image back up."""

    codec: ImageCodec = "webp"
    quality: int | None = None
    max_side: int | None = None
    lossless_max_side: int | None = None  # images no larger than this go lossless ("auto")

    def __post_init__(self) -> None:
        if self.quality is not None and not (self.codec in ("webp", "jpeg") and 1 <= self.quality <= 100):
            raise ValueError(f"a quality (1-100) applies to webp and jpeg only, not {self.codec}:{self.quality}")
        if self.max_side is not None and self.max_side < MIN_UPLOAD_SIDE:
            raise ValueError(f"upload max side must be at least {MIN_UPLOAD_SIDE} px, got {self.max_side}")
        if self.max_side is not None and self.codec == "raw":
            raise ValueError("raw uploads carry no size, so they cannot be downscaled; choose another codec")

    @classmethod
    def parse(cls, spec: str, max_side: int | None = None) -> UploadEncoding:
        """'auto', 'webp-lossless' (or 'webp'), 'webp:Q', 'jpeg:Q', 'jpeg' (Q 90), 'png', 'raw'."""
        text = spec.strip().lower()
        if text == "auto":
            return cls("webp", AUTO_QUALITY, max_side, AUTO_LOSSLESS_MAX_SIDE)
        if text in ("webp", "webp-lossless"):
            return cls("webp", None, max_side)
        if text in ("png", "jpeg", "raw"):
            return cls(text, None, max_side)  # type: ignore[arg-type]
        match = _SPEC.fullmatch(text)
        if match is None or not 1 <= int(match.group(2)) <= 100:
            raise ValueError(f"upload codec must be {UPLOAD_CODECS}, not {spec!r}")
        return cls(match.group(1), int(match.group(2)), max_side)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        if self.lossless_max_side is not None:
            return "auto" + (f"@{self.max_side}px" if self.max_side is not None else "")
        base = "webp-lossless" if self.codec == "webp" and self.quality is None else self.codec
        base += f":{self.quality}" if self.quality is not None else ""
        return base + (f"@{self.max_side}px" if self.max_side is not None else "")

    def encode(self, image: np.ndarray) -> bytes:
        image = downscale(image, self.max_side)
        small = self.lossless_max_side is not None and max(image.shape[:2]) <= self.lossless_max_side
        return encode_image(image, self.codec, None if small else self.quality)


def downscale(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image with its longer side at most `max_side`, aspect kept (PIL's bilinear filter
    widens with the scale, so it averages rather than aliases)."""
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def encode_image(image: np.ndarray, codec: ImageCodec, quality: int | None = None) -> bytes:
    """Encode one uint8 HxWx3 RGB image; `quality` makes WebP lossy (None: lossless) and sets
    JPEG's (None: 90)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {image.dtype} {image.shape}")
    if codec == "raw":
        return np.ascontiguousarray(image).tobytes()
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if codec == "png":
        pil.save(buf, format="PNG", optimize=False, compress_level=6)
    elif codec == "jpeg":
        pil.save(buf, format="JPEG", quality=quality or JPEG_QUALITY)
    elif codec == "webp" and quality is None:
        pil.save(buf, format="WEBP", lossless=True, quality=WEBP_QUALITY)
    elif codec == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return buf.getvalue()


def decode_image(data: bytes, codec: ImageCodec, shape: tuple[int, int]) -> np.ndarray:
    """Decode and check against the model's input size before trusting the pixels: the header's
    size must be the model's, or a downscale of it (same aspect, each side at least
    MIN_UPLOAD_SIDE), which is scaled back up (bilinear) so the server learns at the model's size.
    Nothing larger than the model's input is ever decompressed."""
    height, width = shape
    if codec == "raw":
        if len(data) != height * width * 3:
            raise ImageDecodeError(f"raw image has {len(data)} bytes, expected {height * width * 3}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    if codec not in _FORMATS:
        raise ImageDecodeError(f"unknown codec {codec!r}")
    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.format != _FORMATS[codec]:
                raise ImageDecodeError(f"image is {pil.format}, the batch says {codec}")
            _check_size(pil.size, width, height)
            pixels = pil.convert("RGB")
            if pixels.size != (width, height):
                pixels = pixels.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(pixels, dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageDecodeError(f"cannot decode {codec} image: {exc}") from exc


def _check_size(size: tuple[int, int], width: int, height: int) -> None:
    w, h = size
    if (w, h) == (width, height):
        return
    same_aspect = abs(w * height - h * width) <= max(width, height)  # within a pixel of rounding
    if not (MIN_UPLOAD_SIDE <= w <= width and MIN_UPLOAD_SIDE <= h <= height and same_aspect):
        raise ImageDecodeError(f"image is {w}x{h}, expected {width}x{height} or a downscale of it "
                               f"(same aspect, sides at least {MIN_UPLOAD_SIDE})")


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 HxWx3 at ``size`` x ``size``: untouched when already that size, else
    shorter side to round(size * 256/224) (bilinear) then a centre crop, as torchvision's
    Resize + CenterCrop."""
    image = image.convert("RGB")
    if image.size != (size, size):
        width, height = image.size
        short = round(size * RESIZE_RATIO)
        if width <= height:
            new = (short, int(short * height / width))
        else:
            new = (int(short * width / height), short)
        image = image.resize(new, Image.Resampling.BILINEAR)
        left = round((new[0] - size) / 2.0)
        top = round((new[1] - size) / 2.0)
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)
