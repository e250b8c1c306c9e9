"""msgpack framing with no ext types: nothing on the wire can become an object."""
from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from shared.protocol import MAX_BODY_BYTES

MSGPACK_MEDIA_TYPE = "application/msgpack"
M = TypeVar("M", bound=BaseModel)
# No message of the protocol comes near these; they bound what a hostile body can make us build.
MAX_CONTAINER_LEN = 4096  # items of one array or map (uploads: 256 samples; deltas: a few hundred tensors)
MAX_STR_LEN = 4096
MAX_DEPTH = 32  # nesting of arrays and maps (an upload or a delta needs 4)
MAX_ERROR_CHARS = 1000


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
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            max_bin_len=max_bytes,
            max_str_len=min(max_bytes, MAX_STR_LEN),
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"malformed msgpack: {str(exc)[:200] or type(exc).__name__}") from exc
    check_depth(obj)
    return obj


def check_depth(obj: Any, max_depth: int = MAX_DEPTH) -> None:
    """Refuse containers nested deeper than max_depth; iterative, so a depth bomb cannot recurse."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth > max_depth:
                raise CodecError(f"msgpack nesting exceeds depth {max_depth}")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))


def describe_errors(errors: list[dict[str, Any]], max_chars: int = MAX_ERROR_CHARS) -> str:
    """Pydantic errors as 'loc: msg' lines, without the input they were raised on and bounded in size:
    an error message must never echo a hostile body back."""
    lines = []
    for error in errors[:10]:
        loc = ".".join(str(part)[:64] for part in error.get("loc", ()))
        lines.append(f"{loc}: {str(error.get('msg', ''))[:200]}")
    if len(errors) > 10:
        lines.append(f"... and {len(errors) - 10} more")
    text = "; ".join(lines)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def decode(data: bytes, model: type[M], *, max_bytes: int = MAX_BODY_BYTES) -> M:
    """Unpack and validate in one step; every failure is a CodecError."""
    obj = unpack(data, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise CodecError(f"expected a map, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise CodecError(f"invalid {model.__name__}: {describe_errors(exc.errors(include_url=False))}") from exc
