"""A labelled 224-px class-folder tree of real photos for `bench_codecs.py --labelled-tree`: the four
CC0 scenes of tests/data/imagenet-photos, taken from scikit-image's full-size originals (a benchmark
import only; the product never needs it), each as 12 views: shorter side scaled to 224 and to 288
px (bilinear), a 224 crop at the start, centre and end of the longer side (on the diagonal for the
square one), and the horizontal flip of each. Saved as PNG, so the only loss is the codec's.

    python scripts/photo_views.py OUT && driftsync corrupt --input OUT --output OUT-c --size 224
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 224
SCALES = (224, 288)  # shorter side before the crop
POSITIONS = {"start": 0.0, "centre": 0.5, "end": 1.0}  # where the crop sits along the free extent
SCENES = {"chelsea": "n02123045", "coffee": "n07920052", "rocket": "n03773504", "camera": "n04485082"}


def views(image: Image.Image) -> dict[str, np.ndarray]:
    """Name -> 224x224 RGB crop, for every scale, position and flip."""
    out = {}
    for short in SCALES:
        width, height = image.size
        scale = short / min(width, height)
        resized = image.convert("RGB").resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
        for name, where in POSITIONS.items():
            left = round((resized.width - SIZE) * where)
            top = round((resized.height - SIZE) * where)
            crop = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)), dtype=np.uint8)
            out[f"s{short}-{name}"] = crop
            out[f"s{short}-{name}-flip"] = crop[:, ::-1]
    return out


def main() -> None:
    import skimage.data

    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    root = Path(sys.argv[1])
    for scene, wnid in SCENES.items():
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for name, pixels in views(Image.fromarray(getattr(skimage.data, scene)())).items():
            Image.fromarray(np.ascontiguousarray(pixels)).save(root / wnid / f"{scene}-{name}.png")


if __name__ == "__main__":
    main()
