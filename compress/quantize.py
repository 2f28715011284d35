"""Stage `quantize`: fp32 ONNX -> int8 (or fp16) ONNX.

dynamic: ONNX Runtime's dynamic quantization (int8 weights, activations
quantized per run). static: QDQ with activation ranges calibrated on real
inputs (minmax, entropy or percentile), in the flavour the target wants (u8s8
for x86 VNNI and ARM, symmetric s8s8 with zero point 0 for TensorRT). fp16:
half precision for GPU targets. The result is compared with its input and the
agreement recorded. With `fallback`, each MatMul's sensitivity to int8 is
measured and the most sensitive are kept in fp32 until a quality check passes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from compress.artifact import Artifact, seal
from compress.errors import StageError
from compress.encoders import ONNX_OUTPUT
from compress.export import compare, probe_feed, random_inputs
from compress.recipe import QuantizeConfig

log = logging.getLogger(__name__)

VERSION = 4  # 2: meta records the int8 FLOP share; 3: fp16, per-node sensitivity and the fp32 fallback; 4: image models (static: 7-bit weights)
CALIBRATION_LENGTH = 128  # tokens per packed calibration row
SCRATCH = ".scratch"  # candidates and the calibration cache; removed before the artifact is sealed
# fp16 must agree with fp32 this well: half precision on a BERT encoder costs
# ~1e-6 in cosine (measured on the tiny test model), so less means an overflow.
FP16_MIN_COSINE = 0.999
# write(model_out, exclude, only): one int8 model with `exclude` kept in fp32,
# or, with `only`, just those nodes quantized.
Writer = Callable[..., None]


def run_onnx(path, ids, mask, threads: int = 2):
    return run_feed(path, {"input_ids": ids, "attention_mask": mask}, threads)


def run_feed(path, feed: dict, threads: int = 2):
    """The model's one output, whatever its task (sentence_embedding or logits), on
    the inputs of `feed` that it declares."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run([sess.get_outputs()[0].name], {k: feed[k] for k in names})[0]


def quantize(src: Artifact, cfg: QuantizeConfig, ctx) -> Artifact:
    if cfg.dtype == "int8" and cfg.mode == "auto":
        raise StageError("quantize: mode auto is resolved by the build (it times every candidate on the target); "
                         "call the stage with mode dynamic or static")
    out = ctx.out
    for name in src.meta.get("tokenizer_files", []):
        shutil.copyfile(src.path / name, out / name)
    scratch = out / SCRATCH
    scratch.mkdir()
    try:
        if cfg.dtype == "fp16":
            precision, details = "fp16", to_fp16(src, out / "model.onnx")
        else:
            precision = "int8"
            write, details = int8_writer(src, cfg, ctx, scratch)
            write(out / "model.onnx")
            if cfg.fallback.enabled:
                details["fallback"] = fallback(src, cfg, ctx, write, out / "model.onnx", scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    feed = probe_feed(src.meta)
    agreement = compare(run_feed(out / "model.onnx", feed), run_feed(src.model_file, feed))
    from compress.graphstats import matmul_flops

    details["flops"] = matmul_flops(out / "model.onnx")
    log.info("quantize: %s, cosine to fp32 %.4f, int8 share of FLOPs %.3f", precision if cfg.dtype == "fp16"
             else f"{cfg.mode} int8", agreement["mean_cosine"], details["flops"]["int8_share"])
    how = {"mode": cfg.mode, "per_channel": cfg.per_channel} if cfg.dtype == "int8" else {}
    return seal(out, "onnx", {**src.meta, "parent": src.digest, "precision": precision,
                              "quantization": {**how, "dtype": cfg.dtype, **details, "agreement_random": agreement}})


def int8_writer(src: Artifact, cfg: QuantizeConfig, ctx, scratch: Path) -> tuple[Writer, dict]:
    """How cfg.mode writes int8 models, and what it records; the fallback calls
    the writer once per candidate, so a new mode only has to provide one."""
    if cfg.mode == "dynamic":
        return dynamic_writer(src, cfg), {"weights": "s8", "activations": "u8 (dynamic)"}
    if cfg.mode == "static" and src.meta.get("task") == "image-classification":  # Convs, calibrated on images
        from compress import vision

        return vision.static_writer(src, cfg, ctx.images.calibration if ctx.images else None, scratch)
    if cfg.mode == "static":
        return static_writer(src, cfg, list(ctx.calibration_texts), ctx.max_length, scratch)
    if cfg.mode == "qat":
        return qat_writer(src, cfg, ctx)
    raise StageError(f"quantize: mode {cfg.mode!r} has no int8 writer (known: dynamic, static, qat); set quantize.mode")


def qat_writer(src: Artifact, cfg: QuantizeConfig, ctx) -> tuple[Writer, dict]:
    """QAT trains one model; it has no per-node variants for the fallback to choose from."""
    from compress import qat

    details: dict = {}

    def write(model_out: Path, exclude: list[str] = (), only: list[str] | None = None) -> None:
        if exclude or only:
            raise StageError("quantize: mode qat cannot keep single MatMuls in fp32; set fallback.enabled: false")
        details.update(qat.quantize_aware(ctx.torch_source, ctx.teacher, cfg, ctx, model_out, fp32=src))
    return write, details


def dynamic_writer(src: Artifact, cfg: QuantizeConfig) -> Writer:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(model_out: Path, exclude: list[str] = (), only: list[str] | None = None) -> None:
        quantize_dynamic(
            str(src.model_file), str(model_out),
            weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
            nodes_to_quantize=list(only or []), nodes_to_exclude=list(exclude),
            # Shape inference cannot type some exporter outputs; they are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return write


class _Reader:
    """Feeds calibration inputs as packed rows of exactly `length` real tokens
    ([CLS] a [SEP] b [SEP] ...): histogram calibrators need one shape for every
    row, and padding would put activations the model never uses into the ranges."""

    def __init__(self, texts, tokenizer, length: int, inputs: list[str]):
        # BERT: [CLS] ... [SEP]; a causal LM (GPT-2, Llama): BOS/EOS where it has them
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        head = [first] if first is not None else []
        stream: list[int] = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream.extend(ids + ([sep] if sep is not None else []))
        body = length - len(head)
        self.rows = [np.array([head + stream[i:i + body]], dtype=np.int64)
                     for i in range(0, len(stream) - body + 1, body)] or \
            [np.array([head + stream[:body]], dtype=np.int64)]
        self.inputs = inputs
        self.i = 0

    def get_next(self):
        if self.i >= len(self.rows):
            return None
        ids = self.rows[self.i]
        self.i += 1
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        return {k: feed[k] for k in self.inputs}

    def rewind(self):
        self.i = 0


def static_writer(src: Artifact, cfg: QuantizeConfig, texts: list[str], max_length: int,
                  scratch: Path) -> tuple[Writer, dict]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static

    from compress.encoders import load_tokenizer

    if not texts:
        raise StageError("quantize: static quantization needs calibration inputs; set data.calibration or data.train")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    symmetric = cfg.flavour == "s8s8-symmetric"
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT, "ActivationSymmetric": symmetric, "WeightSymmetric": True}
    if cfg.calibration == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    inputs = [i.name for i in onnx.load(str(src.model_file), load_external_data=False).graph.input]
    reader = _Reader(texts, load_tokenizer(src.path), min(max_length, CALIBRATION_LENGTH), inputs)
    # Calibrate once: every later candidate (sensitivity, fallback) reads the ranges from here.
    cache = scratch / "calibration.json"

    def write(model_out: Path, exclude: list[str] = (), only: list[str] | None = None) -> None:
        reader.rewind()
        # ONNX Runtime's histogram calibrators print their progress to stdout,
        # which is the user's (compress build prints its results there).
        with contextlib.redirect_stdout(io.StringIO()):
            _quantize_static(
                str(src.model_file), str(model_out), reader, quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel, op_types_to_quantize=["MatMul"],
                nodes_to_quantize=list(only or []), nodes_to_exclude=list(exclude),
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, extra_options=extra, calibration_cache_path=cache)

    return write, {
        "weights": "s8 symmetric", "activations": "s8 symmetric (zero point 0)" if symmetric else "u8 asymmetric",
        "format": "QDQ", "calibration": cfg.calibration, "calibration_inputs": len(texts),
        "calibration_rows": len(reader.rows),
        **({"percentile": cfg.percentile} if cfg.calibration == "percentile" else {})}


# -- fp16 ---------------------------------------------------------------------

def to_fp16(src: Artifact, out_model: Path) -> dict:
    """Half-precision weights and arithmetic, fp32 inputs and outputs (keep_io_types).

    ONNX Runtime's CPU provider runs the result, but (1.32, x86-64, BERT graph)
    only LayerNormalization, one Gather and the data-movement ops (Reshape,
    Transpose, Expand, Identity, Shape) get fp16 kernels there: it wraps MatMul,
    Add, Mul, Sub, Div, Erf, Softmax (expanded), ReduceSum, ReduceL2 and the
    other Gathers in Casts and computes them in fp32. So the half-precision
    arithmetic a GPU runs is checked with onnx's reference evaluator, on a short
    input; ORT's CPU result is recorded beside it."""
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src.model_file)), keep_io_types=True)
    onnx.save(model, str(out_model))
    onnx.checker.check_model(model, full_check=True)
    vocab = src.meta.get("vocab_size", 30522)
    ids, mask = random_inputs(vocab)
    ort_cpu = compare(run_onnx(out_model, ids, mask), run_onnx(src.model_file, ids, mask))
    # The reference evaluator is plain numpy (fp16 matmuls without BLAS): keep the input short.
    ids, mask = random_inputs(vocab, batch=2, seq=16, seed=1)
    names = [i.name for i in model.graph.input]
    feed = {k: v for k, v in {"input_ids": ids, "attention_mask": mask}.items() if k in names}
    half = ReferenceEvaluator(model).run([ONNX_OUTPUT], feed)[0]
    reference = compare(half.astype(np.float32), run_onnx(src.model_file, ids, mask))
    for where, res in (("onnx.reference (fp16 arithmetic)", reference), ("onnxruntime CPU", ort_cpu)):
        if res["mean_cosine"] < FP16_MIN_COSINE:
            raise StageError(f"quantize: fp16 model disagrees with fp32 under {where}: mean cosine "
                             f"{res['mean_cosine']:.6f} (need >= {FP16_MIN_COSINE}); a value overflows half "
                             "precision: use dtype int8, or report the model")
    return {"weights": "fp16", "activations": "fp16", "io": "fp32 (keep_io_types)",
            "validation": {"reference_fp16": reference, "onnxruntime_cpu": ort_cpu}}


# -- sensitivity and fallback ----------------------------------------------------

LAYER = re.compile(r"layers?[._/](\d+)")


def quantizable_nodes(model_path: Path, mode: str) -> list[dict]:
    """The MatMuls cfg.mode quantizes, in graph order: those with a weight
    initializer (dynamic), every MatMul (static QDQ also quantizes the attention
    products). Other op types (fused attention, Gather) are left alone."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name:
            continue  # nodes_to_exclude works by name
        has_weight = any(i in weights for i in node.input)
        if mode == "static" or has_weight:
            m = LAYER.search(node.name)
            nodes.append({"node": node.name, "layer": int(m.group(1)) if m else None, "weight": has_weight})
    return nodes


def _rows(src: Artifact, tokenizer, texts: list[str], max_length: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `rows` packed rows of real tokens, or random tokens when there are no texts."""
    if not texts:
        return random_inputs(src.meta.get("vocab_size", 30522), batch=rows)
    reader = _Reader(texts, tokenizer, min(max_length, CALIBRATION_LENGTH), ["input_ids"])
    ids = np.concatenate(reader.rows[:rows])
    return ids, np.ones_like(ids)


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return compare(a, b)["mean_cosine"]


def sensitivity(src: Artifact, nodes: list[dict], cfg: QuantizeConfig, write: Writer, quantized: Path, feeds,
                scratch: Path) -> list[dict]:
    """Per node: 1 - mean cosine(output with only this node in int8, fp32 output).
    For small errors these roughly add up to 1 - the all-int8 agreement.

    simulated: one session instead of one quantization per node. The fp32 graph
    gets a gate per node that switches its MatMul's inputs to the values ONNX
    Runtime's int8 model (`quantized`) gives it: its dequantized weights, and its
    activations through the same quantize/dequantize pair (DynamicQuantizeLinear,
    or the calibrated QuantizeLinear). That is exact int8 arithmetic (it matches
    onnx's reference evaluator on the int8 model to ~1e-7), as VNNI CPUs, ARM and
    TensorRT compute it; ORT's u8s8 kernel on an AVX2 CPU without VNNI saturates
    int16 sums and lands further from fp32, which only `onnxruntime` sees: each
    node quantized alone by `write` and run here (also the path for nodes whose
    int8 form is not recognised)."""
    import onnxruntime as ort

    ids, mask = feeds
    model, gates = onnx.load(str(src.model_file)), {}
    if cfg.fallback.sensitivity == "simulated":
        model, gates = switchable(model, onnx.load(str(quantized)), nodes, cfg.mode)
    path = scratch / "switchable.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    base = {k: v for k, v in {"input_ids": ids, "attention_mask": mask}.items() if k in names}
    off = {g: np.zeros((), np.float32) for g in gates.values()}
    reference = sess.run([ONNX_OUTPUT], {**base, **off})[0]
    one = scratch / "one-node.onnx"
    ranked = []
    for item in nodes:
        gate = gates.get(item["node"])
        if gate is not None:
            out = sess.run([ONNX_OUTPUT], {**base, **off, gate: np.ones((), np.float32)})[0]
        else:
            write(one, only=[item["node"]])
            out = run_onnx(one, ids, mask)
        ranked.append({**item, "sensitivity": max(0.0, 1.0 - _mean_cosine(out, reference)),
                       "measured": "simulated" if gate is not None else "onnxruntime"})
    return sorted(ranked, key=lambda r: -r["sensitivity"])


def switchable(model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: list[dict],
               mode: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """`model` with a scalar float input per node (gate 1: the node sees its int8
    values, gate 0: fp32), and {node: gate input}, for the nodes recognised in `quantized`."""
    from onnx import helper, numpy_helper

    graph = model.graph
    qinit = {t.name: t for t in quantized.graph.initializer}
    qnodes = {n.name: n for n in quantized.graph.node}
    qprod = {o: n for n in quantized.graph.node for o in n.output}
    have = {t.name for t in graph.initializer}
    wanted = {n["node"] for n in nodes}
    gates: dict[str, str] = {}
    body = []
    for node in graph.node:
        rounded = _int8_inputs(node, mode, qnodes, qprod, qinit) if node.name in wanted else None
        if rounded:
            gate = f"int8_gate_{len(gates)}"
            gates[node.name] = gate
            graph.input.append(helper.make_tensor_value_info(gate, onnx.TensorProto.FLOAT, []))
            for k, how in rounded.items():
                if k == "out":
                    continue
                t = node.input[k]
                prefix = f"{gate}/in{k}"
                if how[0] == "weight":
                    graph.initializer.append(numpy_helper.from_array(how[1], f"{prefix}/rounded"))
                    r = f"{prefix}/rounded"
                elif how[0] == "dynamic":
                    body += [helper.make_node("DynamicQuantizeLinear", [t], [f"{prefix}/q", f"{prefix}/s", f"{prefix}/z"]),
                             helper.make_node("DequantizeLinear", [f"{prefix}/q", f"{prefix}/s", f"{prefix}/z"],
                                              [f"{prefix}/rounded"])]
                    r = f"{prefix}/rounded"
                else:  # static: the calibrated QuantizeLinear and its DequantizeLinear, as in `quantized`
                    qn, dq = how[1], how[2]
                    for name in [*qn.input[1:], *dq.input[1:]]:
                        if name not in have:
                            graph.initializer.append(qinit[name])
                            have.add(name)
                    body += [helper.make_node("QuantizeLinear", [t, *qn.input[1:]], [f"{prefix}/q"]),
                             helper.make_node("DequantizeLinear", [f"{prefix}/q", *dq.input[1:]], [f"{prefix}/rounded"])]
                    body[-2].attribute.extend(qn.attribute)
                    body[-1].attribute.extend(dq.attribute)
                    r = f"{prefix}/rounded"
                # x + gate * (rounded - x): exactly x at gate 0
                body += [helper.make_node("Sub", [r, t], [f"{prefix}/delta"]),
                         helper.make_node("Mul", [f"{prefix}/delta", gate], [f"{prefix}/gated"]),
                         helper.make_node("Add", [t, f"{prefix}/gated"], [f"{prefix}/x"])]
                node.input[k] = f"{prefix}/x"
        body.append(node)
        if rounded and "out" in rounded:  # static QDQ also rounds the product on its way out
            qn, dq = rounded["out"][1], rounded["out"][2]
            for name in [*qn.input[1:], *dq.input[1:]]:
                if name not in have:
                    graph.initializer.append(qinit[name])
                    have.add(name)
            t, prefix = node.output[0], f"{gates[node.name]}/out"
            node.output[0] = f"{prefix}/raw"
            body += [helper.make_node("QuantizeLinear", [f"{prefix}/raw", *qn.input[1:]], [f"{prefix}/q"]),
                     helper.make_node("DequantizeLinear", [f"{prefix}/q", *dq.input[1:]], [f"{prefix}/rounded"]),
                     helper.make_node("Sub", [f"{prefix}/rounded", f"{prefix}/raw"], [f"{prefix}/delta"]),
                     helper.make_node("Mul", [f"{prefix}/delta", gates[node.name]], [f"{prefix}/gated"]),
                     helper.make_node("Add", [f"{prefix}/raw", f"{prefix}/gated"], [t])]
            body[-5].attribute.extend(qn.attribute)
            body[-4].attribute.extend(dq.attribute)
    del graph.node[:]
    graph.node.extend(body)
    return model, gates


def _int8_inputs(node, mode: str, qnodes: dict, qprod: dict, qinit: dict) -> dict | None:
    """{input index: how it is rounded in the int8 model} for one fp32 MatMul, or
    None when its int8 form is not the one ONNX Runtime's quantizers write."""
    from onnx import numpy_helper

    def dequantize(q, scale, zero, axis: int = 1):
        q, scale = numpy_helper.to_array(q).astype(np.float32), numpy_helper.to_array(scale)
        zero = numpy_helper.to_array(zero).astype(np.float32) if zero is not None else np.zeros_like(scale)
        shape = [1] * q.ndim
        if scale.ndim:
            shape[axis] = -1
        return ((q - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)

    if mode == "dynamic":
        # ORT writes `<name>_quant` = MatMulInteger(activation_quantized, weight_quantized, zps);
        # its weight scale is `<weight>_scale`.
        q = qnodes.get(node.name + "_quant")
        if q is None or q.op_type != "MatMulInteger" or q.input[1] not in qinit:
            return None
        scale = qinit.get(q.input[1].removesuffix("_quantized") + "_scale")
        if scale is None or len(q.input) < 4 or q.input[3] not in qinit:
            return None
        return {0: ("dynamic",), 1: ("weight", dequantize(qinit[q.input[1]], scale, qinit[q.input[3]], axis=1))}
    q = qnodes.get(node.name)
    if q is None or q.op_type != "MatMul":
        return None
    rounded = {}
    for k, name in enumerate(q.input[:2]):
        dq = qprod.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue  # this input stays float
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if dq.input[0] in qinit:
            zero = qinit.get(dq.input[2]) if len(dq.input) > 2 else None
            rounded[k] = ("weight", dequantize(qinit[dq.input[0]], qinit[dq.input[1]], zero, axis))
        else:
            qn = qprod.get(dq.input[0])
            if qn is None or qn.op_type != "QuantizeLinear" or any(i not in qinit for i in [*qn.input[1:], *dq.input[1:]]):
                return None
            rounded[k] = ("static", qn, dq)
    # ...and may quantize the product itself (QuantizeLinear -> DequantizeLinear on the output)
    after = [n for n in qnodes.values() if q.output[0] in n.input]
    if rounded and len(after) == 1 and after[0].op_type == "QuantizeLinear":
        dq = [n for n in qnodes.values() if after[0].output[0] in n.input]
        if len(dq) != 1 or dq[0].op_type != "DequantizeLinear" or \
                any(i not in qinit for i in [*after[0].input[1:], *dq[0].input[1:]]):
            return None
        rounded["out"] = ("static", after[0], dq[0])
    return rounded or None


def fallback(src: Artifact, cfg: QuantizeConfig, ctx, write: Writer, model: Path, scratch: Path) -> dict:
    """Keep the most sensitive nodes in fp32, one more per step, until the check
    passes or fallback.max_fp32 is spent; then `model` holds the chosen candidate.
    An exhausted budget is recorded, not raised: the build's gates decide."""
    from compress.encoders import load_tokenizer

    fb = cfg.fallback
    tokenizer = load_tokenizer(src.path)
    check, threshold = quality_check(src, cfg, ctx, tokenizer)
    nodes = quantizable_nodes(src.model_file, cfg.mode)
    texts = list(ctx.calibration_texts) or list(ctx.validation_texts)
    feeds = _rows(src, tokenizer, texts, ctx.max_length, fb.rows)
    start = time.perf_counter()
    ranked = sensitivity(src, nodes, cfg, write, model, feeds, scratch)
    seconds = time.perf_counter() - start
    log.info("quantize: sensitivity of %d nodes on %d rows in %.1fs; most sensitive %s (%.2e)", len(ranked),
             len(feeds[0]), seconds, ranked[0]["node"] if ranked else "-", ranked[0]["sensitivity"] if ranked else 0)

    candidates = [model]
    ok, info = check(model)
    steps = [{"fp32": [], "passed": ok, **info}]
    budget = min(fb.max_fp32, len(ranked))
    while not ok and len(steps) <= budget:
        keep = [r["node"] for r in ranked[:len(steps)]]
        candidate = scratch / f"fp32-{len(keep)}.onnx"
        write(candidate, exclude=keep)
        ok, info = check(candidate)
        steps.append({"fp32": keep, "passed": ok, **info})
        candidates.append(candidate)
        log.info("quantize: fallback keeps %d node(s) in fp32 (%s): %s", len(keep), keep[-1],
                 "passed" if ok else "still failing")
    chosen = len(steps) - 1 if ok else max(range(len(steps)), key=lambda i: steps[i]["score"])
    latency = fallback_latency(candidates[0], candidates[chosen], src) if chosen else None
    if candidates[chosen] != model:
        shutil.copyfile(candidates[chosen], model)
    status = ("not needed" if len(steps) == 1 else "passed") if ok else "exhausted"
    if status == "exhausted":
        log.warning("quantize: fallback budget of %d fp32 node(s) spent and the %s check still fails; keeping the "
                    "best candidate (step %d); the build's gates decide", budget, fb.metric, chosen)
    return {"metric": fb.metric, "threshold": threshold, "status": status, "max_fp32": fb.max_fp32,
            "fp32_nodes": steps[chosen]["fp32"], "chosen_step": chosen, "steps": steps,
            "sensitivity": ranked, "sensitivity_rows": int(len(feeds[0])),
            "sensitivity_seconds": round(seconds, 3),
            # What keeping nodes in fp32 costs: FLOPs in this stage's flops.int8_share, time here.
            "latency_cost": latency}


FALLBACK_TIMING_RUNS = 40


def fallback_latency(all_int8: Path, kept: Path, src: Artifact) -> dict:
    """p50 of the model with nodes kept in fp32 over the all-int8 model, timed in
    one run (alternating blocks, one session alive at a time, ORT_ENABLE_ALL)."""
    from compress import bench

    cond = bench.Conditions(warmup=5, runs=FALLBACK_TIMING_RUNS, rounds=4, measure_rss=False,
                            vocab_size=src.meta.get("vocab_size", 30522))
    result = bench.run([bench.BenchModel("fp32-kept", "onnx", str(kept)), bench.BenchModel("all-int8", "onnx", str(all_int8))],
                       cond, reference="all-int8")
    ratio = result["ratios"]["fp32-kept/all-int8"]
    return {"p50_ratio": ratio["p50"], "spread": ratio["spread"],
            "at": {"batch": cond.batch, "seq_len": cond.seq_len, "threads": cond.threads}}


def quality_check(src: Artifact, cfg: QuantizeConfig, ctx, tokenizer) -> tuple[Callable[[Path], tuple[bool, dict]], object]:
    """check(model) -> (passed, {"score": margin over the threshold (>= 0 passes), ...}), and the threshold."""
    fb = cfg.fallback
    if fb.metric == "retention":
        if ctx.accept is None:
            raise StageError("quantize: fallback.metric retention needs the build's gates, and this build has none; "
                             "set gates.retention (or gates.fidelity), or use fallback.metric: agreement")
        return ctx.accept, "gates"
    texts = list(ctx.validation_texts) or list(ctx.calibration_texts)
    feeds = _sentences(src, tokenizer, texts, ctx.max_length)
    reference = run_onnx(src.model_file, *feeds)

    def check(model: Path) -> tuple[bool, dict]:
        agreement = _mean_cosine(run_onnx(model, *feeds), reference)
        return agreement >= fb.min_agreement, {"agreement": agreement, "score": agreement - fb.min_agreement}
    return check, fb.min_agreement


def _sentences(src: Artifact, tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out inputs one sentence per row, padded, as eval runs them (random tokens without texts)."""
    if not texts:
        return random_inputs(src.meta.get("vocab_size", 30522))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
