"""msgpack framing with no ext types: nothing on the wire can become an object."""
from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from shared.protocol import MAX_BODY_BYTES

MSGPACK_MEDIA_TYPE = "application/msgpack"
M = TypeVar("M", bound=BaseModel)


class CodecError(ValueError):
    """Bytes that do not decode into the expected message."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack ext type {code} is not allowed")


def pack(obj: Any) -> bytes:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    return msgpack.packb(obj, use_bin_type=True, datetime=False)


def unpack(data: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> Any:
    if len(data) > max_bytes:
        raise CodecError(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"malformed msgpack: {exc}") from exc


def decode(data: bytes, model: type[M], *, max_bytes: int = MAX_BODY_BYTES) -> M:
    """Unpack and validate in one step; every failure is a CodecError."""
    obj = unpack(data, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise CodecError(f"expected a map, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise CodecError(f"invalid {model.__name__}: {exc.errors(include_url=False)}") from exc
