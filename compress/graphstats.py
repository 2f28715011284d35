"""Graph statistics of an ONNX model at a fixed input point: matrix-product and
convolution FLOPs by precision, so the report can say what share of the work runs in int8.

Used by the quantize stage; shapes come from ONNX Runtime's symbolic shape inference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)

INT8_MATMULS = ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
INT8_CONVS = ("ConvInteger", "QLinearConv")
# Where each conv op keeps its weight (QLinearConv: x, x_scale, x_zero_point, w, ...).
CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
# Fused attention (com.microsoft): the score and context products run in float;
# Attention also holds the QKV projection (float), QAttention the same in int8.
FUSED_ATTENTION = ("Attention", "QAttention", "MultiHeadAttention")


def _shape_proxy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy symbolic shape inference can finish: it has no rule for QAttention,
    whose output is shaped like an Attention's on the same input, weight and bias."""
    proxy = onnx.ModelProto.FromString(model.SerializeToString())
    for node in proxy.graph.node:
        if node.op_type == "QAttention" and node.domain == "com.microsoft":
            inputs = list(node.input[:3])
            attrs = [a for a in node.attribute if a.name in ("num_heads", "qkv_hidden_sizes")]
            del node.input[:]
            node.input.extend(inputs)
            del node.attribute[:]
            node.attribute.extend(attrs)
            node.op_type = "Attention"
    return proxy


def _attention_flops(node: onnx.NodeProto, shapes: dict) -> tuple[int, int] | None:
    """(projection FLOPs, score + context FLOPs) of a fused attention node, None if a shape is unknown."""
    if node.op_type == "MultiHeadAttention":
        q, k, v = (shapes.get(name) for name in node.input[:3])
        if not q or not k or not v or None in (*q, *k, *v) or len(q) != 3 or len(k) != 3:
            return None
        batch, seq, kv_seq = q[0], q[1], k[1]
        return 0, 2 * batch * seq * kv_seq * q[2] + 2 * batch * seq * kv_seq * v[2]
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not x or not w or None in (*x, *w) or len(x) != 3:
        return None
    sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), None) or [w[1] // 3] * 3
    batch, seq, hidden = x
    projection = 2 * batch * seq * hidden * w[1]
    return projection, 2 * batch * seq * seq * sizes[0] + 2 * batch * seq * seq * sizes[2]


def _conv_flops(node: onnx.NodeProto, shapes: dict, producers: dict) -> int | None:
    """2 x output elements x (input channels per group x kernel area), None if a shape is unknown."""
    w_name = node.input[CONV_WEIGHT[node.op_type]]
    w = shapes.get(w_name)
    if not w and producers.get(w_name) is not None and producers[w_name].op_type == "DequantizeLinear":
        w = shapes.get(producers[w_name].input[0])  # a QDQ weight: the shape of the int8 initializer
    out = shapes.get(node.output[0])
    if not w or not out or None in w or None in out:
        return None
    return 2 * int(np.prod(out)) * int(np.prod(w[1:]))


def matmul_flops(path: Path, batch: int = 1, seq: int = 128) -> dict:
    """{"int8": FLOPs, "float": FLOPs, "int8_share": int8 / all} of the matrix
    products (MatMul family, Gemm) and convolutions (Conv family) at [batch, seq]
    token inputs, or at [batch, ...] for image inputs (whose other axes are fixed).
    A QDQ MatMul or Conv counts as int8 when both operands come out of
    DequantizeLinear: ONNX Runtime then runs it as an integer kernel."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 2:
            dims[0].dim_value, dims[1].dim_value = batch, seq
        elif len(dims) == 4:  # images: [batch, channels, height, width]
            dims[0].dim_value = batch
    inferred = SymbolicShapeInference.infer_shapes(_shape_proxy(model), auto_merge=True)
    shapes = {t.name: list(t.dims) for t in inferred.graph.initializer}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    producer = {out: node.op_type for node in inferred.graph.node for out in node.output}
    producers = {out: node for node in model.graph.node for out in node.output}

    flops = {"int8": 0, "float": 0}
    unknown = 0
    for node in model.graph.node:  # the original ops; the proxy renamed QAttention
        if node.op_type in FUSED_ATTENTION and node.domain == "com.microsoft":
            work = _attention_flops(node, shapes)
            if work is None:
                unknown += 1
                continue
            flops["int8" if node.op_type == "QAttention" else "float"] += work[0]
            flops["float"] += work[1]
            continue
        if node.op_type in CONV_WEIGHT:
            work = _conv_flops(node, shapes, producers)
            if work is None:
                unknown += 1
                continue
            int8 = node.op_type in INT8_CONVS or (
                producer.get(node.input[0]) == "DequantizeLinear" and producer.get(node.input[1]) == "DequantizeLinear")
            flops["int8" if int8 else "float"] += work
            continue
        if node.op_type not in ("MatMul", "Gemm", *INT8_MATMULS):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not out or None in a or None in out:
            unknown += 1
            continue
        # Gemm (GPT-2's Conv1D projections export so): A is [M, K], or [K, M] with transA
        trans_a = node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute)
        work = 2 * int(np.prod(out)) * (a[0] if trans_a else a[-1])
        int8 = node.op_type in INT8_MATMULS or (
            producer.get(node.input[0]) == "DequantizeLinear" and producer.get(node.input[1]) == "DequantizeLinear")
        flops["int8" if int8 else "float"] += work
    total = flops["int8"] + flops["float"]
    if unknown:
        log.warning("graphstats: %d matrix products of unknown shape in %s were not counted", unknown, path)
    return {**flops, "int8_share": flops["int8"] / total if total else 0.0, "uncounted": unknown,
            "at": {"batch": batch, "seq_len": seq}}
