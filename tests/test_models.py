"""Embedded dataset, model architectures, the registry, the training cache, and real CIFAR ResNets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from driftsync.data import synthetic
from server.models import embedded
from server.models.cifar_resnet import cifar_resnet
from server.models.registry import (
    InputNormalization,
    LogitEnsemble,
    build_model,
    build_teacher,
    model_info,
    model_names,
    teacher_info,
    untrained_model,
)
from tests.conftest import REPO, SHARED, missing_shared

CIFAR_TEST = SHARED / "data" / "cifar10" / "test.npz"
RESNETS = SHARED / "models" / "cifar10-resnet"


def _accuracy(model: torch.nn.Module, x_uint8_nhwc: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of a wrapped ([0, 1]-input) model."""
    with torch.no_grad():
        x = torch.from_numpy(x_uint8_nhwc).permute(0, 3, 1, 2).float() / 255.0
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(500)]).numpy()
    return float((pred == y).mean())


# --- synthetic dataset -------------------------------------------------------------------------


def test_generate_shapes_and_types() -> None:
    x, y = synthetic.generate(0, 300)
    assert x.shape == (300, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (300,) and y.dtype == np.int64
    assert len(synthetic.CLASS_NAMES) >= 10 and set(np.unique(y)) == set(range(len(synthetic.CLASS_NAMES)))
    assert x.std() > 30  # not blank


def test_generate_slices_are_consistent_and_seeded() -> None:
    x, y = synthetic.generate(0, 600)
    x2, y2 = synthetic.generate(5, 3)
    np.testing.assert_array_equal(x2, x[5:8])
    np.testing.assert_array_equal(y2, y[5:8])
    x3, y3 = synthetic.generate(300, 300)  # crosses the internal chunk boundary at another offset
    np.testing.assert_array_equal(x3, x[300:])
    np.testing.assert_array_equal(y3, y[300:])
    xs, _ = synthetic.generate(0, 600, seed=1)
    assert not np.array_equal(xs, x)
    assert synthetic.generate(0, 0)[0].shape == (0, 32, 32, 3)


def test_generate_labels_balanced() -> None:
    _, y = synthetic.generate(10**6, 3000)
    counts = np.bincount(y, minlength=len(synthetic.CLASS_NAMES))
    assert counts.min() > 0.7 * counts.mean()


def test_synthetic_does_not_import_torch() -> None:
    code = "import sys, driftsync.data.synthetic as s; s.generate(0, 4); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- architectures -------------------------------------------------------------------------------


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_embedded_architectures() -> None:
    student, teacher = embedded.build_embedded("embedded-student"), embedded.build_embedded("embedded-teacher")
    assert 50_000 <= _params(student) <= 300_000
    assert _params(teacher) >= 5 * _params(student)
    for net in (student, teacher):
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(convs) == len(bns) > 0
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, len(synthetic.CLASS_NAMES))


@pytest.mark.parametrize(("name", "params"), [("resnet20", 269_722), ("resnet32", 464_154), ("resnet56", 853_018)])
def test_cifar_resnet_parameter_counts(name: str, params: int) -> None:
    net = cifar_resnet(name)
    assert _params(net) == params
    keys = set(net.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.0.conv2.weight", "layer1.2.bn2.bias", "linear.bias"} <= keys
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# --- registry ------------------------------------------------------------------------------------


def test_registry_names_and_info() -> None:
    assert model_names() == ["embedded-student", "embedded-teacher", "resnet20", "resnet32", "resnet44", "resnet56",
                             "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet-lite0"]
    info = model_info("embedded-student")
    assert info.num_classes == len(info.class_names) == len(synthetic.CLASS_NAMES)
    assert info.input_size == (32, 32) and info.input_shape == (3, 32, 32)
    assert model_info("resnet56:/some/path.th").class_names[0] == "airplane"
    assert model_info("resnet50:/x.pth").input_shape == (3, 224, 224) and model_info("resnet50").num_classes == 1000
    with pytest.raises(ValueError, match="unknown model"):
        model_info("vgg16")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        build_model("resnet20")
    with pytest.raises(ValueError, match="torchvision state dict"):
        build_model("resnet18")


def test_a_teacher_spec_joined_by_plus_is_an_ensemble_averaging_its_members_logits() -> None:
    single = build_teacher("embedded-teacher")
    assert isinstance(single, InputNormalization)
    ensemble = build_teacher("embedded-teacher+embedded-student")
    assert isinstance(ensemble, LogitEnsemble) and not ensemble.training
    assert teacher_info("embedded-teacher+embedded-student") == model_info("embedded-teacher")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = (build_model("embedded-teacher")(x) + build_model("embedded-student")(x)) / 2
        torch.testing.assert_close(ensemble(x), expected)
    with pytest.raises(ValueError, match="must classify the same classes at the same input size"):
        teacher_info("embedded-teacher+resnet20:/some/path.th")  # refused before any checkpoint is read
    with pytest.raises(ValueError, match="unknown model"):
        build_teacher("embedded-teacher+vgg16")


# torchvision's parameter counts and state-dict sizes (torchvision.models docs / len(state_dict()))
@pytest.mark.parametrize("name,params,keys", [("resnet18", 11_689_512, 122), ("resnet50", 25_557_032, 320)])
def test_imagenet_resnets_match_torchvision(tmp_path: Path, name: str, params: int, keys: int) -> None:
    net = untrained_model(name).net
    assert sum(p.numel() for p in net.parameters()) == params and len(net.state_dict()) == keys
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.0.downsample.1.weight", "fc.bias"} \
        <= set(net.state_dict())
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "ckpt.pth")
    loaded = build_model(f"{name}:{tmp_path / 'ckpt.pth'}")  # DataParallel-style keys load too
    torch.testing.assert_close(loaded.net.fc.weight, net.fc.weight)


def test_wrapper_normalises_inside(tmp_path: Path) -> None:
    model = untrained_model("embedded-student")
    assert isinstance(model, InputNormalization) and not model.training
    x = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(embedded.MEAN).view(1, 3, 1, 1), torch.tensor(embedded.STD).view(1, 3, 1, 1)
    expected = model.net((x - mean) / std)
    torch.testing.assert_close(model(x), expected)
    # Loading back a wrapper's own state_dict (e.g. adapted weights) through a spec.
    torch.save(model.state_dict(), tmp_path / "student.pt")
    loaded = build_model(f"embedded-student:{tmp_path / 'student.pt'}")
    torch.testing.assert_close(loaded(x), model(x))


def test_cifar_resnet_checkpoint_roundtrip(tmp_path: Path) -> None:
    """akamaster layout: {"state_dict": {"module.*"}} without num_batches_tracked."""
    net = cifar_resnet("resnet20").eval()
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "best_prec1": 0.0}, tmp_path / "r20.th")
    model = build_model(f"resnet20:{tmp_path / 'r20.th'}")
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), net((x - mean) / std))


# --- training cache --------------------------------------------------------------------------------


def test_augment_is_generic_and_deterministic() -> None:
    x = torch.from_numpy(synthetic.generate(0, 16)[0]).permute(0, 3, 1, 2).contiguous()
    a = embedded.augment(x, torch.Generator().manual_seed(1))
    b = embedded.augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.shape == (16, 3, 32, 32) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_shipped_weights_were_trained_under_the_current_recipe() -> None:
    """A changed recipe or generator needs new shipped weights: python scripts/ship_embedded.py."""
    for name, config in embedded.CONFIGS.items():
        assert embedded.PACKAGED[name].digest == config.digest(), name


def test_shipped_models_load_verified_without_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = synthetic.generate(10**6, 2000)
    monkeypatch.setattr(embedded, "train", lambda *a, **k: pytest.fail("a first run must not train"))
    for name in ("embedded-student", "embedded-teacher"):
        assert embedded.checkpoint(name, tmp_path) == embedded.packaged_path(name)
        model = build_model(name, home=tmp_path)
        assert _accuracy(model, x, y) >= 0.85, name
    assert not (tmp_path / "models").exists()  # nothing written into DRIFTSYNC_HOME


def test_a_shipped_file_that_differs_from_its_recorded_hash_is_refused(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blob = bytearray(embedded.packaged_path("embedded-student").read_bytes())
    blob[-100] ^= 0xFF
    (tmp_path / "embedded-student.pt").write_bytes(bytes(blob))
    monkeypatch.setattr(embedded, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        build_model("embedded-student", home=tmp_path / "home")


def test_retrain_writes_into_home_which_then_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (tiny) training run through retrain(): the copy in DRIFTSYNC_HOME wins over the shipped one."""
    tiny = embedded.TrainConfig(plan=((8, 2, 3),), train_samples=512, epochs=1, batch_size=64)
    monkeypatch.setitem(embedded.CONFIGS, "embedded-student", tiny)
    path = embedded.retrain("embedded-student", tmp_path, log=lambda m: None)
    assert path == embedded.checkpoint_path("embedded-student", tmp_path) and path.parent == tmp_path / "models"
    assert embedded.checkpoint("embedded-student", tmp_path) == path
    net = embedded.load_trained("embedded-student", tmp_path)
    assert net.head.in_features == 8 and not net.training
    assert not list((tmp_path / "models").glob("*.tmp"))


# --- real pretrained CIFAR-10 ResNets (../shared) ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "filename", "expected"),
    [("resnet20", "resnet20-12fca82f.th", 0.915), ("resnet56", "resnet56-4bfd9763.th", 0.926)],
)
def test_real_cifar_resnet_accuracy(name: str, filename: str, expected: float) -> None:
    ckpt = RESNETS / filename
    if reason := missing_shared(f"models/cifar10-resnet/{filename}", "data/cifar10/test.npz"):
        pytest.skip(reason)
    data = np.load(CIFAR_TEST, allow_pickle=False)
    model = build_model(f"{name}:{ckpt}")
    assert abs(_accuracy(model, data["x_exact1000"], data["y_exact1000"]) - expected) <= 0.005
