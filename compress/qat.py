"""Quantization-aware training: the torch student fine-tuned with int8 fake
quantization in the loop, then exported as an ONNX QDQ model.

Called by the quantize stage for `mode: qat` (and meant for a fallback when
post-training int8 misses a gate). Every nn.Linear of the encoder layers sees
int8 weights and int8/uint8 inputs while the student re-learns the teacher's
features (compress.distill.train); the export turns each fake quantizer into a
QuantizeLinear/DequantizeLinear pair that ONNX Runtime fuses into integer MatMuls.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from compress import layouts
from compress.artifact import Artifact
from compress.errors import StageError
from compress.recipe import DistillConfig, QuantizeConfig

log = logging.getLogger(__name__)

VERSION = 1
# Adam moves every parameter by about lr per step. A range lives in log space
# and must be able to move by a few percent a step to settle within a few
# hundred steps, whatever qat_lr the weights use: its speed is RANGE_STEP / qat_lr
# times theirs (3%: measured on the planted-outlier test, 0.5% barely moved).
RANGE_STEP = 3e-2
# The exported QDQ graph and the torch fake-quant model compute the same grid;
# they differ only where float summation order flips a rounding, so on the
# normalized embedding they agree far better than this.
MIN_COSINE_TO_TORCH = 0.999
ORT_INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
                   "DynamicQuantizeLinear", "QGemm")


@lru_cache(maxsize=None)
def _fake_quant_linear():
    """The wrapper class, built on first use so that importing compress stays light."""
    import torch
    import torch.nn.functional as F

    class FakeQuantLinear(torch.nn.Module):
        """nn.Linear with int8 fake quantization of its weight (symmetric, per
        output channel or per tensor) and of its input (per tensor: uint8 with a
        zero point for u8s8, int8 with zero point 0 for s8s8-symmetric).

        Input ranges start from percentile calibration and are then learned
        (LSQ: the straight-through estimator gives the loss's gradient with
        respect to the scale). Learned rather than fixed, because the weights
        move during QAT and the best clipping point moves with them; learned
        rather than EMA-tracked, because a min/max EMA follows exactly the
        outliers that percentile calibration chose to clip.
        """

        def __init__(self, linear: torch.nn.Linear, symmetric: bool, per_channel: bool, lr: float,
                     weight_max: int = 127):
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias
            self.symmetric, self.per_channel = symmetric, per_channel
            self.weight_max = weight_max
            self.qmin, self.qmax = (-128, 127) if symmetric else (0, 255)
            self.speed = RANGE_STEP / lr
            self.log_scale = torch.nn.Parameter(torch.zeros(()))
            self.register_buffer("init_scale", torch.ones(()))
            self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
            self.observed: list[tuple[float, float]] | None = None
            self.percentile = 99.99
            # Set by freeze(): scales as constants, so the export holds initializers, not the ops computing them.
            self.register_buffer("frozen_act_scale", None)
            self.register_buffer("frozen_weight_scale", None)

        def act_scale(self):
            return self.init_scale * torch.exp(self.speed * self.log_scale)

        def weight_scale(self):
            w = self.weight.detach().t()
            if self.per_channel:
                return w.abs().amax(dim=0).clamp(min=1e-8) / self.weight_max
            return (w.abs().amax().clamp(min=1e-8) / self.weight_max).reshape(1)

        def freeze(self) -> None:
            """Fix the current scales for export (after training)."""
            with torch.no_grad():
                self.frozen_act_scale = self.act_scale().detach().reshape(1).clone()
                self.frozen_weight_scale = self.weight_scale().clone()

        def quantized_weight_t(self):
            """The weight, transposed to [in, out], fake-quantized symmetric int8.

            Transposed before quantizing so that the exported graph reads
            DequantizeLinear -> MatMul directly (a Transpose between them hides
            the pair from ONNX Runtime's QDQ fusion and from graphstats). The
            scale follows the weight as it trains; the grid is symmetric (±127,
            or ±63 with reduce_range) so that zero point 0 holds for TensorRT too."""
            w = self.weight.t()
            scale = self.frozen_weight_scale if self.frozen_weight_scale is not None else self.weight_scale()
            zero = torch.zeros(scale.shape, dtype=torch.int32)
            if self.per_channel:
                return torch.fake_quantize_per_channel_affine(w, scale, zero, 1, -128, 127)
            return torch.fake_quantize_per_tensor_affine(w, scale, zero, -128, 127)

        def quantized_input(self, x):
            if not self.training:
                # The op the exporter turns into QuantizeLinear -> DequantizeLinear.
                scale = self.frozen_act_scale if self.frozen_act_scale is not None else self.act_scale().detach()
                return torch.fake_quantize_per_tensor_affine(
                    x, scale.reshape(1), self.zero_point.reshape(1), self.qmin, self.qmax)
            scale = self.act_scale()
            # LSQ: round with a straight-through gradient; the clamp passes no
            # gradient to x outside the range, but scale gets one from both sides.
            v = x / scale + self.zero_point
            v = v + (v.round() - v).detach()
            return (v.clamp(self.qmin, self.qmax) - self.zero_point) * scale

        def observe(self, x) -> None:
            """Percentile range of this input on one calibration row."""
            flat = x.detach().float().reshape(-1)
            p = self.percentile / 100
            self.observed.append((float(torch.quantile(flat, 1 - p)), float(torch.quantile(flat, p))))

        def set_range(self) -> None:
            """Ranges averaged over calibration rows: memory stays one row's worth,
            where one percentile over all rows would hold every activation at once."""
            lo = min(float(np.mean([o[0] for o in self.observed])), 0.0)
            hi = max(float(np.mean([o[1] for o in self.observed])), 0.0)
            if self.symmetric:
                scale, zero = max(-lo, hi) / 127, 0
            else:
                scale = (hi - lo) / 255
                zero = int(np.clip(round(-lo / max(scale, 1e-12)), 0, 255))
            self.init_scale.fill_(max(scale, 1e-8))
            self.zero_point.fill_(zero)
            self.log_scale.data.zero_()
            self.observed = None

        def forward(self, x):
            if self.observed is not None:  # calibrating: float, only watching
                self.observe(x)
                return F.linear(x, self.weight, self.bias)
            y = torch.matmul(self.quantized_input(x), self.quantized_weight_t())
            return y + self.bias if self.bias is not None else y

    return FakeQuantLinear


def wrap_linears(model, cfg: QuantizeConfig, lr: float) -> list:
    """Replace every nn.Linear inside the encoder layers with a FakeQuantLinear
    (in place); returns the wrappers."""
    import torch

    cls = _fake_quant_linear()
    symmetric = cfg.flavour == "s8s8-symmetric"
    # x86 CPUs without VNNI (AVX2) multiply u8 x s8 with vpmaddubsw, which adds
    # pairs of products in saturating int16: 2 x 255 x 127 overflows, 2 x 255 x 63
    # does not. With 7-bit weights ONNX Runtime computes exactly what QAT trained.
    # s8s8 on AVX2 runs the same kernel after shifting activations to u8.
    weight_max = 63 if cfg.qat_reduce_range else 127
    wrappers = []
    for layer in layouts.blocks(model):
        for name, module in list(layer.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear:
                    w = cls(child, symmetric, cfg.per_channel, lr, weight_max)
                    w.percentile = cfg.percentile
                    setattr(module, child_name, w)
                    wrappers.append(w)
    return wrappers


def calibrate(model, wrappers: list, texts: list[str], tokenizer, length: int) -> int:
    """Initial input ranges from calibration rows (the same packed rows static
    quantization calibrates on, so PTQ and QAT start from comparable data)."""
    import torch

    from compress.models import make_sentence_encoder
    from compress.quantize import _Reader

    if not texts:
        raise StageError("quantize: qat needs calibration inputs for its initial ranges; "
                         "set data.calibration or data.train")
    reader = _Reader(texts, tokenizer, length, ["input_ids", "attention_mask"])
    enc = make_sentence_encoder(model).eval()
    for w in wrappers:
        w.observed = []
    with torch.inference_mode():
        for row in reader.rows:
            ids = torch.from_numpy(row)
            enc(ids, torch.ones_like(ids))
    for w in wrappers:
        w.set_range()
    return len(reader.rows)


def _layer_map(student_art: Artifact, student, teacher) -> list[int]:
    """Which teacher layer each student layer learns from."""
    layers = student_art.meta.get("layers")
    n_s, n_t = len(layouts.blocks(student)), len(layouts.blocks(teacher))
    if layers is None and n_s == n_t:
        layers = list(range(n_t))  # the teacher itself is being quantized
    if layers is None or len(layers) != n_s or any(not 0 <= i < n_t for i in layers):
        raise StageError(f"quantize: qat cannot map the {n_s} student layers of {student_art.path} onto the "
                         f"teacher's {n_t} (meta layers: {layers}); quantize a distilled student or the teacher itself")
    return list(layers)


def export_qdq(model, out_model: Path, opset: int) -> None:
    """The TorchScript exporter, with export.py's inputs, outputs and dynamic axes."""
    import onnx
    import torch

    from compress.encoders import ONNX_INPUTS, ONNX_OUTPUT
    from compress.models import make_sentence_encoder

    module = make_sentence_encoder(model).eval()
    dummy = (torch.full((2, 16), 1000, dtype=torch.long), torch.ones((2, 16), dtype=torch.long))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            ONNX_OUTPUT: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer notes
        torch.onnx.export(module, dummy, str(out_model), input_names=list(ONNX_INPUTS), output_names=[ONNX_OUTPUT],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    model_proto = onnx.load(str(out_model))
    constants_as_initializers(model_proto.graph)
    folded = fold_weight_quantizers(model_proto)
    onnx.save(model_proto, str(out_model))
    log.info("qat: exported QDQ graph, %d weights stored as int8", folded)


def constants_as_initializers(graph) -> None:
    """Constant nodes become initializers and an Identity of an initializer is
    bypassed (the exporter writes shared zero points and scales that way), so
    every QDQ scale and zero point is an initializer, as QDQ consumers expect."""
    from onnx import numpy_helper

    init = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    drop = []
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value" \
                and node.output[0] not in outputs:
            tensor = numpy_helper.to_array(node.attribute[0].t)
            graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
            init.add(node.output[0])
            drop.append(index)
        elif node.op_type == "Identity" and node.input[0] in init and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            drop.append(index)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    for index in reversed(drop):
        del graph.node[index]


def fold_weight_quantizers(model) -> int:
    """QuantizeLinear on a float initializer -> an int8 initializer feeding its
    DequantizeLinear directly: the file stores int8 weights (4x smaller) and the
    graph has the same form as ONNX Runtime's static QDQ output."""
    from onnx import numpy_helper

    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    folded = []
    for index, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear" or not all(i in init for i in node.input[:3]):
            continue
        w, scale, zero = (numpy_helper.to_array(init[i]) for i in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:  # per channel: broadcast along axis
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        # ONNX QuantizeLinear rounds half to even, as np.rint does
        q = np.clip(np.rint(w / scale) + zero.astype(np.int32), info.min, info.max).astype(zero.dtype)
        name = node.input[0] + "_quantized"
        graph.initializer.append(numpy_helper.from_array(q, name))
        for other in graph.node:
            for k, inp in enumerate(other.input):
                if inp == node.output[0]:
                    other.input[k] = name
        folded.append(index)
    for index in reversed(folded):
        del graph.node[index]
    still_used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name in init and t.name not in still_used]:
        graph.initializer.remove(t)  # the float weights just folded, and nothing else reads them
    return len(folded)


def linear_matmuls(path: Path) -> dict:
    """The MatMuls that carry a weight (one operand from a DequantizeLinear of an
    initializer, or a float initializer): how many, and how many have both
    operands out of DequantizeLinear, i.e. run as int8 in ONNX Runtime."""
    import onnx

    graph = onnx.load(str(path)).graph
    init = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def weight(name):
        if name in init:
            return True
        node = producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in init

    def dq(name):
        node = producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    linear = [n for n in graph.node if n.op_type == "MatMul" and weight(n.input[1])]
    both = [n for n in linear if dq(n.input[0]) and dq(n.input[1])]
    return {"linear": len(linear), "int8": len(both),
            "gemm": sum(n.op_type == "Gemm" for n in graph.node)}


def ort_kernels(path: Path, workdir: Path) -> dict:
    """Op counts of the graph ONNX Runtime actually runs (optimized, saved with
    optimized_model_filepath): shows the QDQ pairs became integer kernels. The
    QDQ fusions are extended-level; above it ORT saves machine-specific layouts."""
    import onnx
    import onnxruntime as ort

    saved = workdir / "qat-ort-optimized.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(saved)
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(saved)).graph.node)
    saved.unlink()
    return {"integer": {k: ops[k] for k in ORT_INTEGER_OPS if ops[k]},
            "float_matmul": ops["MatMul"] + ops["FusedMatMul"]}


def quantize_aware(torch_art: Artifact | None, teacher_art: Artifact | None, cfg: QuantizeConfig, ctx,
                   out_model: Path, fp32: Artifact | None = None) -> dict:
    """QAT of `torch_art` towards `teacher_art`, exported to `out_model` as QDQ
    ONNX and checked against the torch fake-quant model; returns details for meta.
    `fp32` is the ONNX export of `torch_art` when there is one (its opset is kept)."""
    import onnx
    import torch

    from compress.distill import train
    from compress.encoders import load_tokenizer
    from compress.export import compare, random_inputs
    from compress.models import load_hf_encoder, make_sentence_encoder
    from compress.quantize import CALIBRATION_LENGTH, run_onnx

    if torch_art is None or torch_art.kind != "torch":
        raise StageError(f"quantize: qat needs the torch student the ONNX model came from, got "
                         f"{'none' if torch_art is None else torch_art.kind}; use an hf: teacher, or mode: static")
    if teacher_art is None or teacher_art.kind != "torch":
        raise StageError(f"quantize: qat distills from a torch teacher, got "
                         f"{'none' if teacher_art is None else teacher_art.kind}; use an hf: teacher, or mode: static")
    if fp32 is not None and fp32.meta.get("parent") not in (None, torch_art.digest):
        raise StageError(f"quantize: qat was given torch source {torch_art.digest[:12]}, but the ONNX model came from "
                         f"{fp32.meta['parent'][:12]}; the pipeline must pass the artifact export read")
    opset = fp32.meta.get("opset", 17) if fp32 is not None else 17
    student = load_hf_encoder(torch_art.path)
    teacher = load_hf_encoder(teacher_art.path)
    layers = _layer_map(torch_art, student, teacher)
    tokenizer = load_tokenizer(torch_art.path)

    torch.manual_seed(cfg.qat_seed)
    wrappers = wrap_linears(student, cfg, cfg.qat_lr)
    rows = calibrate(student, wrappers, list(ctx.calibration_texts), tokenizer,
                     min(ctx.max_length, CALIBRATION_LENGTH))
    start_scales = [float(w.act_scale().detach()) for w in wrappers]
    # fp32, not bf16 autocast: in bf16 the values fed to the fake quantizers are
    # already rounded to 8 mantissa bits, so training would not see the int8
    # grid the exported model computes on.
    dcfg = DistillConfig(losses=["feature"], max_steps=cfg.qat_steps, batch_size=cfg.qat_batch_size,
                         lr=cfg.qat_lr, warmup=0.1, weight_decay=0.0, bf16=False, seed=cfg.qat_seed)
    stats = train(student, teacher, layers, list(ctx.train_texts), tokenizer, dcfg, ctx.progress, desc="qat")
    student.eval()
    for w in wrappers:
        w.freeze()
    moved = [float(w.frozen_act_scale) / s for w, s in zip(wrappers, start_scales)]

    export_qdq(student, out_model, opset)
    onnx.checker.check_model(onnx.load(str(out_model)), full_check=True)
    linear = linear_matmuls(out_model)
    if linear["int8"] != linear["linear"] or linear["linear"] != len(wrappers):
        raise StageError(f"quantize: qat export has {linear['int8']} int8 of {linear['linear']} weight MatMuls "
                         f"(expected {len(wrappers)}, one per Linear); report the model and use mode: static")

    ids, mask = random_inputs(student.config.vocab_size)
    with torch.inference_mode():
        ref = make_sentence_encoder(student).eval()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    to_torch = compare(run_onnx(out_model, ids, mask), ref)
    if to_torch["mean_cosine"] < MIN_COSINE_TO_TORCH:
        raise StageError(f"quantize: qat QDQ ONNX disagrees with its torch fake-quant model: mean cosine "
                         f"{to_torch['mean_cosine']:.5f} (need >= {MIN_COSINE_TO_TORCH}); on x86 without VNNI keep "
                         "qat_reduce_range: true, otherwise report the model")
    kernels = ort_kernels(out_model, Path(out_model).parent)
    log.info("qat: %d steps, loss %.4f -> %.4f; ONNX vs torch fake-quant cosine %.5f; ORT integer ops %s",
             stats["steps"], stats["loss_first"], stats["loss_last"], to_torch["mean_cosine"], kernels["integer"])
    symmetric = cfg.flavour == "s8s8-symmetric"
    weight_bits = 7 if wrappers[0].weight_max == 63 else 8
    return {"weights": f"s8 symmetric ({weight_bits}-bit)" + (" per channel" if cfg.per_channel else " per tensor"),
            "activations": "s8 symmetric (zero point 0)" if symmetric else "u8 asymmetric",
            "format": "QDQ", "qat": {
                "version": VERSION, "steps": stats["steps"], "loss_first": stats["loss_first"],
                "loss_last": stats["loss_last"], "lr": cfg.qat_lr, "layers": layers,
                "calibration": "percentile", "percentile": cfg.percentile, "calibration_rows": rows,
                "ranges": "learned (LSQ)", "range_change": {"min": min(moved), "max": max(moved)},
                "linear_matmuls": linear, "onnx_vs_torch_fake_quant": to_torch, "ort_kernels": kernels}}
