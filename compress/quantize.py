"""Stage `quantize`: fp32 ONNX -> int8 ONNX.

dynamic: ONNX Runtime's dynamic quantization (int8 weights, activations
quantized per run). static: QDQ with activation ranges calibrated on real
inputs (minmax, entropy or percentile), in the flavour the target wants (u8s8
for x86 VNNI and ARM, symmetric s8s8 with zero point 0 for TensorRT). The
quantized model is compared with its input and the agreement recorded.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx

from compress.artifact import Artifact, seal
from compress.errors import StageError
from compress.encoders import ONNX_OUTPUT
from compress.export import compare, random_inputs
from compress.recipe import QuantizeConfig

log = logging.getLogger(__name__)

VERSION = 2  # 2: meta records the int8 FLOP share
CALIBRATION_LENGTH = 128  # tokens per packed calibration row


def run_onnx(path, ids, mask, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {"input_ids": ids, "attention_mask": mask}
    # The model's one output, whatever its task: sentence_embedding or logits.
    return sess.run([sess.get_outputs()[0].name], {k: feed[k] for k in names})[0]


def quantize(src: Artifact, cfg: QuantizeConfig, ctx) -> Artifact:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if cfg.mode == "auto":
        raise StageError("quantize: mode auto is resolved by the build (it times every candidate on the target); "
                         "call the stage with mode dynamic or static")
    out = ctx.out
    for name in src.meta.get("tokenizer_files", []):
        shutil.copyfile(src.path / name, out / name)
    if cfg.mode == "static":
        details = quantize_static_qdq(src, cfg, list(ctx.calibration_texts), out / "model.onnx", ctx.max_length)
    else:
        quantize_dynamic(
            str(src.model_file), str(out / "model.onnx"),
            weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
            # Shape inference cannot type some exporter outputs; they are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        details = {"weights": "s8", "activations": "u8 (dynamic)"}
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    ids, mask = random_inputs(src.meta.get("vocab_size", 30522))
    agreement = compare(run_onnx(out / "model.onnx", ids, mask), run_onnx(src.model_file, ids, mask))
    from compress.graphstats import matmul_flops

    details["flops"] = matmul_flops(out / "model.onnx")
    log.info("quantize: %s int8, cosine to fp32 %.4f, int8 share of FLOPs %.3f", cfg.mode,
             agreement["mean_cosine"], details["flops"]["int8_share"])
    return seal(out, "onnx", {**src.meta, "parent": src.digest, "precision": "int8",
                              "quantization": {"mode": cfg.mode, "dtype": cfg.dtype, "per_channel": cfg.per_channel,
                                               **details, "agreement_random": agreement}})


class _Reader:
    """Feeds calibration inputs as packed rows of exactly `length` real tokens
    ([CLS] a [SEP] b [SEP] ...): histogram calibrators need one shape for every
    row, and padding would put activations the model never uses into the ranges."""

    def __init__(self, texts, tokenizer, length: int, inputs: list[str]):
        stream: list[int] = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream.extend(ids + [tokenizer.sep_token_id])
        body = length - 1
        self.rows = [np.array([[tokenizer.cls_token_id] + stream[i:i + body]], dtype=np.int64)
                     for i in range(0, len(stream) - body + 1, body)] or \
            [np.array([[tokenizer.cls_token_id] + stream[:body]], dtype=np.int64)]
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


def quantize_static_qdq(src: Artifact, cfg: QuantizeConfig, texts: list[str], out_model: Path, max_length: int) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

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
    quantize_static(
        str(src.model_file), str(out_model), reader, quant_format=QuantFormat.QDQ,
        per_channel=cfg.per_channel, op_types_to_quantize=["MatMul"],
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=method, extra_options=extra)
    return {"weights": "s8 symmetric", "activations": "s8 symmetric (zero point 0)" if symmetric else "u8 asymmetric",
            "format": "QDQ", "calibration": cfg.calibration, "calibration_inputs": len(texts),
            "calibration_rows": len(reader.rows),
            **({"percentile": cfg.percentile} if cfg.calibration == "percentile" else {})}
