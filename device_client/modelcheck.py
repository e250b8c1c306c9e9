"""Look inside ONNX bytes before onnxruntime does: refuse what could read device files or
run code we did not ship, and check the graph against the descriptor.

onnxruntime resolves an initializer stored as external data against a path the model
names, so a malicious model could read files on the device; custom op domains need
code that is not ours. The check walks the protobuf wire format directly (ONNX's
field numbers, below), so the device needs neither the `onnx` package nor protobuf.
It is a whitelist: unknown top-level model sections are refused, not skipped.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from shared.protocol import ModelDescriptor

NORM_FILE = "student.norm.bin"  # the one side file the inference graph may name; its tensors are always overridden
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})  # built into onnxruntime
MAX_GRAPH_DEPTH = 8

# ONNX field numbers (onnx/onnx.proto)
MODEL_KNOWN = {1, 2, 3, 4, 5, 6, 7, 8, 14}  # ir_version .. graph, opset_import, metadata_props (no functions, training_info)
MODEL_GRAPH, MODEL_OPSET = 7, 8
OPSET_DOMAIN = 1
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_SPARSE_INITIALIZER = 1, 5, 11, 12, 15
NODE_INPUT, NODE_OUTPUT, NODE_OP_TYPE, NODE_DOMAIN, NODE_ATTRIBUTE = 1, 2, 4, 7, 5
ATTR_NAME, ATTR_F, ATTR_I = 1, 2, 3
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE, ATTR_SPARSES = 5, 6, 10, 11, 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_FLOAT_DATA, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 4, 8, 9
TENSOR_EXTERNAL, TENSOR_LOCATION = 13, 14
FLOAT = 1  # TensorProto.DataType.FLOAT
ENTRY_KEY, ENTRY_VALUE = 1, 2
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR, TENSOR_TYPE_SHAPE, SHAPE_DIM, DIM_VALUE = 1, 2, 1, 1
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class ModelRefused(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ModelRefused("malformed", "truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one message: an int for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ModelRefused("malformed", f"wire type {wire}")
        if pos > len(buf):
            raise ModelRefused("malformed", "truncated field")
        yield number, value


def _ints(value: int | memoryview) -> list[int]:
    """A repeated int64 field, packed or not."""
    if isinstance(value, int):
        return [value]
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(item)
    return out


def _text(value: int | memoryview) -> str:
    if isinstance(value, int):
        raise ModelRefused("malformed", "expected a string")
    return bytes(value).decode("utf-8", errors="replace")


@dataclass
class _Tensor:
    name: str = ""
    dims: list[int] = field(default_factory=list)
    external: dict[str, str] = field(default_factory=dict)
    location: int = 0


def _tensor(buf: memoryview) -> _Tensor:
    tensor = _Tensor()
    for number, value in _fields(buf):
        if number == TENSOR_DIMS:
            tensor.dims.extend(_ints(value))
        elif number == TENSOR_NAME:
            tensor.name = _text(value)
        elif number == TENSOR_LOCATION and isinstance(value, int):
            tensor.location = value
        elif number == TENSOR_EXTERNAL:
            entry = {n: _text(v) for n, v in _fields(value)}
            tensor.external[entry.get(ENTRY_KEY, "")] = entry.get(ENTRY_VALUE, "")
    return tensor


def _value_shape(buf: memoryview) -> tuple[str, list[int | None]]:
    """A graph input or output: its name and dims (None where symbolic)."""
    name, dims = "", []
    for number, value in _fields(buf):
        if number == VALUE_NAME:
            name = _text(value)
        elif number == VALUE_TYPE:
            for n1, tensor_type in _fields(value):
                if n1 != TYPE_TENSOR:
                    continue
                for n2, shape in _fields(tensor_type):
                    if n2 != TENSOR_TYPE_SHAPE:
                        continue
                    for n3, dim in _fields(shape):
                        if n3 == SHAPE_DIM:
                            sizes = [v for n4, v in _fields(dim) if n4 == DIM_VALUE and isinstance(v, int)]
                            dims.append(sizes[0] if sizes else None)
    return name, dims


@dataclass
class GraphSummary:
    inputs: dict[str, list[int | None]] = field(default_factory=dict)
    outputs: dict[str, list[int | None]] = field(default_factory=dict)
    initializers: dict[str, list[int]] = field(default_factory=dict)
    external: dict[str, dict[str, str]] = field(default_factory=dict)  # initializer name -> its external_data


def _check_inner_tensor(tensor: _Tensor, where: str) -> None:
    if tensor.location == EXTERNAL or tensor.external:
        raise ModelRefused("external_data", f"{where} tensor {tensor.name!r} is stored outside the model")


def _walk_graph(buf: memoryview, depth: int, summary: GraphSummary | None) -> None:
    """Every node's domain, every tensor's storage, and subgraphs (If/Loop bodies) recursively.
    `summary` is filled for the top-level graph only: its initializers may be external."""
    if depth > MAX_GRAPH_DEPTH:
        raise ModelRefused("malformed", f"subgraphs nested deeper than {MAX_GRAPH_DEPTH}")
    for number, value in _fields(buf):
        if isinstance(value, int):
            continue
        if number == GRAPH_NODE:
            _walk_node(value, depth)
        elif number == GRAPH_INITIALIZER:
            tensor = _tensor(value)
            if summary is None:
                _check_inner_tensor(tensor, "subgraph")
            else:
                summary.initializers[tensor.name] = tensor.dims
                if tensor.location == EXTERNAL or tensor.external:
                    summary.external[tensor.name] = tensor.external
        elif number == GRAPH_SPARSE_INITIALIZER:
            for n, part in _fields(value):
                if n in (SPARSE_VALUES, SPARSE_INDICES) and not isinstance(part, int):
                    _check_inner_tensor(_tensor(part), "sparse")
        elif summary is not None and number in (GRAPH_INPUT, GRAPH_OUTPUT):
            name, dims = _value_shape(value)
            (summary.inputs if number == GRAPH_INPUT else summary.outputs)[name] = dims


def _walk_node(buf: memoryview, depth: int) -> None:
    for number, value in _fields(buf):
        if number == NODE_DOMAIN:
            domain = _text(value)
            if domain not in ALLOWED_DOMAINS:
                raise ModelRefused("custom_domain", f"operator domain {domain!r} is not built into onnxruntime")
        elif number == NODE_ATTRIBUTE and not isinstance(value, int):
            for n, part in _fields(value):
                if isinstance(part, int):
                    continue
                if n in (ATTR_T, ATTR_TENSORS):
                    _check_inner_tensor(_tensor(part), "attribute")
                elif n in (ATTR_SPARSE, ATTR_SPARSES):
                    for n2, inner in _fields(part):
                        if n2 in (SPARSE_VALUES, SPARSE_INDICES) and not isinstance(inner, int):
                            _check_inner_tensor(_tensor(inner), "attribute")
                elif n in (ATTR_G, ATTR_GRAPHS):
                    _walk_graph(part, depth + 1, None)


def inspect_model(data: bytes) -> GraphSummary:
    """Raise ModelRefused for anything onnxruntime should not see; summarise the top-level graph."""
    summary: GraphSummary | None = None
    for number, value in _fields(memoryview(data)):
        if number not in MODEL_KNOWN:
            raise ModelRefused("unexpected_section", f"model field {number} (functions, training info...) is not accepted")
        if number == MODEL_OPSET and not isinstance(value, int):
            domain = next((_text(v) for n, v in _fields(value) if n == OPSET_DOMAIN), "")
            if domain not in ALLOWED_DOMAINS:
                raise ModelRefused("custom_domain", f"opset domain {domain!r} is not built into onnxruntime")
        elif number == MODEL_GRAPH and not isinstance(value, int):
            if summary is not None:
                raise ModelRefused("malformed", "more than one graph")
            summary = GraphSummary()
            _walk_graph(value, 0, summary)
    if summary is None:
        raise ModelRefused("malformed", "no graph")
    return summary


def _same_dims(actual: list[int | None], expected: list[int | None]) -> bool:
    """None in `expected` matches any size (the batch axis)."""
    return len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected))


def check_inference_model(data: bytes, descriptor: ModelDescriptor) -> None:
    """student.onnx: one image input, logits out, every replaceable tensor an initializer of
    its descriptor shape, and external data only for those, in the norm side file."""
    graph = inspect_model(data)
    _check_external(graph, descriptor)
    _check_io(graph, descriptor, extra_inputs={})
    for name, shape in descriptor.parameters.items():
        if name not in graph.initializers or graph.initializers[name] != list(shape):
            raise ModelRefused("descriptor_mismatch", f"initializer {name} is not {list(shape)} in the graph")


def check_statistics_model(data: bytes, descriptor: ModelDescriptor) -> None:
    """student.stats.onnx: the image and the affine tensors in, logits and per-layer batch statistics
    out; learnt convolution weights, if any, are initializers in the norm side file, as in student.onnx."""
    graph = inspect_model(data)
    _check_external(graph, descriptor)
    extra = {name: list(shape) for name, shape in descriptor.parameters.items() if name in graph.inputs}
    _check_io(graph, descriptor, extra_inputs=extra)
    for name in list(graph.outputs)[1:]:
        if not name.endswith((".batch_mean", ".batch_var")):
            raise ModelRefused("descriptor_mismatch", f"unexpected output {name!r}")


def _check_external(graph: GraphSummary, descriptor: ModelDescriptor) -> None:
    """External data only for replaceable tensors, in the norm side file (the device always supplies them)."""
    for name, external in graph.external.items():
        if name not in descriptor.parameters or external.get("location") != NORM_FILE:
            raise ModelRefused("external_data", f"initializer {name!r} names external data {external.get('location')!r}")


def _check_io(graph: GraphSummary, descriptor: ModelDescriptor, extra_inputs: dict[str, list[int]]) -> None:
    expected_inputs = {"input": [None, *descriptor.input_shape]} | extra_inputs
    if set(graph.inputs) != set(expected_inputs) or not all(
            _same_dims(graph.inputs[n], dims) for n, dims in expected_inputs.items()):
        raise ModelRefused("descriptor_mismatch", f"graph inputs {graph.inputs} do not match the descriptor")
    if not graph.outputs:
        raise ModelRefused("descriptor_mismatch", "the graph has no outputs")
    first, dims = next(iter(graph.outputs.items()))
    if not _same_dims(dims, [None, descriptor.num_classes]):
        raise ModelRefused("descriptor_mismatch", f"output {first!r} is {dims}, expected [batch, {descriptor.num_classes}]")


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: list[str]
    outputs: list[str]
    floats: dict[str, float]  # the float attributes (e.g. epsilon)
    ints: dict[str, int]  # the int attributes (e.g. training_mode)


def graph_contents(data: bytes | bytearray) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The top-level graph's nodes, and its float32 initializers stored inside the model, by name.

    The arrays are views of `data`: writing into them (when `data` is a bytearray) changes the
    model's tensors in place. For models the device checked or made itself."""
    nodes: list[Node] = []
    tensors: dict[str, np.ndarray] = {}
    graph = next((v for n, v in _fields(memoryview(data)) if n == MODEL_GRAPH and not isinstance(v, int)), None)
    if graph is None:
        raise ModelRefused("malformed", "no graph")
    for number, value in _fields(graph):
        if isinstance(value, int):
            continue
        if number == GRAPH_NODE:
            nodes.append(_node(value))
        elif number == GRAPH_INITIALIZER:
            name, array = _float_tensor(value)
            if array is not None:
                tensors[name] = array
    return nodes, tensors


def _node(buf: memoryview) -> Node:
    op_type, inputs, outputs, floats, ints = "", [], [], {}, {}
    for number, value in _fields(buf):
        if number == NODE_OP_TYPE:
            op_type = _text(value)
        elif number == NODE_INPUT:
            inputs.append(_text(value))
        elif number == NODE_OUTPUT:
            outputs.append(_text(value))
        elif number == NODE_ATTRIBUTE and not isinstance(value, int):
            parts = dict(_fields(value))
            if isinstance(parts.get(ATTR_F), memoryview) and ATTR_NAME in parts:
                floats[_text(parts[ATTR_NAME])] = float(np.frombuffer(parts[ATTR_F], "<f4")[0])
            elif isinstance(parts.get(ATTR_I), int) and ATTR_NAME in parts:
                ints[_text(parts[ATTR_NAME])] = parts[ATTR_I]
    return Node(op_type, inputs, outputs, floats, ints)


def _float_tensor(buf: memoryview) -> tuple[str, np.ndarray | None]:
    """(name, values) of a float32 tensor with its data inside the model; values None otherwise."""
    name, dims, data_type, data = "", [], 0, None
    for number, value in _fields(buf):
        if number == TENSOR_NAME:
            name = _text(value)
        elif number == TENSOR_DIMS:
            dims.extend(_ints(value))
        elif number == TENSOR_DATA_TYPE and isinstance(value, int):
            data_type = value
        elif number in (TENSOR_RAW_DATA, TENSOR_FLOAT_DATA) and not isinstance(value, int):
            data = np.frombuffer(value, "<f4")
    if data_type != FLOAT or data is None or data.size != int(np.prod(dims)):
        return name, None
    return name, data.reshape(dims)
