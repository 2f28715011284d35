"""Stage `quantize`: fp32 ONNX -> int8 ONNX.

This version is ONNX Runtime's dynamic quantization (int8 weights, activations
quantized per run), which suits the x86-64 VNNI kernels. The quantized model is
compared with its input on random tokens and the agreement recorded.
"""

from __future__ import annotations

import logging
import shutil

import onnx

from compress.artifact import Artifact, seal
from compress.encoders import ONNX_OUTPUT
from compress.export import compare, random_inputs
from compress.recipe import QuantizeConfig

log = logging.getLogger(__name__)

VERSION = 1


def run_onnx(path, ids, mask, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {"input_ids": ids, "attention_mask": mask}
    return sess.run([ONNX_OUTPUT], {k: feed[k] for k in names})[0]


def quantize(src: Artifact, cfg: QuantizeConfig, ctx) -> Artifact:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = ctx.out
    for name in src.meta.get("tokenizer_files", []):
        shutil.copyfile(src.path / name, out / name)
    quantize_dynamic(
        str(src.model_file), str(out / "model.onnx"),
        weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
        # Shape inference cannot type some exporter outputs; they are float.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    ids, mask = random_inputs(src.meta.get("vocab_size", 30522))
    agreement = compare(run_onnx(out / "model.onnx", ids, mask), run_onnx(src.model_file, ids, mask))
    log.info("quantize: dynamic int8, cosine to fp32 %.4f", agreement["mean_cosine"])
    return seal(out, "onnx", {**src.meta, "parent": src.digest, "precision": "int8",
                              "quantization": {"mode": cfg.mode, "dtype": cfg.dtype, "per_channel": cfg.per_channel,
                                               "weights": "s8", "activations": "u8 (dynamic)",
                                               "agreement_random": agreement}})
