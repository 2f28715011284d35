"""Stage `prune`: torch student -> smaller torch student, structurally.

Removes whole attention heads and FFN neurons (the matrices shrink; nothing is
masked), ranked by Taylor importance |sum(grad * weight)| on the distillation
loss or by weight magnitude, the same share in every layer; then recovers with
a short feature distillation from the teacher. The kept structure is written
to pruning.json so the student reloads with its new shapes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compress.artifact import Artifact, copy_tokenizer, seal
from compress.recipe import DistillConfig, PruneConfig

log = logging.getLogger(__name__)

VERSION = 1
PLAN_FILE = "pruning.json"


def head_slices(layer, head: int) -> slice:
    size = layer.attention.self.attention_head_size
    return slice(head * size, (head + 1) * size)


def num_heads(layer) -> int:
    return layer.attention.self.query.out_features // layer.attention.self.attention_head_size


def head_scores(layer, kind: str):
    """One score per head: Taylor (needs .grad) or L2 magnitude, over Q, K, V rows and O columns."""
    import torch

    att = layer.attention
    scores = []
    for h in range(num_heads(layer)):
        sl = head_slices(layer, h)
        parts = [(att.self.query.weight, (sl, slice(None))), (att.self.key.weight, (sl, slice(None))),
                 (att.self.value.weight, (sl, slice(None))), (att.output.dense.weight, (slice(None), sl))]
        scores.append(_score(parts, kind))
    return torch.stack(scores)


def ffn_scores(layer, kind: str):
    """One score per intermediate neuron: its row of intermediate.dense and column of output.dense."""
    import torch

    w_in, w_out = layer.intermediate.dense.weight, layer.output.dense.weight
    if kind == "magnitude":
        return w_in.detach().pow(2).sum(1) + w_out.detach().pow(2).sum(0)
    return ((w_in.grad * w_in.detach()).sum(1) + (w_out.grad * w_out.detach()).sum(0)).abs() \
        + (layer.intermediate.dense.bias.grad * layer.intermediate.dense.bias.detach()).abs()


def _score(parts, kind: str):
    import torch

    total = torch.zeros(())
    for weight, index in parts:
        if kind == "magnitude":
            total = total + weight.detach()[index].pow(2).sum()
        else:
            total = total + (weight.grad[index] * weight.detach()[index]).sum()
    return total.abs() if kind == "taylor" else total.sqrt()


def keep_top(scores, remove_share: float, minimum: int = 1) -> list[int]:
    n = len(scores)
    keep = max(minimum, n - int(round(remove_share * n)))
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def _linear_rows(linear, rows: list[int]):
    import torch

    new = torch.nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[rows])
    return new


def _linear_cols(linear, cols: list[int]):
    import torch

    new = torch.nn.Linear(len(cols), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, cols])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def apply_plan(model, plan: dict) -> None:
    """Shrink the model in place: plan = {"heads": {layer: [kept heads]}, "ffn": {layer: [kept neurons]}}.
    Works on trained weights (prune) and on a fresh model before loading weights (reload)."""
    for i, layer in enumerate(model.encoder.layer):
        heads = plan.get("heads", {}).get(str(i))
        if heads is not None and len(heads) < num_heads(layer):
            size = layer.attention.self.attention_head_size
            rows = [h * size + j for h in heads for j in range(size)]
            sa = layer.attention.self
            sa.query, sa.key, sa.value = (_linear_rows(sa.query, rows), _linear_rows(sa.key, rows),
                                          _linear_rows(sa.value, rows))
            sa.num_attention_heads = len(heads)
            sa.all_head_size = len(rows)
            layer.attention.output.dense = _linear_cols(layer.attention.output.dense, rows)
        neurons = plan.get("ffn", {}).get(str(i))
        if neurons is not None and len(neurons) < layer.intermediate.dense.out_features:
            layer.intermediate.dense = _linear_rows(layer.intermediate.dense, neurons)
            layer.output.dense = _linear_cols(layer.output.dense, neurons)


def load_pruned(path: Path):
    """A pruned student: the config's model, shrunk by the saved plan, then its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(path))
    config._attn_implementation = "eager"
    model = AutoModel.from_config(config, attn_implementation="eager")
    apply_plan(model, json.loads((path / PLAN_FILE).read_text()))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()


def importance(student, teacher, layers, texts, tokenizer, cfg: PruneConfig):
    """Accumulate gradients of the distillation loss over a few batches (Taylor)."""
    import torch

    from compress.distill import _batches, _pad, feature_loss
    from compress.models import make_sentence_encoder

    s_enc, t_enc = make_sentence_encoder(student), make_sentence_encoder(teacher).eval()
    student.zero_grad(set_to_none=True)
    encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    batches = _batches([len(e) for e in encoded], cfg.batch_size)
    step = max(1, len(batches) // cfg.importance_batches)
    kd = DistillConfig()
    for b in batches[::step][:cfg.importance_batches]:
        ids, mask = _pad([encoded[i] for i in b], tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            _, t_pooled, t_states = t_enc.encode(ids, mask)
        _, s_pooled, s_states = s_enc.encode(ids, mask)
        loss, _, _ = feature_loss(s_pooled, t_pooled.clone(), s_states[1:], [t_states[l + 1].clone() for l in layers],
                                  mask, kd)
        loss.backward()


def make_plan(model, heads: float, ffn: float, kind: str) -> dict:
    """What to keep in every layer, from the scores (Taylor needs .grad filled)."""
    plan: dict = {"heads": {}, "ffn": {}}
    for i, layer in enumerate(model.encoder.layer):
        if heads > 0:
            plan["heads"][str(i)] = keep_top(head_scores(layer, kind), heads)
        if ffn > 0:
            plan["ffn"][str(i)] = keep_top(ffn_scores(layer, kind), ffn)
    model.zero_grad(set_to_none=True)
    return plan


def compose(first: dict, second: dict) -> dict:
    """The plan that does `first` and then `second`, in the original model's indices.
    A student narrowed by distill and pruned again must reload from one plan."""
    out: dict = {}
    for part in ("heads", "ffn"):
        out[part] = dict(first.get(part, {}))
        for layer, kept in second.get(part, {}).items():
            base = first.get(part, {}).get(layer)
            out[part][layer] = [base[i] for i in kept] if base is not None else kept
    return out


def structure(model) -> dict:
    """[kept, of] heads and FFN neurons per layer, for reports."""
    return {"heads": [num_heads(layer) for layer in model.encoder.layer],
            "ffn": [layer.intermediate.dense.out_features for layer in model.encoder.layer]}


def prune(src: Artifact, cfg: PruneConfig, ctx) -> Artifact:
    from compress.distill import no_dropout, train
    from compress.encoders import load_tokenizer
    from compress.models import count_params, load_hf_encoder
    from compress.teacher_cache import TeacherSource

    student = load_hf_encoder(src.path)
    # Taylor importance runs the teacher; recovery reads its outputs from the
    # teacher-output cache and loads the model only if they are not there.
    teacher = load_hf_encoder(ctx.teacher.path) if cfg.importance == "taylor" else None
    layers = src.meta.get("layers") or list(range(student.config.num_hidden_layers))
    tokenizer = load_tokenizer(src.path)
    no_dropout(student)
    before, shape_before = count_params(student), structure(student)
    if cfg.importance == "taylor":
        importance(student, teacher, layers, ctx.train_texts, tokenizer, cfg)

    plan = make_plan(student, cfg.heads, cfg.ffn, cfg.importance)
    apply_plan(student, plan)
    after = count_params(student)
    log.info("prune: %d -> %d parameters", before, after)

    stats = {}
    if cfg.recover_steps:
        recover = DistillConfig(max_steps=cfg.recover_steps, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                lr=cfg.lr, seed=cfg.seed)
        source = TeacherSource(ctx.cache_root, ctx.teacher.digest,
                               lambda: load_hf_encoder(ctx.teacher.path))
        stats = train(student, teacher, layers, ctx.train_texts, tokenizer, recover, ctx.progress, desc="prune: recover",
                      source=source)

    out: Path = ctx.out
    student.save_pretrained(str(out), safe_serialization=True)
    earlier = json.loads((src.path / PLAN_FILE).read_text()) if (src.path / PLAN_FILE).is_file() else {}
    (out / PLAN_FILE).write_text(json.dumps(compose(earlier, plan), indent=2, sort_keys=True))
    tokenizer_files = copy_tokenizer(src.path, out)
    return seal(out, "torch", {
        **src.meta,
        "parent": src.digest,
        "params": after,
        "params_before_prune": before,
        "pruning": {"importance": cfg.importance,
                    **{part: [list(pair) for pair in zip(kept, shape_before[part])]
                       for part, kept in structure(student).items()}},
        "recovery": stats,
        "tokenizer_files": tokenizer_files,
    })
