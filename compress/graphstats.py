"""Graph statistics of an ONNX model at a fixed input point: matrix-product
FLOPs by precision, so the report can say what share of the work runs in int8.

Used by the quantize stage; shapes come from ONNX Runtime's symbolic shape inference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)

INT8_MATMULS = ("MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def matmul_flops(path: Path, batch: int = 1, seq: int = 128) -> dict:
    """{"int8": FLOPs, "float": FLOPs, "int8_share": int8 / all} of the matrix
    products (MatMul family) at [batch, seq] inputs. A QDQ MatMul counts as int8
    when both operands come out of DequantizeLinear: ONNX Runtime then runs it
    as an integer kernel."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 2:
            dims[0].dim_value, dims[1].dim_value = batch, seq
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {t.name: list(t.dims) for t in inferred.graph.initializer}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    producer = {out: node.op_type for node in inferred.graph.node for out in node.output}

    flops = {"int8": 0, "float": 0}
    unknown = 0
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", *INT8_MATMULS):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not out or None in a or None in out:
            unknown += 1
            continue
        work = 2 * int(np.prod(out)) * a[-1]
        int8 = node.op_type in INT8_MATMULS or (
            producer.get(node.input[0]) == "DequantizeLinear" and producer.get(node.input[1]) == "DequantizeLinear")
        flops["int8" if int8 else "float"] += work
    total = flops["int8"] + flops["float"]
    if unknown:
        log.warning("graphstats: %d matrix products of unknown shape in %s were not counted", unknown, path)
    return {**flops, "int8_share": flops["int8"] / total if total else 0.0, "uncounted": unknown,
            "at": {"batch": batch, "seq_len": seq}}
