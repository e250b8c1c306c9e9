"""One labelling rule for every dataset kind: an image's label is the index, in the model's class
order, of the class its folder names.

The model's class order is `--class-index FILE` when given, else the model's own class list
(ImageNet models: the 1000 wnids in torchvision's order; CIFAR-10 models: the ten class names).
Sorting the folders on disk is never the rule: with a subset of classes it shifts every label.
Files with integer labels (CIFAR-10 npz, CIFAR-10-C npy) carry them in the model's order already.
No torch: edge devices import this.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

_SHOWN = 3  # unmapped folders named in an error


def read_class_index(path: Path) -> list[str]:
    """Classes in the model's order, one a line; the first word counts, so "n01440764 tench" works."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--class-index {path}: cannot read it ({exc})") from None
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"--class-index {path} is empty; give one class (e.g. a wnid) per line, in the model's order")
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]
    if repeated:
        raise ValueError(f"--class-index {path} lists {repeated[0]!r} twice")
    return names


def class_order(model_classes: Sequence[str], class_index: Path | None) -> list[str]:
    """The names of the model's outputs, in order: the --class-index file, else the model's own list."""
    if class_index is None:
        return list(model_classes)
    names = read_class_index(class_index)
    if len(names) != len(model_classes):
        raise ValueError(f"--class-index {class_index} lists {len(names)} classes but the model has "
                         f"{len(model_classes)}")
    return names


def folder_labels(folders: Sequence[str], classes: Sequence[str], where: Path | str) -> dict[str, int]:
    """Each class folder's label; a folder that names none of the model's classes is an error, not a guess."""
    index = {name: i for i, name in enumerate(classes)}
    unmapped = [f for f in folders if f not in index]
    if unmapped:
        more = f" and {len(unmapped) - _SHOWN} more" if len(unmapped) > _SHOWN else ""
        raise ValueError(
            f"{len(unmapped)} of {len(folders)} class folders in {where} are not classes of the model "
            f"({', '.join(unmapped[:_SHOWN])}{more}; the model's are like {', '.join(classes[:_SHOWN])}): "
            "name the folders by the model's classes, or give --class-index FILE (one class per line, in the model's order)")
    return {f: index[f] for f in folders}


def check_labels(labels: np.ndarray, num_classes: int, where: Path | str) -> np.ndarray:
    """Integer labels from a file must index the model's classes."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels in {where} run from {labels.min()} to {labels.max()} but the model has "
                         f"{num_classes} classes (0..{num_classes - 1})")
    return labels
