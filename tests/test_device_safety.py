"""Safe models and a device that keeps going: ONNX checks, delta bounds, NaN-proof selection,
supervised threads, strict Retry-After, and a folder source that retries and remembers."""
from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data
from onnxruntime.capi.onnxruntime_pybind11_state import Fail
from PIL import Image

from device_client.client import HealthWindow
from device_client.deltas import DeltaRefused, verify_delta
from device_client.modelcheck import (
    ModelRefused,
    check_inference_model,
    check_statistics_model,
    inspect_model,
)
from device_client.runtime import build_session, private_model
from device_client.selection import (
    CemaSelector,
    SelectionConfig,
    UgsConfig,
    UgsSelector,
)
from device_client.sources import FolderSource, SeenFiles
from device_client.supervisor import Supervisor
from device_client.transport import (
    Backoff,
    ServerError,
    _parse,
    _raise_for,
    parse_retry_after,
)
from shared.protocol import Delta, ModelDescriptor, UploadAck
from shared.tensors import Tensor, tensors_digest
from tests.conftest import tiny_pair, wait_for


@pytest.fixture(scope="module")
def artifact():
    from server.export import export_student

    return export_student(tiny_pair()[0], (3, 32, 32))


def _descriptor(artifact, **changes) -> ModelDescriptor:
    fields = dict(name="tiny", num_classes=10, class_names=[f"c{i}" for i in range(10)], input_shape=(3, 32, 32),
                  onnx_sha256="0" * 64, onnx_bytes=len(artifact.onnx), norm_sha256="0" * 64, stats_sha256="0" * 64,
                  parameters=artifact.parameters)
    return ModelDescriptor(**(fields | changes))


def _reads_a_file(location: str) -> bytes:
    """A graph whose output is an initializer stored as external data at `location`."""
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "leak")
    set_external_data(tensor, location=location, offset=0, length=16)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph([helper.make_node("Identity", ["leak"], ["out"])], "g", [],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])], [tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


# -- ONNX before onnxruntime -------------------------------------------------------------------
def test_the_shipped_graphs_pass_and_match_their_descriptor(artifact):
    check_inference_model(artifact.onnx, _descriptor(artifact))
    check_statistics_model(artifact.stats_onnx, _descriptor(artifact))


def test_external_data_is_refused_and_a_private_folder_resolves_nothing(artifact, tmp_path, monkeypatch):
    secret = np.arange(4, dtype=np.float32)
    (tmp_path / "secret.bin").write_bytes(secret.tobytes())
    monkeypatch.chdir(tmp_path)
    evil = _reads_a_file("secret.bin")
    for check in (check_inference_model, check_statistics_model):
        with pytest.raises(ModelRefused) as refused:
            check(evil, _descriptor(artifact))
        assert refused.value.reason == "external_data"
    with pytest.raises(Fail, match="secret.bin|external"):  # from the private folder there is nothing to read
        build_session(private_model(tmp_path / "runtime", evil), {}).run(None, {})


def test_custom_domains_functions_subgraphs_and_garbage_are_refused(artifact):
    model = onnx.load_from_string(artifact.onnx)
    model.graph.node[0].domain = "evil.ops"
    with pytest.raises(ModelRefused, match="custom_domain"):
        inspect_model(model.SerializeToString())

    model = onnx.load_from_string(artifact.onnx)
    model.opset_import.append(helper.make_opsetid("evil.ops", 1))
    with pytest.raises(ModelRefused, match="custom_domain"):
        inspect_model(model.SerializeToString())

    model = onnx.load_from_string(artifact.onnx)
    model.functions.append(helper.make_function("local", "f", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                                                [helper.make_opsetid("", 17)]))
    with pytest.raises(ModelRefused, match="unexpected_section"):
        inspect_model(model.SerializeToString())

    inner = onnx.load_from_string(_reads_a_file("/etc/hostname")).graph  # an If branch that reads a file
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["out"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])], [cond])
    with pytest.raises(ModelRefused, match="external_data"):
        inspect_model(helper.make_model(graph).SerializeToString())

    for garbage in (b"\xff" * 16, b"\x3a\x7f", b""):
        with pytest.raises(ModelRefused):
            inspect_model(garbage)


def test_a_graph_that_does_not_match_the_descriptor_is_refused(artifact):
    name = next(iter(artifact.parameters))
    wrong_shape = artifact.parameters | {name: (99,)}
    for descriptor in (_descriptor(artifact, parameters=wrong_shape), _descriptor(artifact, input_shape=(3, 64, 64)),
                       _descriptor(artifact, num_classes=7, class_names=list("abcdefg")),
                       _descriptor(artifact, parameters=artifact.parameters | {"extra.weight": (8,)})):
        with pytest.raises(ModelRefused, match="descriptor_mismatch"):
            check_inference_model(artifact.onnx, descriptor)
    model = onnx.load_from_string(artifact.onnx)  # a replaceable tensor's data redirected to another file
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.external_data[0].value = "../../identity.json"
    with pytest.raises(ModelRefused, match="external_data"):
        check_inference_model(model.SerializeToString(), _descriptor(artifact))


def test_learnt_convolution_weights_may_live_only_in_the_norm_side_file():
    """A student that learns its convolutions ships their weights as external data of both graphs,
    in student.norm.bin, as the normalization tensors; anywhere else is refused."""
    from server.export import export_student
    from server.norm import learn_conv_weights

    artifact = export_student(learn_conv_weights(tiny_pair()[0]), (3, 32, 32))
    conv = next(name for name in artifact.parameters if name not in export_student(tiny_pair()[0], (3, 32, 32)).parameters)
    check_inference_model(artifact.onnx, _descriptor(artifact))
    check_statistics_model(artifact.stats_onnx, _descriptor(artifact))
    assert conv in inspect_model(artifact.stats_onnx).external
    model = onnx.load_from_string(artifact.stats_onnx)
    for tensor in model.graph.initializer:
        if tensor.name == conv:
            tensor.external_data[0].value = "../../identity.json"
    with pytest.raises(ModelRefused, match="external_data"):
        check_statistics_model(model.SerializeToString(), _descriptor(artifact))
    without = {k: v for k, v in artifact.parameters.items() if k != conv}  # not a replaceable tensor: refused
    with pytest.raises(ModelRefused, match="external_data"):
        check_statistics_model(artifact.stats_onnx, _descriptor(artifact, parameters=without))


# -- delta values ------------------------------------------------------------------------------
def test_delta_values_must_be_sane(artifact):
    from device_client.runtime import split_norm_file

    descriptor = _descriptor(artifact)
    source = split_norm_file(artifact.norm, artifact.parameters)
    var = next(n for n in source if n.endswith("running_var"))
    weight = next(n for n in source if n.endswith(".weight"))

    def delta(values: dict[str, np.ndarray]) -> Delta:
        params = {k: Tensor.from_numpy(v.astype(np.float32)) for k, v in values.items()}
        return Delta(cohort="c", base_version=0, new_version=1, created_at=0, newest_upload_at=0, params=params,
                     sha256=tensors_digest(params))

    assert verify_delta(delta({var: source[var] * 3, weight: source[weight] + 0.5}), 0, descriptor, source=source)
    for values in ({var: np.zeros_like(source[var])}, {var: -source[var]},
                   {weight: source[weight] + 1e6}, {var: source[var] * 1e4}):
        with pytest.raises(DeltaRefused) as refused:
            verify_delta(delta(values), 0, descriptor, source=source)
        assert refused.value.reason == "out_of_bounds"
    assert verify_delta(delta({weight: source[weight] + 1e6}), 0, descriptor, source=source, max_rel=None)


def test_a_hostile_convolution_delta_is_refused():
    """Learnt convolution weights pass the same checks as every replaceable tensor: bounds, shape,
    dtype (float32, or float16 upcast), finite values."""
    from device_client.runtime import split_norm_file
    from server.export import export_student
    from server.norm import conv_weights, learn_conv_weights

    student = learn_conv_weights(tiny_pair()[0])
    artifact = export_student(student, (3, 32, 32))
    descriptor = _descriptor(artifact)
    source = split_norm_file(artifact.norm, artifact.parameters)
    conv = next(iter(conv_weights(student)))

    def delta(value: np.ndarray) -> Delta:
        params = {conv: Tensor.from_numpy(value)}
        return Delta(cohort="c", base_version=0, new_version=1, created_at=0, newest_upload_at=0, params=params,
                     sha256=tensors_digest(params))

    assert verify_delta(delta(source[conv] * 1.1), 0, descriptor, source=source)
    half = verify_delta(delta(source[conv].astype(np.float16)), 0, descriptor, source=source)[conv]  # as the cloud sends them
    assert half.dtype == np.float32
    np.testing.assert_array_equal(half, source[conv].astype(np.float16).astype(np.float32))
    huge = np.full(source[conv].shape, np.inf, np.float16)  # what a float32 weight over 65504 would become
    for value, reason in ((source[conv] + 1e6, "out_of_bounds"), (source[conv].reshape(-1), "bad_tensor"),
                          (source[conv].astype(np.int32), "bad_tensor"), (huge, "non_finite")):
        with pytest.raises(DeltaRefused) as refused:
            verify_delta(delta(value), 0, descriptor, source=source)
        assert refused.value.reason == reason


def test_a_delta_sets_the_weights_it_leaves_out_to_their_source_values():
    """The cloud leaves convolution weights at their source values off the wire (the affine track
    of `--learn auto`): a device that ran moved ones (the convolution track, another cohort) gets
    the source values back from its model file. Statistics left out stay the device's own."""
    from device_client.runtime import split_norm_file
    from device_client.statistics import statistic_names
    from server.export import export_student
    from server.norm import conv_weights, learn_conv_weights

    student = learn_conv_weights(tiny_pair()[0])
    artifact = export_student(student, (3, 32, 32))
    descriptor, source = _descriptor(artifact), split_norm_file(artifact.norm, artifact.parameters)
    convs, stats = set(conv_weights(student)), set(statistic_names(artifact.parameters))
    affine = set(artifact.parameters) - convs - stats
    params = {name: Tensor.from_numpy(source[name] + 0.25) for name in affine}
    delta = Delta(cohort="c", base_version=0, new_version=1, created_at=0, newest_upload_at=0, params=params,
                  sha256=tensors_digest(params))
    got = verify_delta(delta, 0, descriptor, source=source)
    assert set(got) == affine | convs
    for name in convs:
        np.testing.assert_array_equal(got[name], source[name])
    for name in affine:
        np.testing.assert_allclose(got[name], source[name] + 0.25)
    assert set(verify_delta(delta, 0, descriptor)) == affine  # no source given: only what came


# -- selection and telemetry under NaN ---------------------------------------------------------
def test_a_nan_batch_does_not_poison_the_selector():
    selector = CemaSelector(SelectionConfig(num_classes=10, warmup_samples=8, entropy_ema=0.8))
    rng = np.random.default_rng(0)

    def batch(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(size=(n, 10)) * 3
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return probs, -(probs * np.log(probs)).sum(1)

    for _ in range(3):
        selector.select(*batch())
    probs, ent = batch()
    probs[:5], ent[:5] = np.nan, np.nan
    ent[5] = np.inf
    keep = selector.select(probs, ent)
    assert not keep[:6].any() and selector.counts["non_finite"] == 6
    assert np.isfinite(selector.e_max()) and np.isfinite(selector.recent_mean)
    nan_probs = np.full((8, 10), np.nan)
    assert not selector.select(nan_probs, np.full(8, np.nan)).any()  # an all-NaN batch
    assert np.isfinite(selector.e_max())
    assert sum(selector.select(*batch()).sum() for _ in range(5)) > 0  # selection goes on

    ugs = UgsSelector(UgsConfig(keep=0.5))
    keep = ugs.select(np.array([np.nan, 0.1, np.nan, 0.3]))
    assert keep.tolist() == [False, True, False, True]

    window = HealthWindow()
    window.add(np.array([np.nan, 1.0]), np.array([0.5, np.inf]))
    window.add(np.array([0.5]), np.array([0.9]))
    assert window.frames == 1 and window.entropy_sum == 0.5 and window.confidence_sum == 0.9


# -- supervised threads ------------------------------------------------------------------------
def test_a_supervised_thread_is_restarted_after_any_exception():
    supervisor = Supervisor(backoff_cap_s=0.05)
    stop = threading.Event()
    runs: list[int] = []

    def body() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise OverflowError("timeout value is too large")  # what a huge Retry-After did to Event.wait
        stop.wait()

    thread = supervisor.thread("poller", body, stop)
    thread.start()
    wait_for(lambda: len(runs) == 3 and supervisor.health()["poller"]["state"] == "running", timeout=10)
    health = supervisor.health()["poller"]
    assert health["restarts"] == 2 and "OverflowError" in health["last_error"]
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and supervisor.health()["poller"]["state"] == "stopped"


# -- transport ---------------------------------------------------------------------------------
def test_retry_after_is_parsed_strictly_and_clamped():
    now = 1_700_000_000.0
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 12 ") == 12.0
    assert parse_retry_after("999999999999") == 300.0
    assert parse_retry_after("9" * 400) == 300.0
    for bad in ("\u00b2", "1e9", "-5", "5.5", "inf", "nan", "", "\u0663"):  # ² and Arabic-Indic 3 pass isdigit()
        assert parse_retry_after(bad) is None, bad
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)
    assert parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", now=now) == 300.0
    assert parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("Mon, 99 Foo 2001") is None
    assert Backoff().next_delay(0.0) >= 0.5  # "0" or a past date does not make a busy loop
    assert Backoff(retry_after_cap_s=2.0).next_delay(300.0) <= 2.5  # a device may cap it lower still


@pytest.mark.parametrize("status,headers,body,detail", [
    (500, {}, b'["a", 1]', None),
    (503, {"Retry-After": "\u00b2".encode("latin-1")}, b'{"error": "x", "detail": "y"}', "y"),
    (502, {}, b"\xff\xfe", None),
    (400, {}, b'"just a string"', None),
    (401, {}, b'{"error": "unauthorized", "detail": "unknown device token"}', "unknown device token"),
    (429, {"Retry-After": "99999999999"}, b"{}", None),
])
def test_every_error_reply_becomes_a_server_error(status, headers, body, detail):
    response = httpx.Response(status, headers=headers, content=body)
    with pytest.raises(ServerError) as error:
        _raise_for(response)
    assert error.value.status == status and error.value.detail == detail
    assert error.value.retry_after is None or 0 <= error.value.retry_after <= 300
    assert error.value.unknown_token == (detail == "unknown device token")
    for content in (b"<html>", b"[1]", b'{"accepted": NaN, "queue_depth": 0}', b"\xff"):
        with pytest.raises(ServerError):
            _parse(httpx.Response(200, content=content), UploadAck)


# -- the folder source -------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _collect(source: FolderSource, until, timeout: float = 10.0) -> list[str]:
    stop = threading.Event()
    seen: list[str] = []
    deadline = time.monotonic() + timeout

    def run() -> None:
        for frames in source.frames(stop):
            seen.extend(frames.ids)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not until(seen) and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(timeout=5)
    return seen


def test_folder_source_retries_a_file_read_mid_write_and_remembers_across_restarts(tmp_path):
    inbox, seen_path = tmp_path / "inbox", tmp_path / "state" / "seen.txt"
    inbox.mkdir()
    seen_path.parent.mkdir()
    (inbox / "a.png").write_bytes(_png(1))
    whole = _png(2)
    (inbox / "b.png").write_bytes(whole[: len(whole) // 2])  # a camera still writing it
    source = FolderSource(inbox, 32, batch=4, poll_s=0.02, settle_s=0.0, seen_path=seen_path, retry_s=0.1)

    def finish_b() -> None:
        time.sleep(0.25)
        (inbox / "b.png").write_bytes(whole)

    threading.Thread(target=finish_b, daemon=True).start()
    assert sorted(_collect(source, lambda s: "b.png" in s)) == ["a.png", "b.png"]

    (inbox / "c.png").write_bytes(b"not an image")  # given up for good after its attempts
    (inbox / "d.png").write_bytes(_png(4))
    restarted = FolderSource(inbox, 32, batch=4, poll_s=0.02, settle_s=0.0, seen_path=seen_path, retry_s=0.02,
                             attempts=3)
    assert _collect(restarted, lambda s: restarted.given_up == 1 and "d.png" in s) == ["d.png"]  # a and b not again
    again = FolderSource(inbox, 32, batch=4, poll_s=0.02, settle_s=0.0, seen_path=seen_path)
    assert _collect(again, lambda s: False, timeout=0.5) == []


def test_the_seen_list_is_bounded_and_compacted(tmp_path):
    path = tmp_path / "seen.txt"
    seen = SeenFiles(path, max_names=10)
    for i in range(50):
        seen.add([f"f{i}.png"])
    assert len(seen) == 10 and "f49.png" in seen and "f39.png" not in seen
    assert len(path.read_text().splitlines()) <= 20
    reloaded = SeenFiles(path, max_names=10)
    assert len(reloaded) == 10 and "f49.png" in reloaded and "f40.png" in reloaded
