"""Stage `export`: torch sentence encoder -> validated ONNX.

Dynamic batch and sequence axes; the exported graph is checked against the
torch model on real held-out texts and on random tokens, and the stage fails
with the numbers when they disagree beyond the configured tolerances.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from compress.artifact import Artifact, copy_tokenizer, seal
from compress.encoders import ONNX_INPUTS, ONNX_OUTPUT
from compress.errors import StageError
from compress.recipe import ExportConfig

log = logging.getLogger(__name__)

VERSION = 1


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per row of the last axis (a causal LM's logits: per position)."""
    if a.ndim > 2:
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # two zero rows agree (a bias-free LM's logits for a padding token, whose embedding is zero, at position 0)
    both_zero = ~a.any(1) & ~b.any(1)
    cos = np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(norms, 1e-12))
    return {"max_abs_diff": float(np.abs(a - b).max()), "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min())}


def random_inputs(vocab_size: int, batch: int = 4, seq: int = 48, seed: int = 0):
    """Random tokens with uneven padding: exercises the mask and both dynamic axes."""
    rs = np.random.RandomState(seed)
    # above the ids BERT-style vocabularies keep for special and unused tokens, when there are more
    ids = rs.randint(1000 if vocab_size > 1000 else 0, vocab_size, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(batch):
        keep = rs.randint(seq // 4, seq + 1)
        mask[i, keep:] = 0
        ids[i, keep:] = 0
    ids[:, 0] = 101 if vocab_size > 101 else 0
    return ids, mask


def probe_feed(meta: dict, batch: int = 4, seed: int = 0) -> dict:
    """Random inputs of the kind the model takes, for agreement checks between two
    forms of one model: images in [0, 1] (task image-classification) or tokens."""
    if meta.get("task") == "image-classification":
        rs = np.random.RandomState(seed)
        return {"pixel_values": rs.rand(batch, *meta["input_shape"]).astype(np.float32)}
    ids, mask = random_inputs(meta.get("vocab_size", 30522), batch=batch, seed=seed)
    return {"input_ids": ids, "attention_mask": mask}


def to_onnx(module, path, output: str, opset: int) -> None:
    """(input_ids, attention_mask) -> `output`, with dynamic batch and sequence
    axes, checked with onnx.checker (full_check)."""
    import onnx
    import torch

    dummy = (torch.full((2, 16), 1000, dtype=torch.long), torch.ones((2, 16), dtype=torch.long))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            output: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter gives the graph patterns ONNX Runtime's
        # transformer fusions know; its deprecation and tracer notes are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, dummy, str(path), input_names=list(ONNX_INPUTS), output_names=[output],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def validate(torch_enc, onnx_enc, module, vocab_size: int, texts: list[str], cfg: ExportConfig,
             what: str) -> tuple[dict, dict]:
    """The exported graph against torch on real held-out texts, then on random
    tokens with ragged padding; a StageError with the numbers beyond cfg's tolerances.
    `what` starts the message ("ONNX disagrees", "ONNX logits disagree")."""
    import torch

    real = compare(onnx_enc.embed(texts), torch_enc.embed(texts))
    ids, mask = random_inputs(vocab_size)
    with torch.inference_mode():
        ref = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    rand = compare(onnx_enc._run(ids, mask), ref)
    for name, res in (("held-out texts", real), ("random tokens", rand)):
        if res["max_abs_diff"] > cfg.max_abs_diff or res["mean_cosine"] < cfg.min_cosine:
            raise StageError(
                f"export: {what} with torch on {name}: max |diff| {res['max_abs_diff']:.2e} "
                f"(allowed {cfg.max_abs_diff:.0e}), mean cosine {res['mean_cosine']:.6f} (need >= {cfg.min_cosine}); "
                "try another opset (stages.export.opset) or report the model")
    return real, rand


def export(src: Artifact, cfg: ExportConfig, ctx) -> Artifact:
    from compress.encoders import OnnxEncoder, TorchEncoder
    from compress.models import load_hf_encoder, make_sentence_encoder

    if src.meta.get("task") == "image-classification":  # pixel_values -> logits
        from compress import vision

        return vision.export(src, cfg, ctx)
    if src.meta.get("task") == "classification":  # exports logits, not a sentence embedding
        from compress import classify

        return classify.export(src, cfg, ctx)
    if src.meta.get("task") == "causal-lm":  # next-token logits at every position
        from compress import lm_distill

        return lm_distill.export(src, cfg, ctx)
    model = load_hf_encoder(src.path)
    module = make_sentence_encoder(model).eval()
    path = ctx.out / "model.onnx"
    to_onnx(module, path, ONNX_OUTPUT, cfg.opset)
    tokenizer_files = copy_tokenizer(src.path, ctx.out)

    # Validate: real held-out texts, then random tokens with ragged padding.
    max_length = ctx.max_length
    torch_enc = TorchEncoder(src.path, max_length)
    onnx_enc = OnnxEncoder(path, ctx.out, max_length)
    texts = list(ctx.validation_texts)
    real, rand = validate(torch_enc, onnx_enc, module, model.config.vocab_size, texts, cfg, "ONNX disagrees")
    log.info("export: validated on %d texts (max diff %.2e) and random tokens (max diff %.2e)",
             len(texts), real["max_abs_diff"], rand["max_abs_diff"])
    return seal(ctx.out, "onnx", {
        **src.meta,
        "parent": src.digest,
        "precision": "fp32",
        "opset": cfg.opset,
        "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
        # a narrower student's output projection gives the teacher's width
        "outputs": {ONNX_OUTPUT: ["batch", module.projection.out_features if module.projection is not None
                                  else model.config.hidden_size]},
        "num_heads": model.config.num_attention_heads,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "validation": {"texts": real, "random": rand, "num_texts": len(texts)},
        "tokenizer_files": tokenizer_files,
    })
