"""Stage `fuse`: fp32 ONNX -> fp32 ONNX with one fused attention op per layer.

Runs after export and before quantize. The rewrite itself lives with the kernel
(compress.kernels.attention.rewrite); this stage runs it, checks the graph, and
fails with the numbers when the fused model disagrees with its input.
"""

from __future__ import annotations

import logging
import shutil

from compress.artifact import Artifact, seal
from compress.errors import StageError
from compress.recipe import FuseConfig

log = logging.getLogger(__name__)

VERSION = 1


def fuse(src: Artifact, cfg: FuseConfig, ctx) -> Artifact:
    import onnx

    from compress.encoders import OnnxEncoder
    from compress.export import compare, random_inputs
    from compress.kernels.attention.rewrite import fuse_attention
    from compress.quantize import run_onnx

    if src.kind != "onnx":
        raise StageError(f"fuse: input is a {src.kind} artifact, expected onnx; keep fuse after export in stages")
    out = ctx.out
    for name in src.meta.get("tokenizer_files", []):
        shutil.copyfile(src.path / name, out / name)
    model = onnx.load(str(src.model_file))
    attention = {"enabled": cfg.attention, "op": cfg.op}
    if cfg.attention:
        model, result = fuse_attention(model, cfg.op)
        attention.update(result.to_json())
        # No match is not an error: the graph passes through and meta says why.
        for reason in result.unmatched:
            log.warning("fuse: attention not fused at %s", reason)
    path = out / "model.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)

    # Validate against the input: random tokens with ragged padding, then real texts.
    ids, mask = random_inputs(src.meta.get("vocab_size", 30522))
    rand = compare(run_onnx(path, ids, mask), run_onnx(src.model_file, ids, mask))
    checks = [("random tokens", rand)]
    texts = list(ctx.validation_texts)[:32]
    if texts and src.meta.get("tokenizer_files"):
        fused_enc = OnnxEncoder(path, out, ctx.max_length)
        plain_enc = OnnxEncoder(src.model_file, src.path, ctx.max_length)
        checks.append(("held-out texts", compare(fused_enc.embed(texts), plain_enc.embed(texts))))
    for name, res in checks:
        if res["max_abs_diff"] > cfg.max_abs_diff or res["min_cosine"] < cfg.min_cosine:
            raise StageError(
                f"fuse: fused model disagrees with its input on {name}: max |diff| {res['max_abs_diff']:.2e} "
                f"(allowed {cfg.max_abs_diff:.0e}), min cosine {res['min_cosine']:.6f} (need >= {cfg.min_cosine}); "
                "set stages.fuse.attention: false and report the model")
    log.info("fuse: %d attention layers fused into %s; max diff %.2e on random tokens",
             attention.get("fused", 0), cfg.op, rand["max_abs_diff"])
    return seal(out, "onnx", {**src.meta, "parent": src.digest,
                              "fusion": {"attention": attention, "validation": dict(checks)}})
