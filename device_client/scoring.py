"""Forward-only uncertainty scores: the device's only signal about drift."""
from __future__ import annotations

import numpy as np


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1]; normalisation lives inside the graph."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 NxHxWx3 images, got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)


def cheap_views(images: np.ndarray, views: int) -> np.ndarray:
    """`views` deterministic cheap augmentations of uint8 NHWC images, stacked view-major
    (views * N, H, W, 3): horizontal flip and 2-pixel shifts with edge padding. No resampling,
    so a weak device pays only the extra forward passes."""
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    shifts = [(0, 0, True), (2, 0, False), (0, 2, False), (-2, 0, True), (0, -2, True), (2, 2, False), (-2, -2, False)]
    out = []
    for dy, dx, flip in shifts[:views]:
        view = padded[:, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]
        out.append(view[:, :, ::-1] if flip else view)
    return np.concatenate(out)


def view_variance(view_probs: np.ndarray) -> np.ndarray:
    """ViDA's uncertainty: variance of the class probabilities over views, summed over classes.
    view_probs is (views, N, C); the result is (N,)."""
    return view_probs.var(axis=0).sum(axis=1)
