"""Torch-side model helpers: load a Hugging Face encoder, run it as a sentence
encoder (mean pooling + L2 norm), and derive a layer-subset student.

Used by distill (training), export (the graph that becomes ONNX) and eval.
"""

from __future__ import annotations

import logging
from pathlib import Path

from compress.errors import SourceError

log = logging.getLogger(__name__)


def load_hf_encoder(path: str | Path):
    """Load a Hugging Face encoder with eager attention (exportable, fusable)."""
    from transformers import AutoModel

    from compress.prune import PLAN_FILE, load_pruned

    if (Path(path) / PLAN_FILE).is_file():
        return load_pruned(Path(path))
    try:
        model = AutoModel.from_pretrained(str(path), attn_implementation="eager")
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot load a Hugging Face model from {path}: {first}; "
                          "point teacher.source at a directory with config.json and weights") from exc
    check_supported(model, path)
    return model.eval()


def check_supported(model, where) -> None:
    if not (hasattr(model, "embeddings") and hasattr(model, "encoder")
            and hasattr(model.encoder, "layer")):
        raise SourceError(f"teacher {where} is a {type(model).__name__}; compress distills "
                          "BERT-family encoders (embeddings + encoder.layer) for task embedding")


def make_sentence_encoder(model):
    """Wrap an HF BERT-family model as (input_ids, attention_mask) -> embedding."""
    import torch
    import torch.nn.functional as F

    class SentenceEncoder(torch.nn.Module):
        """Mean-pooled, L2-normalised sentence embedding, plus every hidden state.

        The additive attention mask is built here rather than by transformers'
        masking utilities, which trace to shape-specialised ONNX graphs.
        """

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def encode(self, input_ids, attention_mask):
            token_type_ids = torch.zeros_like(input_ids)
            hidden = self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            keep = attention_mask[:, None, None, :].to(hidden.dtype)
            additive = (1.0 - keep) * -10000.0
            states = [hidden]
            for layer in self.encoder.encoder.layer:
                hidden = layer(hidden, attention_mask=additive)
                if isinstance(hidden, tuple):  # older transformers return tuples
                    hidden = hidden[0]
                states.append(hidden)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, dim=-1), pooled, states

        def forward(self, input_ids, attention_mask):
            return self.encode(input_ids, attention_mask)[0]

    return SentenceEncoder(model)


def every_other_layer(num_layers: int) -> list[int]:
    """Default student layers: every other teacher layer, always keeping the last.

    Keeping the last layer matters: it is the one the pooled embedding is read
    from, so a student that starts from it starts close to the teacher's output.
    """
    return list(range(num_layers - 1, -1, -2))[::-1]


def derive_student(teacher, layers: list[int]):
    """A student with the teacher's embeddings and the chosen layers, copied."""
    import copy

    import torch

    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        from compress.errors import RecipeError
        raise RecipeError(f"stages.distill.student.layers {layers} is not a non-empty list of "
                          f"teacher layer indices in 0..{n - 1}; pick e.g. {every_other_layer(n)}")
    student = copy.deepcopy(teacher)
    student.encoder.layer = torch.nn.ModuleList([copy.deepcopy(teacher.encoder.layer[i]) for i in layers])
    student.config.num_hidden_layers = len(layers)
    return student


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
