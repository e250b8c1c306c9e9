"""`driftsync replay`: every method on one identical stream, through the real server and devices
for the collaborative ones; each dataset format and setting on small fixtures in the real layout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from driftsync.data import streams, synthetic
from driftsync.replay import ReplayOptions, run
from driftsync.report import REPORT_KEYS
from server.models.registry import untrained_model
from tests.conftest import SHARED, missing_shared

CIFAR_NPZ = SHARED / "data" / "cifar10" / "test.npz"
RESNET20 = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
_MISSING = missing_shared("data/cifar10/test.npz", "models/cifar10-resnet/resnet20-12fca82f.th")
needs_assets = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def embedded_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    return streams.embedded_base(count, offset=5000)


def test_replay_runs_every_method_on_one_stream(tmp_path: Path) -> None:
    methods = ("source", "bn", "tent", "eata", "cotta", "cema")
    report = run(ReplayOptions(methods=methods, corruptions="fog,contrast", samples_per_domain=48, batch_size=16,
                               devices=2, out=tmp_path, torch_threads=1))
    assert set(REPORT_KEYS) <= set(report)
    assert report["method"] == "source"  # the demo's keys describe the first method
    by_name = {m["method"]: m for m in report["methods"]}
    assert list(by_name) == list(methods)
    for m in by_name.values():
        assert set(REPORT_KEYS) <= set(m)
        assert [d["name"] for d in m["domains"]] == ["fog", "contrast"]
        devices = 2 if m["where"] == "collaborative" else 1  # each device replays the identical stream
        assert m["devices"] == devices and [d["samples"] for d in m["domains"]] == [48 * devices, 48 * devices]
        assert m["mean_error_source"] == by_name["source"]["mean_error"]  # ORT and torch agree on source
    cema = by_name["cema"]
    assert cema["where"] == "collaborative" and cema["deltas_applied"] > 0 and cema["downlink_bytes"] > 0
    assert 0 < cema["upload_ratio"] < 1 and cema["uplink_bytes_per_sample"] > 0
    assert cema["freshness_p50_s"] is not None and cema["freshness_p95_s"] >= cema["freshness_p50_s"]
    assert cema["backward_passes_per_sample"] == 0 and cema["forward_passes_per_sample"] >= 1
    assert by_name["tent"]["backward_passes_per_sample"] == 1
    assert by_name["cotta"]["forward_passes_per_sample"] >= 3
    for name in ("source", "bn", "tent", "eata", "cotta"):
        assert by_name[name]["upload_ratio"] == 0 and by_name[name]["deltas_applied"] == 0
    assert by_name["bn"]["mean_error"] < by_name["source"]["mean_error"]  # renormalising helps on these shifts
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [m["method"] for m in saved["methods"]] == list(methods)
    md = (tmp_path / "report.md").read_text()
    assert "| cema | collaborative |" in md and "| tent | on-device |" in md
    assert Image.open(tmp_path / "report.png").size[0] == 1100


@pytest.mark.parametrize("prompt", ["lowres:8", "padding:2"])
def test_replay_prompt_methods(tmp_path: Path, prompt: str) -> None:
    report = run(ReplayOptions(methods=("prompt", "cema+prompt"), corruptions="contrast", samples_per_domain=64,
                               batch_size=16, prompt=prompt, out=tmp_path, torch_threads=1))
    expected = 4 * 3 * 8 * 8 if prompt == "lowres:8" else 4 * 3 * (2 * 2 * 32 + 2 * 2 * 28)
    for m in report["methods"]:
        assert m["where"] == "collaborative" and m["deltas_applied"] > 0 and m["prompt_bytes"] == expected
    prompt_only, joint = report["methods"]
    assert prompt_only["downlink_bytes"] / prompt_only["deltas_applied"] < joint["downlink_bytes"] / joint["deltas_applied"]


@pytest.mark.parametrize("method", ["cema", "cema-race"])
def test_replay_conv_method_ships_the_convolutions_through_the_real_loop(tmp_path: Path, method: str) -> None:
    """cema (--learn auto: norm+conv for this student): the server learns every convolution's
    weight and the batch-statistics devices (the replay default) install them, over real HTTP and
    onnxruntime; each delta carries them, in float16. cema-race trains them too, as its rival
    track, but while the devices run the affine track (all of this short run) its deltas leave
    the convolutions, at their source values, off the wire."""
    from server.models.registry import build_model
    from server.norm import (
        conv_weights,
        for_the_wire,
        learn_conv_weights,
        replaceable_state,
    )

    report = run(ReplayOptions(methods=(method,), corruptions="contrast", samples_per_domain=64,
                               batch_size=16, out=tmp_path, torch_threads=1))
    [conv] = report["methods"]
    student = learn_conv_weights(build_model("embedded-student"))
    conv_bytes = sum(p.numel() * 2 for p in conv_weights(student).values())  # float16 on the wire
    learnt = {k: v for k, v in replaceable_state(student).items() if not k.endswith(("_mean", "_var"))}
    learnt_bytes = sum(v.nbytes for v in for_the_wire(learnt, student).values())
    assert conv["where"] == "collaborative" and conv["deltas_applied"] > 0
    assert conv_bytes > learnt_bytes / 2  # most of it is the convolutions
    per_delta = conv["downlink_bytes"] / conv["deltas_applied"]
    if method == "cema":
        assert learnt_bytes < per_delta < learnt_bytes + 64 * 1024  # + the envelope
    else:
        assert per_delta < learnt_bytes - conv_bytes + 64 * 1024
    assert conv["forward_passes_per_sample"] == 1.0 and conv["backward_passes_per_sample"] == 0.0


def test_an_ensemble_teacher_labels_and_adapts_through_the_real_loop(tmp_path: Path) -> None:
    teacher = "embedded-teacher+embedded-student"
    report = run(ReplayOptions(methods=("cema",), corruptions="fog", samples_per_domain=48, batch_size=16,
                               teacher=teacher, out=tmp_path, torch_threads=1))
    [cema] = report["methods"]
    assert cema["teacher"] == teacher and cema["deltas_applied"] > 0
    assert cema["uploads_joined"] > 0 and cema["error_teacher_on_uploads"] is not None  # its labels were logged


def test_replay_uncertainty_guided_sampling(tmp_path: Path) -> None:
    report = run(ReplayOptions(methods=("cema@ugs", "prompt@ugs"), corruptions="fog", samples_per_domain=64,
                               batch_size=16, out=tmp_path, torch_threads=1))
    for m in report["methods"]:
        assert 0.1 <= m["upload_ratio"] <= 0.2  # the most uncertain, within the device's default 20% budget
        assert m["forward_passes_per_sample"] == 5.0  # the frame and 4 cheap views
        assert m["deltas_applied"] > 0


@pytest.mark.parametrize("setting", streams.SETTINGS)
def test_replay_settings(tmp_path: Path, setting: str) -> None:
    report = run(ReplayOptions(methods=("bn",), setting=setting, corruptions="fog,contrast", severity=3,
                               samples_per_domain=32, batch_size=16, out=tmp_path, torch_threads=1))
    names = [d["name"] for d in report["domains"]]
    chunks = list(streams.read_stream(tmp_path / "stream"))
    if setting == "gradual":
        assert names == [f"{c}@{s}" for c in ("fog", "contrast") for s in (1, 2, 3)]  # the way down merges
        assert report["samples"] == 32 * 10
    else:
        assert sorted(names) == ["contrast", "fog"] and report["samples"] == 64
    assert sum(c.reset for c in chunks) == (2 if setting == "reset_each_shift" else 0)
    if setting == "mixed":
        assert all(c.sample_domains is not None for c in chunks)
        assert len(set(chunks[0].sample_domains)) == 2
    if setting in ("continual", "correlated"):
        first_domain = np.concatenate([c.labels for c in chunks[:2]])
        base = streams.embedded_base(32)[1]
        np.testing.assert_array_equal(np.sort(first_domain), np.sort(base))
        assert (first_domain == base).all() == (setting == "continual")  # correlated reorders into bursts


def test_replay_npz_clean_and_on_the_fly_corruption(tmp_path: Path) -> None:
    x, y = embedded_images(40)
    np.savez(tmp_path / "base.npz", x=x, y=y, x_small=x[:8], y_small=y[:8])
    clean = run(ReplayOptions(dataset="cifar10", data=tmp_path / "base.npz", corruptions="none", methods=("source",),
                              samples_per_domain=None, batch_size=10, out=tmp_path / "clean"))
    assert [d["name"] for d in clean["domains"]] == ["clean"] and clean["samples"] == 40
    assert clean["mean_error"] < 10  # the embedded student on its own clean images
    small = run(ReplayOptions(dataset="cifar10", data=tmp_path / "base.npz", data_key="x_small", corruptions="fog",
                              methods=("source",), samples_per_domain=None, batch_size=4, out=tmp_path / "small"))
    assert small["samples"] == 8 and small["corruption_constants"] == "cifar10"


def test_replay_eata_roid_sar_on_one_stream(tmp_path: Path) -> None:
    methods = ("bn", "eata", "roid", "sar")
    report = run(ReplayOptions(methods=methods, corruptions="fog,contrast", samples_per_domain=32, batch_size=16,
                               out=tmp_path, torch_threads=1))
    by_name = {m["method"]: m for m in json.loads((tmp_path / "report.json").read_text())["methods"]}
    assert list(by_name) == list(methods) == [m["method"] for m in report["methods"]]
    eata = by_name["eata"]["settings"]
    assert eata["preset"] == "cifar" and eata["d_margin"] == 0.4 and eata["fisher_alpha"] == 1.0
    assert eata["fisher_images"] == 32  # the embedded stream's clean base images
    for name in ("eata", "roid", "sar"):
        assert by_name[name]["where"] == "on-device" and by_name[name]["backward_passes_per_sample"] > 0, name
    assert by_name["roid"]["forward_passes_per_sample"] > 1 and 1 < by_name["sar"]["forward_passes_per_sample"] <= 2
    assert by_name["roid"]["mean_error"] < by_name["roid"]["mean_error_source"]


def test_replay_cifar10c_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    x, y = embedded_images(20)
    for name in ("fog", "contrast"):  # five severity blocks, as released; severity 5 is the last
        blocks = [np.zeros_like(x)] * 4 + [streams.corrupted(x, streams.Domain(name, 5), 0)]
        np.save(root / f"{name}.npy", np.concatenate(blocks))
    np.save(root / "labels.npy", np.tile(y, 5).astype(np.uint8))
    report = run(ReplayOptions(dataset="cifar10-c", data=root, corruptions="fog,contrast",
                               methods=("source", "bn", "eata"), samples_per_domain=None, batch_size=10,
                               out=tmp_path / "out"))
    eata = report["methods"][2]
    assert eata["method"] == "eata" and eata["settings"]["fisher_images"] == 0  # no clean split: no Fisher term
    assert "no Fisher regulariser" in caplog.text
    assert [d["name"] for d in report["domains"]] == ["fog", "contrast"] and report["samples"] == 40
    assert report["corruption_constants"].startswith("as released")
    chunk = next(streams.read_stream(tmp_path / "out" / "stream"))
    np.testing.assert_array_equal(chunk.images, streams.corrupted(x, streams.Domain("fog", 5), 0)[:10])
    with pytest.raises(ValueError, match="corrupted already"):
        run(ReplayOptions(dataset="cifar10-c", data=root, corruptions="none", methods=("source",), out=tmp_path / "x"))


def test_replay_imagenet_c_tree_with_a_torchvision_state_dict(tmp_path: Path) -> None:
    root = tmp_path / "ImageNet-C"
    wnids = [f"n{i:08d}" for i in range(3)]
    for corruption in ("fog", "contrast"):
        for c, wnid in enumerate(wnids):
            folder = root / corruption / "5" / wnid
            folder.mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (256, 256), (40 * c + k, 90, 120)).save(folder / f"ILSVRC2012_val_{c}{k:07d}.JPEG")
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(untrained_model("resnet18").net.state_dict(), checkpoint)  # torchvision's key names
    (tmp_path / "classes.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids + [f"m{i:08d}" for i in range(997)])))
    opts = dict(dataset="imagenet-c", data=root, corruptions="fog,contrast", methods=("source",),
                student=f"resnet18:{checkpoint}", teacher=f"resnet18:{checkpoint}", samples_per_domain=None,
                batch_size=4, torch_threads=1)
    with pytest.raises(ValueError, match="--class-index"):  # 3 folders cannot be a 1000-class index
        run(ReplayOptions(out=tmp_path / "refused", **opts))
    report = run(ReplayOptions(out=tmp_path / "out", class_index=tmp_path / "classes.txt", **opts))
    assert report["samples"] == 12 and [d["name"] for d in report["domains"]] == ["fog", "contrast"]
    chunk = next(streams.read_stream(tmp_path / "out" / "stream"))
    assert chunk.images.shape[1:] == (224, 224, 3) and set(chunk.labels.tolist()) <= {0, 1, 2}


def test_replay_class_folder(tmp_path: Path) -> None:
    x, y = embedded_images(24)
    for i, (image, label) in enumerate(zip(x, y)):
        folder = tmp_path / "photos" / synthetic.CLASS_NAMES[label]  # folders name the model's classes
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    report = run(ReplayOptions(dataset="folder", data=tmp_path / "photos", corruptions="fog", methods=("source",),
                               samples_per_domain=None, batch_size=8, out=tmp_path / "out"))
    assert report["samples"] == 24 and report["corruption_constants"] == "cifar10"
    labels = np.concatenate([c.labels for c in streams.read_stream(tmp_path / "out" / "stream")])
    np.testing.assert_array_equal(np.sort(labels), np.sort(y))  # the model's class indices, not sorted-folder ones


def test_replay_refuses_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --data"):
        ReplayOptions(dataset="cifar10")
    with pytest.raises(ValueError, match="unknown methods"):
        ReplayOptions(methods=("rmt",))
    big = np.zeros((4, 48, 48, 3), np.uint8)
    np.savez(tmp_path / "big.npz", x=big, y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="takes 32x32"):
        run(ReplayOptions(dataset="cifar10", data=tmp_path / "big.npz", methods=("source",), out=tmp_path / "o"))
    result = subprocess.run([sys.executable, "-m", "driftsync", "replay", "--dataset", "imagenet-c"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "needs --data" in result.stderr


@needs_assets
def test_replay_resnet20_clean_error_on_the_exact_1000(tmp_path: Path) -> None:
    """Loader, model and preprocessing: ResNet-20's published clean error is 8.5% (+-0.5)."""
    report = run(ReplayOptions(dataset="cifar10", data=CIFAR_NPZ, data_key="x_exact1000", corruptions="none",
                               methods=("source",), student=f"resnet20:{RESNET20}", teacher=f"resnet20:{RESNET20}",
                               samples_per_domain=None, batch_size=200, out=tmp_path))
    assert report["samples"] == 1000
    assert 8.0 <= report["mean_error"] <= 9.0


@needs_assets
def test_replay_cema_with_resnet20_student_and_resnet56_teacher(tmp_path: Path) -> None:
    """The real pair through the real system, on a short CIFAR-10 stream."""
    teacher = RESNET20.parent / "resnet56-4bfd9763.th"
    report = run(ReplayOptions(dataset="cifar10", data=CIFAR_NPZ, data_key="x_exact1000", corruptions="fog,contrast",
                               methods=("cema", "bn"), student=f"resnet20:{RESNET20}", teacher=f"resnet56:{teacher}",
                               samples_per_domain=200, batch_size=100, out=tmp_path,
                               device_args=("--e-min-factor", "0.02", "--entropy-ema", "none")))
    cema, bn = report["methods"]
    assert cema["method"] == "cema" and cema["deltas_applied"] > 0 and 0 < cema["upload_ratio"] <= 0.5
    assert cema["mean_error"] < cema["mean_error_source"] - 10  # contrast alone is 73% wrong at the source
    assert abs(cema["mean_error"] - bn["mean_error"]) < 8  # same normalization; the deltas only refine it


def test_replay_reports_the_teachers_error_next_to_the_devices_on_the_same_uploads(tmp_path: Path) -> None:
    run(ReplayOptions(methods=("bn", "cema"), corruptions="fog,contrast", samples_per_domain=64, batch_size=32,
                      out=tmp_path, torch_threads=1))
    by_name = {m["method"]: m for m in json.loads((tmp_path / "report.json").read_text())["methods"]}
    cema, bn = by_name["cema"], by_name["bn"]
    log = tmp_path / "runs" / "cema" / "server-state" / "teacher-log.jsonl"
    stepped = sum(len(json.loads(line)["captured_at"]) for line in log.read_text().splitlines())
    assert cema["uploads_joined"] == stepped > 0  # every sample the server stepped on, joined to its label
    assert sum(d["uploads_joined"] for d in cema["domains"]) == stepped
    scored = [d for d in cema["domains"] if d["uploads_joined"]]
    pairs = [(d["error_teacher_on_uploads"], d["error_device_on_uploads"]) for d in scored]
    pairs.append((cema["error_teacher_on_uploads"], cema["error_device_on_uploads"]))
    assert all(0 <= value <= 100 for pair in pairs for value in pair)
    assert any(teacher != device for teacher, device in pairs)  # the distillation gap, visible
    assert bn["uploads_joined"] is None and bn["error_teacher_on_uploads"] is None  # no teacher on the device
    md = (tmp_path / "report.md").read_text()
    assert "| method | mean | teacher error on uploads | device error on uploads |" in md
    assert f"| bn | **{bn['mean_error']:.1f}** | - | - |" in md
    assert f"| cema | {stepped} |" in md  # the per-domain teacher / device table
