"""The wire format: tensors, msgpack framing, message validation."""
from __future__ import annotations

import math
import time

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import CodecError, decode, pack, unpack
from shared.images import ImageDecodeError, decode_image, encode_image
from shared.protocol import Delta, UploadBatch, statistic_problem
from shared.tensors import Tensor, tensors_digest


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32", "uint8"])
def test_tensor_round_trip_is_exact(dtype):
    array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    back = Tensor.model_validate(unpack(pack(Tensor.from_numpy(array).model_dump()))).to_numpy()
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_tensor_rejects_inconsistent_bytes_nan_and_unknown_dtypes():
    with pytest.raises(ValueError, match="needs 24"):
        Tensor(dtype="float32", shape=(2, 3), data=b"\x00" * 23)
    with pytest.raises(ValueError):
        Tensor(dtype="float64", shape=(1,), data=b"\x00" * 8)
    with pytest.raises(ValueError, match="NaN"):
        Tensor.from_numpy(np.array([1.0, np.nan], np.float32)).to_numpy()
    with pytest.raises(ValueError, match="exceeds"):
        Tensor(dtype="uint8", shape=(1 << 30,), data=b"")


def test_digest_depends_on_names_values_and_shapes():
    a = {"x": Tensor.from_numpy(np.zeros(4, np.float32))}
    assert tensors_digest(a) == tensors_digest(dict(a))
    assert tensors_digest(a) != tensors_digest({"y": a["x"]})
    assert tensors_digest(a) != tensors_digest({"x": Tensor.from_numpy(np.zeros((2, 2), np.float32))})
    assert tensors_digest(a) != tensors_digest({"x": Tensor.from_numpy(np.ones(4, np.float32))})


def test_codec_refuses_ext_types_garbage_oversize_and_non_maps():
    with pytest.raises(CodecError, match="ext type"):
        unpack(msgpack.packb({"a": msgpack.ExtType(1, b"x")}))
    with pytest.raises(CodecError):
        unpack(b"\xc1")
    with pytest.raises(CodecError, match="exceeds"):
        unpack(b"\x00" * 100, max_bytes=10)
    with pytest.raises(CodecError, match="expected a map"):
        decode(pack([1, 2]), UploadBatch)
    with pytest.raises(CodecError, match="invalid UploadBatch"):
        decode(pack({"codec": "png"}), UploadBatch)


def test_upload_batch_validates_lengths_and_finiteness():
    image = encode_image(np.zeros((32, 32, 3), np.uint8), "png")
    with pytest.raises(ValueError, match="same length"):
        UploadBatch(device_version=0, codec="png", images=[image], entropy=[0.1, 0.2], captured_at=[0.0])
    with pytest.raises(ValueError, match="NaN"):
        UploadBatch(device_version=0, codec="png", images=[image], entropy=[math.inf], captured_at=[0.0])
    with pytest.raises(ValueError):
        UploadBatch(device_version=0, codec="gif", images=[image], entropy=[0.1], captured_at=[0.0])


def test_delta_versions_must_move_forward_and_payload_is_checked():
    params = {"bn.weight": Tensor.from_numpy(np.ones(3, np.float32))}
    with pytest.raises(ValueError, match="greater"):
        Delta(cohort="c", base_version=3, new_version=3, created_at=0, newest_upload_at=0, params=params, sha256="")
    good = Delta(cohort="c", base_version=0, new_version=1, created_at=time.time(), newest_upload_at=0,
                 params=params, sha256=tensors_digest(params))
    assert decode(pack(good), Delta).payload_ok()
    assert not good.model_copy(update={"sha256": "0" * 64}).payload_ok()


@pytest.mark.parametrize("codec", ["png", "webp", "raw"])
def test_lossless_codecs_round_trip(codec):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_image(image, codec), codec, (32, 32)), image)


def test_image_decode_checks_format_and_size():
    png = encode_image(np.zeros((32, 32, 3), np.uint8), "png")
    with pytest.raises(ImageDecodeError, match="expected 16x16"):
        decode_image(png, "png", (16, 16))
    with pytest.raises(ImageDecodeError, match="the batch says jpeg"):
        decode_image(png, "jpeg", (32, 32))
    with pytest.raises(ImageDecodeError):
        decode_image(b"\x89PNG\r\n\x1a\nbroken", "png", (32, 32))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoding_arbitrary_bytes_never_raises_anything_but_codec_error(data):
    for model in (UploadBatch, Delta):
        try:
            decode(data, model)
        except CodecError:
            pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["images", "entropy", "captured_at", "codec", "device_version", "params", "sha256", "x"]), msgpack_values))
def test_decoding_structured_garbage_is_a_codec_error(obj):
    data = msgpack.packb(obj, use_bin_type=True)
    for model in (UploadBatch, Delta):
        try:
            decode(data, model)
        except CodecError:
            pass


def test_registration_needs_only_a_valid_name():
    from shared.protocol import RegisterRequest

    assert RegisterRequest.model_validate({"device_name": "cam-01"}).cohort is None
    for bad in ({"device_name": ""}, {"device_name": "a b"}, {"device_name": "ok", "cohort": "../x y"}, {}):
        with pytest.raises(ValueError):
            RegisterRequest.model_validate(bad)


def test_statistic_problem_is_the_one_rule_for_normalization_statistics() -> None:
    ones = np.ones(4, np.float32)
    assert statistic_problem("bn.running_mean", -ones) is None  # means may be negative
    assert statistic_problem("bn.running_var", ones) is None
    assert statistic_problem("bn.running_var", np.zeros(4, np.float32)) == "bn.running_var has non-positive variances"
    assert statistic_problem("bn.running_mean", np.array([0, np.inf], np.float32)) == "bn.running_mean has NaN or Inf"
    assert statistic_problem("bn.running_var", np.array([1, np.nan], np.float32)) == "bn.running_var has NaN or Inf"
