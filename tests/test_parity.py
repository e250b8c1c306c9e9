"""The device's onnxruntime output equals the server's torch output, for any norm values."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from device_client.fused import SwappableModel
from device_client.runtime import split_norm_file
from server.export import export_student
from server.models import embedded
from server.models.cifar_resnet import cifar_resnet
from server.models.registry import IMAGENET_MEAN, IMAGENET_STD, InputNormalization
from server.norm import (
    conv_weights,
    learn_conv_weights,
    load_replaceable_state,
    norm_layers,
    replaceable_state,
)
from server.prompt import InputPrompt, PromptedModel


def _random_norm(model: torch.nn.Module, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    convs = conv_weights(model)
    for name, value in replaceable_state(model).items():
        if name in convs:  # learnt convolution weights: moved, within their scale
            out[name] = (value * rng.uniform(0.5, 1.5, value.shape)).astype(np.float32)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.2, 3.0, value.shape).astype(np.float32)
        else:
            out[name] = rng.normal(0.0, 1.0, value.shape).astype(np.float32)
    return out


ARCHITECTURES = {
    "embedded-student": lambda: InputNormalization(embedded.build_embedded("embedded-student"), embedded.MEAN, embedded.STD),
    "resnet20": lambda: InputNormalization(cifar_resnet("resnet20"), IMAGENET_MEAN, IMAGENET_STD),
    # prompted students: the prompt is one more replaceable tensor set, in the same graph and deltas
    "embedded-student+padding:4": lambda: PromptedModel(ARCHITECTURES["embedded-student"](), InputPrompt("padding", 4, (32, 32))),
    "resnet20+lowres:8": lambda: PromptedModel(ARCHITECTURES["resnet20"](), InputPrompt("lowres", 8, (32, 32))),
    # students that learn their convolution weights too: initializers in both graphs, in every delta
    "embedded-student+conv": lambda: learn_conv_weights(ARCHITECTURES["embedded-student"]()),
    "resnet20+conv": lambda: learn_conv_weights(ARCHITECTURES["resnet20"]()),
}


FOLDS_NOT = {"resnet20+lowres:8"}  # onnxruntime folds the prompt's upsampling into a constant: not a reordering


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_ort_matches_torch_for_random_norm_parameters(arch, tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = ARCHITECTURES[arch]().eval()
    load_replaceable_state(model, _random_norm(model, rng))  # the shipped values are random too
    artifact = export_student(model, (3, 32, 32))
    x = rng.random((8, 3, 32, 32), dtype=np.float32)

    # 1. the files as shipped, loaded by plain onnxruntime from disk
    (tmp_path / "student.onnx").write_bytes(artifact.onnx)
    (tmp_path / "student.norm.bin").write_bytes(artifact.norm)
    session = ort.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {"input": x})[0] - expected).max() <= 1e-4

    # 2. the device's runtime after a delta with fresh random values: folded into the optimised
    # session in place, or (a student that cannot be) a session built per version
    device = SwappableModel(artifact.onnx, split_norm_file(artifact.norm, artifact.parameters), version=0)
    assert (device.folded is None) == (arch in FOLDS_NOT)
    for version in (1, 2):
        new = _random_norm(model, rng)
        assert device.install(new, version)
        load_replaceable_state(model, new)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        logits, used = device.run(x)
        assert used == version
        assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_statistics_graph_is_torch_train_mode_batchnorm(arch):
    """Logits and per-layer statistics match torch with BN normalising by the batch's statistics."""
    from device_client.statistics import StatisticsProbe, fold_batch_statistics

    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    model = ARCHITECTURES[arch]().eval()
    params = _random_norm(model, rng)
    load_replaceable_state(model, params)
    artifact = export_student(model, (3, 32, 32))
    seen: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.register_forward_hook(lambda mod, inputs, out, name=name: seen.__setitem__(name, inputs[0]))
    x = rng.random((8, 3, 32, 32), dtype=np.float32)
    for layer in norm_layers(model).values():
        layer.train()
        layer.track_running_stats = False  # normalise with batch statistics, leave the running ones
    with torch.no_grad():
        expected_logits = model(torch.from_numpy(x)).numpy()
    logits, measured = StatisticsProbe(artifact.stats_onnx, params=params).run(x, params)
    assert np.abs(logits - expected_logits).max() <= 1e-3
    assert len(measured) == 2 * len(seen)
    for name, value in seen.items():
        np.testing.assert_allclose(measured[f"{name}.batch_mean"], value.mean(dim=(0, 2, 3)).numpy(), atol=1e-4)
        np.testing.assert_allclose(measured[f"{name}.batch_var"], value.var(dim=(0, 2, 3), unbiased=False).numpy(),
                                   rtol=1e-3, atol=1e-4)
    # the running statistics do not enter the graph: changing them changes nothing
    shifted = {k: (v + 1.0 if k.endswith("running_mean") else v) for k, v in params.items()}
    np.testing.assert_array_equal(StatisticsProbe(artifact.stats_onnx, params=params).run(x, shifted)[0], logits)
    folded = fold_batch_statistics(params, measured, momentum=0.25)
    layer = next(iter(seen))
    np.testing.assert_allclose(folded[f"{layer}.running_mean"],
                               0.75 * params[f"{layer}.running_mean"] + 0.25 * measured[f"{layer}.batch_mean"], rtol=1e-6)
    np.testing.assert_array_equal(folded[f"{layer}.weight"], params[f"{layer}.weight"])


@pytest.mark.parametrize("arch", ["resnet20", "resnet20+conv"])
def test_batch_statistics_device_follows_deltas(arch):
    """`batch` normalisation after deltas equals torch's train-mode BN under the delta's tensors,
    learnt convolution weights included (written into its optimised statistics session in place)."""
    from device_client.statistics import BatchStatisticsModel, StatisticsProbe

    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    model = ARCHITECTURES[arch]().eval()
    artifact = export_student(model, (3, 32, 32))
    params = split_norm_file(artifact.norm, artifact.parameters)
    probe = StatisticsProbe(artifact.stats_onnx, params=params)
    assert probe.with_weights(dict(params)) is probe  # same arrays: no rebuild
    learns_convs = bool(conv_weights(model))
    assert (probe.folded is not None) == learns_convs  # without learnt weights there is nothing to write
    assert probe.with_weights(params | _random_norm(model, rng)) is probe  # new weights: no new session either way
    if learns_convs:
        with pytest.raises(ValueError, match="learnt weights"):
            StatisticsProbe(artifact.stats_onnx)
    device = BatchStatisticsModel(artifact.stats_onnx, params, version=0)
    x = rng.random((16, 3, 32, 32), dtype=np.float32)
    for layer in norm_layers(model).values():
        layer.train()
        layer.track_running_stats = False
    for version in (1, 2):
        new = _random_norm(model, rng)
        assert device.install(new, version)
        load_replaceable_state(model, new)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        logits, used = device.run(x)
        assert used == version
        assert np.abs(logits - expected).max() <= 1e-3
    assert not device.install(new, 2)  # not newer


def test_export_names_every_norm_tensor_and_refuses_going_backwards():
    model = ARCHITECTURES["resnet20"]().eval()
    artifact = export_student(model, (3, 32, 32))
    assert set(artifact.parameters) == set(replaceable_state(model))
    assert len(artifact.norm) == 4 * sum(int(np.prod(s)) for s in artifact.parameters.values())
    device = SwappableModel(artifact.onnx, split_norm_file(artifact.norm, artifact.parameters), version=3)
    assert not device.install(split_norm_file(artifact.norm, artifact.parameters), 2)
    assert device.version == 3
    with pytest.raises(ValueError, match="accounts for"):
        split_norm_file(artifact.norm[:-4], artifact.parameters)


def test_export_command_writes_files_that_plain_onnxruntime_loads(tmp_path):
    from driftsync.cli import main

    checkpoint = tmp_path / "student.pt"
    torch.save(embedded.build_embedded("embedded-student").state_dict(), checkpoint)
    out = tmp_path / "export"
    assert main(["export", "--student", f"embedded-student:{checkpoint}", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"student.onnx", "student.norm.bin", "student.stats.onnx", "parameters.json"}
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 10)


def test_corrupted_prompt_delta_is_refused():
    """A prompt delta passes the same integrity checks as a BN delta."""
    from device_client.deltas import DeltaRefused, verify_delta
    from shared.protocol import Delta, ModelDescriptor
    from shared.tensors import Tensor, tensors_digest

    model = ARCHITECTURES["resnet20+lowres:8"]().eval()
    artifact = export_student(model, (3, 32, 32))
    descriptor = ModelDescriptor(name="r20p", num_classes=10, class_names=[str(i) for i in range(10)],
                                 input_shape=(3, 32, 32), onnx_sha256="0" * 64, onnx_bytes=0, norm_sha256="0" * 64,
                                 stats_sha256="0" * 64, parameters=artifact.parameters)
    prompt = {"prompt.lowres": Tensor.from_numpy(np.full((1, 3, 8, 8), 0.1, np.float32))}
    good = Delta(cohort="c", base_version=0, new_version=1, created_at=0.0, newest_upload_at=0.0,
                 params=prompt, sha256=tensors_digest(prompt))
    np.testing.assert_array_equal(verify_delta(good, 0, descriptor)["prompt.lowres"], np.full((1, 3, 8, 8), 0.1, np.float32))
    flipped = bytearray(prompt["prompt.lowres"].data)
    flipped[5] ^= 0x40
    tampered = good.model_copy(update={"params": {"prompt.lowres": prompt["prompt.lowres"].model_copy(update={"data": bytes(flipped)})}})
    nan = {"prompt.lowres": Tensor.from_numpy(np.full((1, 3, 8, 8), np.nan, np.float32))}
    wrong_shape = {"prompt.lowres": Tensor.from_numpy(np.zeros((1, 3, 4, 4), np.float32))}
    for delta, reason in (
        (tampered, "hash_mismatch"),
        (good.model_copy(update={"params": nan, "sha256": tensors_digest(nan)}), "non_finite"),
        (good.model_copy(update={"params": wrong_shape, "sha256": tensors_digest(wrong_shape)}), "bad_tensor"),
        (good.model_copy(update={"new_version": 0}), "stale"),
    ):
        with pytest.raises(DeltaRefused) as refused:
            verify_delta(delta, 0, descriptor)
        assert refused.value.reason == reason


def test_running_statistics_are_measured_under_the_newest_learnt_weights():
    """`running` normalisation folds statistics measured by its probe: after a delta that moved
    the convolutions, under the new weights, not the ones the probe was built with."""
    import threading

    from device_client.scoring import to_model_input
    from device_client.statistics import RunningStatistics, StatisticsProbe
    from device_client.update_budget import UpdateBudget
    from tests.conftest import tiny_pair, wait_for

    model = learn_conv_weights(tiny_pair()[0])
    artifact = export_student(model, (3, 32, 32))
    params = split_norm_file(artifact.norm, artifact.parameters)
    fused = SwappableModel(artifact.onnx, params, version=0, threads=1)
    running = RunningStatistics(fused, StatisticsProbe(artifact.stats_onnx, 1, params), batch=8, momentum=1.0,
                                budget=UpdateBudget(None))
    moved = {name: params[name] * 1.5 for name in conv_weights(model)}
    assert running.install(moved, 1)
    frames = np.random.default_rng(3).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    x = to_model_input(frames)
    running.run(x, frames)
    stop = threading.Event()
    loop = threading.Thread(target=running.loop, args=(stop,))
    loop.start()
    try:
        assert wait_for(lambda: running.measured >= 8, timeout=30)
    finally:
        stop.set()
        running.wake()
        loop.join(timeout=10)
    new = StatisticsProbe(artifact.stats_onnx, 1, fused.params).measure(x, fused.params)
    old = StatisticsProbe(artifact.stats_onnx, 1, params).measure(x, params)
    layer = next(iter(norm_layers(model)))
    np.testing.assert_allclose(fused.params[f"{layer}.running_mean"], new[f"{layer}.batch_mean"], rtol=1e-5, atol=1e-6)
    assert np.abs(new[f"{layer}.batch_var"] - old[f"{layer}.batch_var"]).max() > 1e-3  # the weights did matter
    np.testing.assert_allclose(fused.params[f"{layer}.running_var"], new[f"{layer}.batch_var"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_folded_session_rewritten_in_place_equals_a_session_built_for_the_parameters(arch):
    """The optimised session whose weights the device folds and writes itself gives, under any
    parameters, what a session built for them gives: for every student, padding-prompted and
    conv-learning ones included. A student whose optimisation is not a reordering is refused."""
    from device_client.fused import FoldedSession, FoldingUnsupported
    from device_client.modelcheck import inspect_model
    from device_client.runtime import build_session
    from device_client.statistics import BatchStatisticsModel, SampledStatisticsModel

    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    model = ARCHITECTURES[arch]().eval()
    artifact = export_student(model, (3, 32, 32))
    params = split_norm_file(artifact.norm, artifact.parameters)
    x = rng.random((6, 3, 32, 32), dtype=np.float32)
    if arch in FOLDS_NOT:
        with pytest.raises(FoldingUnsupported, match="not a reordering"):
            FoldedSession(artifact.onnx, params, threads=1)
        sampled = SampledStatisticsModel(artifact.onnx, artifact.stats_onnx, params, 0, sample=2, threads=1)
        assert sampled.fused is None  # so every frame goes through the statistics graph, as `batch`
        np.testing.assert_array_equal(sampled.run(x)[0], BatchStatisticsModel(artifact.stats_onnx, params, 0, 1).run(x)[0])
        return
    folded = FoldedSession(artifact.onnx, params, threads=1)
    statistics = FoldedSession(artifact.stats_onnx, params, threads=1)  # its learnt weights, if any, in place too
    learnt = list(inspect_model(artifact.stats_onnx).external)  # initializers in the side file: learnt convolutions
    outputs = []
    for values in (params, _random_norm(model, rng), _random_norm(model, rng), params):
        expected = build_session(artifact.onnx, values, threads=1).run(None, {"input": x})[0]
        outputs.append(folded.run(x, values)[0])
        assert np.abs(outputs[-1] - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
        ordinary = build_session(artifact.stats_onnx, {name: values[name] for name in learnt}, threads=1)
        fed = {i.name: values[i.name] for i in ordinary.get_inputs() if i.name != "input"}
        for got, want in zip(statistics.run(x, values), ordinary.run(None, {"input": x} | fed)):
            assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
    assert np.abs(outputs[1] - outputs[0]).max() > 1e-2  # the parameters did move the output
    np.testing.assert_array_equal(outputs[3], outputs[0])  # and writing the first ones back restores it


@pytest.mark.parametrize("arch", ["resnet20", "resnet20+conv"])
def test_sampled_statistics_device_normalises_the_batch_by_its_first_frames(arch):
    """`sampled`: the first frames as `batch` mode gives them; the rest fused, normalised by those
    frames' statistics (torch eval mode with them as running statistics); after deltas too. A
    batch of at most WHOLE_BATCH_FACTOR samples runs whole, as `batch` mode."""
    from device_client.statistics import BatchStatisticsModel, SampledStatisticsModel

    torch.manual_seed(4)
    rng = np.random.default_rng(4)
    model = ARCHITECTURES[arch]().eval()
    artifact = export_student(model, (3, 32, 32))
    params = split_norm_file(artifact.norm, artifact.parameters)
    device = SampledStatisticsModel(artifact.onnx, artifact.stats_onnx, params, 0, sample=8, threads=1)
    assert device.fused is not None
    reference = BatchStatisticsModel(artifact.stats_onnx, params, 0, threads=1)
    x = rng.random((40, 3, 32, 32), dtype=np.float32) * np.linspace(0.5, 1.0, 40, dtype=np.float32)[:, None, None, None]
    seen: dict[str, torch.Tensor] = {}
    for name, layer in norm_layers(model).items():
        layer.register_forward_hook(lambda mod, inputs, out, name=name: seen.__setitem__(name, inputs[0]))
    for version in (1, 2):
        new = _random_norm(model, rng)
        assert device.install(new, version) and reference.install(new, version)
        load_replaceable_state(model, new)
        logits, used = device.run(x)
        assert used == version
        np.testing.assert_allclose(logits[:8], reference.run(x[:8])[0], atol=1e-4)
        layers = norm_layers(model)
        for layer in layers.values():
            layer.train()
            layer.track_running_stats = False
        with torch.no_grad():
            model(torch.from_numpy(x[:8]))  # the first frames' statistics, layer by layer
        for name, layer in layers.items():
            layer.eval()
            layer.track_running_stats = True
            layer.running_mean = seen[name].mean(dim=(0, 2, 3))
            layer.running_var = seen[name].var(dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            expected = model(torch.from_numpy(x[8:])).numpy()
        assert np.abs(logits[8:] - expected).max() <= 1e-3 * max(1.0, float(np.abs(expected).max()))
        assert np.abs(logits[8:] - reference.run(x[8:])[0]).max() > 1e-3  # not the rest's own statistics
        small = device.run(x[:32])[0]  # a batch of at most 4 samples (WHOLE_BATCH_FACTOR): measured whole
        np.testing.assert_allclose(small, reference.run(x[:32])[0], atol=1e-4)
