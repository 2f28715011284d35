"""Run any text artifact as a sentence encoder: texts -> L2-normalised embeddings.

Eval and export validation go through here, so a torch student, an exported ONNX
model and the final target build are all scored the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.artifact import Artifact

ONNX_INPUTS = ("input_ids", "attention_mask")
ONNX_OUTPUT = "sentence_embedding"


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class Encoder:
    """Batches texts by length (less padding), runs them, restores the order."""

    def __init__(self, tokenizer, max_length: int, batch_size: int = 32):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed(self, texts: list[str] | tuple[str, ...]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[np.ndarray | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            vecs = self._run(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))
            for i, v in zip(idx, vecs):
                out[i] = v
        return np.stack(out).astype(np.float32) if texts else np.zeros((0, 0), np.float32)


class TorchEncoder(Encoder):
    def __init__(self, path: Path, max_length: int, threads: int | None = None):
        import torch

        from compress.models import load_hf_encoder, make_sentence_encoder

        super().__init__(load_tokenizer(path), max_length)
        self.module = make_sentence_encoder(load_hf_encoder(path)).eval()
        self.threads = threads
        self._torch = torch

    def _run(self, input_ids, attention_mask):
        torch = self._torch
        with torch.inference_mode():
            return self.module(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()


def eval_session(model: Path, threads: int = 2, session_options: dict | None = None):
    """An ONNX Runtime CPU session for scoring a model: `threads` intra-op
    threads, one inter-op, and the graph optimization level a target build
    recorded for it (its session_options.json), if any."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    level = (session_options or {}).get("graph_optimization_level")
    if level:  # a target build records how it must be loaded
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


class OnnxEncoder(Encoder):
    def __init__(self, model: Path, tokenizer_dir: Path, max_length: int, threads: int = 2,
                 session_options: dict | None = None):
        super().__init__(load_tokenizer(tokenizer_dir), max_length)
        self.session = eval_session(model, threads, session_options)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def _run(self, input_ids, attention_mask):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.session.run([ONNX_OUTPUT], {k: feed[k] for k in self.inputs})[0]


def open_encoder(art: Artifact, max_length: int, threads: int = 2) -> Encoder:
    if art.meta.get("task") == "image-classification":  # images -> logits
        from compress.vision import open_classifier as open_image_classifier

        return open_image_classifier(art, threads)
    if art.meta.get("task") == "classification":  # texts -> logits
        from compress.classify import open_classifier

        return open_classifier(art, max_length, threads)
    if art.meta.get("task") == "causal-lm":  # texts -> next-token logits
        from compress.lm_eval import open_lm

        return open_lm(art, max_length, threads)
    if art.kind == "torch":
        return TorchEncoder(art.path, max_length, threads)
    if art.kind == "onnx":
        return OnnxEncoder(art.model_file, art.path, max_length, threads,
                           art.meta.get("session_options"))
    raise ValueError(f"no encoder for artifact kind {art.kind}")
