"""Export the student to ONNX with its normalization tensors as named initializers.

torch's exporter deduplicates identical initializers (every fresh BatchNorm has
ones and zeros) and, in eval mode, may fold BN into Conv. Either would make a
delta unappliable, so the BN inputs are rewritten to canonical, unique names.
onnxruntime still fuses Conv+BN at session creation because they stay constant
initializers. They are stored as ONNX external data in a side file, which is
what lets a device override them before fusion
(SessionOptions.add_external_initializers refuses embedded initializers).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data
from torch import nn

from server.artifact import StudentArtifact
from server.norm import NORM_FIELDS, conv_weights, norm_layers
from server.prompt import prompt_parameters

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
NORM_FILE = "student.norm.bin"


def export_student(model: nn.Module, input_shape: tuple[int, int, int]) -> StudentArtifact:
    graph_model = onnx.load_from_string(export_onnx(model, input_shape))
    names = [f"{layer}.{field}" for layer in norm_layers(model) for field in NORM_FIELDS]
    names += list(conv_weights(model)) + list(prompt_parameters(model))
    by_name = {t.name: t for t in graph_model.graph.initializer}
    chunks: list[bytes] = []
    parameters: dict[str, tuple[int, ...]] = {}
    offset = 0
    for name in names:
        tensor = by_name[name]
        raw = numpy_helper.to_array(tensor).astype("<f4").tobytes()
        set_external_data(tensor, location=NORM_FILE, offset=offset, length=len(raw))
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        chunks.append(raw)
        parameters[name] = tuple(int(d) for d in tensor.dims)
        offset += len(raw)
    onnx_bytes = graph_model.SerializeToString()
    return StudentArtifact(onnx_bytes, b"".join(chunks), parameters, statistics_graph(onnx_bytes, parameters))


def statistics_graph(onnx_bytes: bytes, parameters: dict[str, tuple[int, ...]]) -> bytes:
    """The student normalising with each batch's own statistics (torch's train-mode BN, forward
    only), with the affine tensors as graph inputs and, per BatchNorm layer, the batch mean and
    biased variance of its input as extra outputs `<layer>.batch_mean` and `<layer>.batch_var`.

    One graph serves two uses on a device: its logits are test-batch-statistics inference
    (the `bn` reference, without backprop), and its statistics fold into the running
    estimates that the fused inference graph and the cloud's distillation use.

    Each BatchNormalization runs in ONNX's training mode with momentum 0, so its running-mean
    and running-variance outputs are the batch's own statistics. onnxruntime computes them in
    the normalisation kernel: 0.76x the fused graph's throughput at batch 200 on one core,
    against 0.62x for the same statistics built from ReduceMean/Sub/Mul nodes
    (`scripts/bench_stats_graph.py`). It is unfused, so it stays slower than the inference graph.

    Learnt convolution weights stay initializers, in the norm side file as in the inference
    graph: fed as inputs they would cost onnxruntime its prepacked weights (0.52-0.58x the
    fused throughput, measured), so a device rebuilds this session when they change.
    """
    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    conv = {name for node in graph.node if node.op_type == "Conv" for name in node.input[1:2]} & set(parameters)
    kept = [t for t in graph.initializer if t.name not in parameters or t.name in conv]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name, shape in parameters.items():
        if name.rsplit(".", 1)[1] not in ("running_mean", "running_var") and name not in conv:  # affine and prompt
            graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
    helper = onnx.helper
    for node in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        layer = node.input[1].rsplit(".", 1)[0]
        channels = list(parameters[f"{layer}.weight"])
        ignored = f"{layer}.stats_prior"  # the running input that momentum 0 ignores
        graph.initializer.append(helper.make_tensor(ignored, onnx.TensorProto.FLOAT, channels, [0.0] * channels[0]))
        node.input[3], node.input[4] = ignored, ignored
        kept_attributes = [a for a in node.attribute if a.name not in ("training_mode", "momentum")]
        del node.attribute[:]
        node.attribute.extend([*kept_attributes, helper.make_attribute("training_mode", 1),
                               helper.make_attribute("momentum", 0.0)])
        mean, var = f"{layer}.batch_mean", f"{layer}.batch_var"
        del node.output[1:]
        node.output.extend([mean, var])
        graph.output.extend([
            helper.make_tensor_value_info(mean, onnx.TensorProto.FLOAT, channels),
            helper.make_tensor_value_info(var, onnx.TensorProto.FLOAT, channels),
        ])
    _check_without_side_file(model)
    return model.SerializeToString()


def _check_without_side_file(model: onnx.ModelProto) -> None:
    """onnx's checker, on a copy whose external initializers are inputs: it would look for their file."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    external = [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    kept = [t for t in copy.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    onnx.checker.check_model(copy)


def _scope_of(node_name: str) -> str:
    """Module path of an exported node: '/net/net.1/net.1.0/bn1/BatchNormalization' -> 'net.1.0.bn1'.

    Container children appear as 'parent.index', repeating their parent's segment.
    """
    segments: list[str] = []
    for part in node_name.split("/")[1:-1]:
        if segments and part.startswith(segments[-1] + "."):
            segments[-1] = part
        else:
            segments.append(part)
    return ".".join(segments)


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """ONNX with every replaceable tensor as its own named initializer.

    A prompt starts at zero, and the exporter would merge equal initializers (the four zero
    strips of a padding prompt): it exports with distinct random values, and the real values
    are written into the named initializers afterwards.
    """
    model = model.eval()
    dummy = torch.zeros(1, *input_shape)
    buf = io.BytesIO()
    prompt = prompt_parameters(model)
    real = {name: p.detach().clone() for name, p in prompt.items()}
    with torch.no_grad():
        for p in prompt.values():
            p.copy_(torch.rand_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
        )
    with torch.no_grad():
        for name, p in prompt.items():
            p.copy_(real[name])
    graph_model = onnx.load_from_string(buf.getvalue())
    by_name = {t.name: t for t in graph_model.graph.initializer}
    for name, value in real.items():
        if name not in by_name:
            raise RuntimeError(f"prompt tensor {name} is not an initializer of the exported graph")
        by_name[name].CopyFrom(numpy_helper.from_array(value.numpy().astype(np.float32), name))
    _canonicalise_norm_inputs(graph_model, model)
    onnx.checker.check_model(graph_model)
    return graph_model.SerializeToString()


def _canonicalise_norm_inputs(graph_model: onnx.ModelProto, model: nn.Module) -> None:
    graph = graph_model.graph
    layers = norm_layers(model)
    seen: set[str] = set()
    replacements: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        scope = _scope_of(node.name)
        if scope not in layers:
            raise RuntimeError(f"cannot map ONNX node {node.name!r} to a BatchNorm module")
        layer = layers[scope]
        for slot, field in enumerate(NORM_FIELDS, start=1):
            name = f"{scope}.{field}"
            value = getattr(layer, field).detach().cpu().numpy().astype(np.float32)
            replacements.append(numpy_helper.from_array(value, name))
            node.input[slot] = name
        seen.add(scope)
    missing = set(layers) - seen
    if missing:
        raise RuntimeError(f"BatchNorm modules missing from the ONNX graph: {sorted(missing)}")
    replaced = {t.name for t in replacements}
    for init in [i for i in graph.initializer if i.name in replaced]:
        graph.initializer.remove(init)
    for producer in [n for n in graph.node if replaced.intersection(n.output)]:
        graph.node.remove(producer)
    graph.initializer.extend(replacements)
    _prune_unused(graph)


def _prune_unused(graph: onnx.GraphProto) -> None:
    """Drop Identity nodes and initializers that no longer feed anything."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)

