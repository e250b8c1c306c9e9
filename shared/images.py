"""Image compression for uploads: the device encodes, the server decodes and checks."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from shared.protocol import ImageCodec

JPEG_QUALITY = 90
RESIZE_RATIO = 256 / 224  # ImageNet eval recipe: shorter side 256, centre crop 224
WEBP_QUALITY = 90


class ImageDecodeError(ValueError):
    """Upload bytes that are not an image of the expected shape."""


def encode_image(image: np.ndarray, codec: ImageCodec) -> bytes:
    """Encode one uint8 HxWx3 RGB image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {image.dtype} {image.shape}")
    if codec == "raw":
        return np.ascontiguousarray(image).tobytes()
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if codec == "png":
        pil.save(buf, format="PNG", optimize=False, compress_level=6)
    elif codec == "jpeg":
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif codec == "webp":
        pil.save(buf, format="WEBP", lossless=True, quality=WEBP_QUALITY)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return buf.getvalue()


def decode_image(data: bytes, codec: ImageCodec, shape: tuple[int, int]) -> np.ndarray:
    """Decode and check against the model's input size before trusting the pixels."""
    height, width = shape
    if codec == "raw":
        if len(data) != height * width * 3:
            raise ImageDecodeError(f"raw image has {len(data)} bytes, expected {height * width * 3}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.size != (width, height):
                raise ImageDecodeError(f"image is {pil.size[0]}x{pil.size[1]}, expected {width}x{height}")
            expected_format = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[codec]
            if pil.format != expected_format:
                raise ImageDecodeError(f"image is {pil.format}, the batch says {codec}")
            return np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageDecodeError(f"cannot decode {codec} image: {exc}") from exc


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
