"""Target `cpu`: ONNX Runtime on x86-64.

Applies ONNX Runtime's graph optimizations offline and saves the optimized
model with the session options to load it with, and the tokenizer, so the
build directory alone runs the model.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil

from compress.artifact import Artifact, seal
from compress.errors import TargetError

log = logging.getLogger(__name__)

VERSION = 2  # 2: meta records the optimized graph's kernels and fusions

SUPPORTS = {
    "runtime": "onnxruntime (CPUExecutionProvider)",
    "precisions": ["fp32", "int8"],
    "architectures": ["x86_64", "AMD64"],
    "packages": ["onnxruntime"],
}

LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

# What ONNX Runtime's CPU graph says after optimization. Integer kernels mean
# the int8 work really runs in int8; fused ops mean the transformer fusions
# happened; the op types that a fusion absorbs, still present, mean it did not.
INT8_KERNELS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QAttention",
                "QGemm", "QLinearConv", "ConvInteger")
FUSED = {
    "attention": ("Attention", "MultiHeadAttention", "QAttention", "GroupQueryAttention"),
    "layernorm": ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                  "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization"),
    "gelu": ("Gelu", "BiasGelu", "FastGelu", "QuickGelu"),
}
UNFUSED = {"attention": ("Softmax",), "layernorm": ("ReduceMean",), "gelu": ("Erf", "Tanh")}
FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm")


def check(cfg, precision: str) -> None:
    """Fail before any stage runs if this machine or config can't build."""
    if precision not in SUPPORTS["precisions"]:
        raise TargetError(f"target cpu cannot build {precision} (supported: {', '.join(SUPPORTS['precisions'])}); "
                          "set quantize.dtype: int8 or drop the quantize stage")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise TargetError("target cpu needs onnxruntime; pip install onnxruntime") from None


def session_options(cfg) -> dict:
    """What a deployment should load the build with (recorded in the build)."""
    return {
        "intra_op_num_threads": cfg.threads,
        "inter_op_num_threads": 1,
        # Optimizations were applied offline; doing them again at load time wastes start-up.
        "graph_optimization_level": "ORT_DISABLE_ALL",
        "execution_mode": "ORT_SEQUENTIAL",
        "providers": ["CPUExecutionProvider"],
    }


def graph_check(path) -> dict:
    """Kernels and fusions of an optimized ONNX Runtime graph (see INT8_KERNELS, FUSED)."""
    import collections

    import onnx

    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer}
    producer = {out: node.op_type for node in graph.node for out in node.output}
    ops = collections.Counter(node.op_type for node in graph.node)
    float_weight, qdq_float = [], []
    for node in graph.node:
        if node.op_type not in FLOAT_MATMULS:
            continue
        if any(i in weights for i in node.input[:2]):
            float_weight.append(node.name)  # a projection that runs in float
        elif any(producer.get(i) == "DequantizeLinear" for i in node.input[:2]):
            qdq_float.append(node.name)  # QDQ that ORT did not turn into an integer kernel
    return {
        "ops": dict(sorted(ops.items())),
        "int8_kernels": sum(ops[o] for o in INT8_KERNELS),
        "float_weight_matmuls": float_weight,
        "qdq_float_matmuls": qdq_float,
        "fused": {k: sum(ops[o] for o in v) for k, v in FUSED.items()},
        "unfused": {k: sum(ops[o] for o in v) for k, v in UNFUSED.items()},
    }


def compare_graphs(quantized: dict, fp32: dict) -> list[str]:
    """Warnings about a quantized build's graph, against the same model in fp32
    through the same optimizations: int8 that does not run in int8, and fusions
    that quantization broke (the usual reason an int8 build is slower than fp32)."""
    warnings = []
    if quantized["int8_kernels"] == 0:
        warnings.append("the int8 build has no integer kernel after ONNX Runtime's optimizations: it runs in float")
    if quantized["qdq_float_matmuls"]:
        warnings.append(f"{len(quantized['qdq_float_matmuls'])} QDQ matrix products were not fused into integer "
                        "kernels (ONNX Runtime dequantizes and runs them in fp32)")
    for kind, count in fp32["fused"].items():
        lost = count - quantized["fused"].get(kind, 0)
        if lost > 0:
            warnings.append(f"quantization broke {lost} of {count} {kind} fusions that the fp32 model gets")
    return warnings


def build(src: Artifact, cfg, ctx) -> Artifact:
    import onnxruntime as ort

    from compress.export import compare, probe_feed
    from compress.quantize import run_feed

    if platform.machine() not in SUPPORTS["architectures"]:
        log.warning("target cpu: optimizing on %s; ORT_ENABLE_ALL layouts are specific to the CPU that made them",
                    platform.machine())
    out = ctx.out
    # ORT warns that ORT_ENABLE_ALL output is hardware specific; the report
    # records the optimization level and the README says where a build may run.
    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[cfg.optimization])
    so.intra_op_num_threads = cfg.threads
    so.optimized_model_filepath = str(out / "model.onnx")
    ort.InferenceSession(str(src.model_file), so, providers=["CPUExecutionProvider"])
    for name in src.meta.get("tokenizer_files", []):
        shutil.copyfile(src.path / name, out / name)
    options = session_options(cfg)
    (out / "session_options.json").write_text(json.dumps(options, indent=2))

    feed = probe_feed(src.meta)
    agreement = compare(run_feed(out / "model.onnx", feed), run_feed(src.model_file, feed))
    if agreement["mean_cosine"] < 0.999:
        raise TargetError(f"target cpu: the optimized graph disagrees with its input (mean cosine "
                          f"{agreement['mean_cosine']:.4f}); set targets.cpu.optimization: extended")
    return seal(out, "onnx", {**src.meta, "parent": src.digest, "target": "cpu",
                              "session_options": options, "optimization": LEVELS[cfg.optimization],
                              "onnxruntime": ort.__version__, "agreement_random": agreement,
                              "graph": graph_check(out / "model.onnx")})
