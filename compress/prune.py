"""Stage `prune`: torch student -> smaller torch student, structurally.

Removes whole layers (optionally), then attention heads and FFN neurons (the
matrices shrink; nothing is masked), ranked by Taylor importance |sum(grad *
weight)| on the distillation loss or by weight magnitude, the same share in
every layer; optionally zeroes weights inside the remaining Linears
(unstructured or 2:4 sparsity); then recovers with a short feature distillation
from the teacher, keeping the zeros. The kept structure is written to
pruning.json so the student reloads with its new shapes.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from compress import layouts
from compress.artifact import Artifact, copy_tokenizer, seal
from compress.errors import RecipeError
from compress.recipe import DistillConfig, PruneConfig, SparsityConfig

log = logging.getLogger(__name__)

VERSION = 2
PLAN_FILE = "pruning.json"


def head_slices(layer, head: int) -> slice:
    size = layouts.head_size(layer)
    return slice(head * size, (head + 1) * size)


def num_heads(layer) -> int:
    return layouts.num_heads(layer)


def head_scores(layer, kind: str):
    """One score per head: Taylor (needs .grad) or L2 magnitude, over Q, K, V rows and O columns."""
    import torch

    lin = layouts.linears(layer)
    scores = []
    for h in range(num_heads(layer)):
        sl = head_slices(layer, h)
        parts = [(lin["query"].weight, (sl, slice(None))), (lin["key"].weight, (sl, slice(None))),
                 (lin["value"].weight, (sl, slice(None))), (lin["attention_output"].weight, (slice(None), sl))]
        scores.append(_score(parts, kind))
    return torch.stack(scores)


def ffn_scores(layer, kind: str):
    """One score per intermediate neuron: its row of the FFN's input Linear and column of its output Linear."""
    ffn_in = layouts.linear(layer, "ffn_in")
    w_in, w_out = ffn_in.weight, layouts.linear(layer, "ffn_out").weight
    if kind == "magnitude":
        return w_in.detach().pow(2).sum(1) + w_out.detach().pow(2).sum(0)
    return ((w_in.grad * w_in.detach()).sum(1) + (w_out.grad * w_out.detach()).sum(0)).abs() \
        + (ffn_in.bias.grad * ffn_in.bias.detach()).abs()


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


def keep_layers(model, kept: list[int]) -> None:
    """Keep only these encoder layers, in order (the config follows, so save_pretrained records it)."""
    full = layouts.blocks(model)
    layouts.set_blocks(model, [full[i] for i in kept])


def apply_plan(model, plan: dict) -> None:
    """Shrink the model in place: plan = {"layers": [kept layers], "heads": {layer: [kept heads]},
    "ffn": {layer: [kept neurons]}}, heads and ffn keyed by the layer's index after the removal.
    Works on trained weights (prune) and on a fresh model before loading weights (reload);
    a reloaded model already has only the kept layers (config.json says how many)."""
    kept = plan.get("layers")
    if kept is not None and len(kept) < len(layouts.blocks(model)):
        keep_layers(model, kept)
    for i, layer in enumerate(layouts.blocks(model)):
        lin = layouts.linears(layer)
        heads = plan.get("heads", {}).get(str(i))
        if heads is not None and len(heads) < num_heads(layer):
            layouts.check_heads_prunable(model, "stages.prune.heads")
            size = layouts.head_size(layer)
            rows = [h * size + j for h in heads for j in range(size)]
            for role in ("query", "key", "value"):
                layouts.set_linear(layer, role, _linear_rows(lin[role], rows))
            layouts.set_linear(layer, "attention_output", _linear_cols(lin["attention_output"], rows))
            layouts.set_heads(layer, len(heads))
        neurons = plan.get("ffn", {}).get(str(i))
        if neurons is not None and len(neurons) < lin["ffn_in"].out_features:
            layouts.set_linear(layer, "ffn_in", _linear_rows(lin["ffn_in"], neurons))
            layouts.set_linear(layer, "ffn_out", _linear_cols(lin["ffn_out"], neurons))


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


def sample_batches(texts, tokenizer, cfg: PruneConfig) -> list[tuple]:
    """cfg.importance_batches padded (ids, mask) batches, spread over the length-sorted inputs."""
    from compress.distill import _batches, _pad

    encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    batches = _batches([len(e) for e in encoded], cfg.batch_size)
    step = max(1, len(batches) // cfg.importance_batches)
    return [_pad([encoded[i] for i in b], tokenizer.pad_token_id or 0)
            for b in batches[::step][:cfg.importance_batches]]


def importance(student, teacher, layers, texts, tokenizer, cfg: PruneConfig):
    """Accumulate gradients of the distillation loss over a few batches (Taylor)."""
    import torch

    from compress.distill import feature_loss, lifted, state_lifts
    from compress.models import make_sentence_encoder

    s_enc, t_enc = make_sentence_encoder(student), make_sentence_encoder(teacher).eval()
    student.zero_grad(set_to_none=True)
    kd = DistillConfig()
    lifts = state_lifts(student, len(layouts.blocks(student)))
    for ids, mask in sample_batches(texts, tokenizer, cfg):
        with torch.inference_mode():
            _, t_pooled, t_states = t_enc.encode(ids, mask)
        _, s_pooled, s_states = s_enc.encode(ids, mask)
        loss, _, _ = feature_loss(s_pooled, t_pooled.clone(), lifted(s_states[1:], lifts),
                                  [t_states[l + 1].clone() for l in layers], mask, kd)
        loss.backward()


@contextmanager
def only_layers(model, kept: list[int]):
    """Run the model through these layers only; the others are skipped (the residual
    stream passes them unchanged), and restored on exit."""
    full = list(layouts.blocks(model))
    layouts.set_blocks(model, [full[i] for i in kept])
    try:
        yield model
    finally:
        layouts.set_blocks(model, full)


def skip_loss(student, teacher, layers, texts, tokenizer, cfg: PruneConfig) -> Callable[[list[int]], float]:
    """A callable kept -> distillation loss of the student running only the `kept` layers,
    each still learning its own teacher layer, on a few batches (teacher targets computed once).

    This is the loss the recovery distillation would start from. Layers are ranked by it
    rather than by summed Taylor scores: removing a whole layer is too large a change for a
    first-order estimate, and skipping one is cheap to measure exactly (forward passes only).
    """
    import torch

    from compress.distill import feature_loss, lifted, state_lifts
    from compress.models import make_sentence_encoder

    s_enc, t_enc = make_sentence_encoder(student).eval(), make_sentence_encoder(teacher).eval()
    lifts = state_lifts(student, len(layouts.blocks(student)))
    cached = []
    for ids, mask in sample_batches(texts, tokenizer, cfg):
        with torch.inference_mode():
            _, t_pooled, t_states = t_enc.encode(ids, mask)
        cached.append((ids, mask, t_pooled, t_states))
    kd = DistillConfig()

    def loss(kept: list[int]) -> float:
        total = 0.0
        with only_layers(student, kept), torch.inference_mode():
            for ids, mask, t_pooled, t_states in cached:
                _, s_pooled, s_states = s_enc.encode(ids, mask)
                s_wide = lifted(s_states[1:], None if lifts is None else [lifts[i] for i in kept])
                value, _, _ = feature_loss(s_pooled, t_pooled, s_wide, [t_states[layers[i] + 1] for i in kept],
                                           mask, kd)
                total += float(value)
        return total / max(len(cached), 1)

    return loss


def least_important_layers(num_layers: int, count: int, loss: Callable[[list[int]], float]) -> list[int]:
    """Greedily remove `count` layers, each time the one whose skipping gives the lowest loss
    (re-measured after each removal: two layers that each look redundant may not both be)."""
    kept = list(range(num_layers))
    for _ in range(count):
        trials = {i: loss([k for k in kept if k != i]) for i in kept}
        kept.remove(min(kept, key=lambda i: (trials[i], i)))
    return [i for i in range(num_layers) if i not in kept]


def layers_to_remove(student, teacher, layers, texts, tokenizer, cfg: PruneConfig) -> list[int]:
    """Student layer indices to remove, from cfg.layers (a count or explicit indices)."""
    n = len(layouts.blocks(student))
    if cfg.layers is None or cfg.layers == 0 or cfg.layers == []:
        return []
    if isinstance(cfg.layers, list):
        bad = [i for i in cfg.layers if i >= n]
        if bad or len(cfg.layers) >= n:
            raise RecipeError(f"stages.prune.layers {cfg.layers} must name student layers in 0..{n - 1} and keep "
                              f"at least one of the {n}; got {'indices ' + str(bad) if bad else 'all of them'}")
        return sorted(cfg.layers)
    if cfg.layers >= n:
        raise RecipeError(f"stages.prune.layers {cfg.layers} would remove all {n} student layers; "
                          f"set it to at most {n - 1}")
    return least_important_layers(n, cfg.layers, skip_loss(student, teacher, layers, texts, tokenizer, cfg))


# Sparsity inside the Linears: the weights keep their shapes, some become zero.
# The kinds a recipe can select, and each layer's Linears of that kind.
LINEARS = {
    "attention": ("query", "key", "value"),
    "attention_output": ("attention_output",),
    "ffn_in": ("ffn_in",),
    "ffn_out": ("ffn_out",),
}


def layer_linears(layer) -> dict:
    """A layer's six Linears by the names the report uses."""
    return layouts.linears(layer)


def unstructured_mask(weight, amount: float):
    """Keep all but the round(amount * n) smallest |w| of this Linear. Ranked per Linear,
    not across the model, so each selected Linear gets the asked share (a global ranking
    could empty a small matrix)."""
    import torch

    flat = weight.detach().abs().flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[torch.argsort(flat, stable=True)[:int(round(amount * flat.numel()))]] = False
    return mask.view_as(weight)


def two_four_mask(weight, amount: float = 0.5):
    """2:4 along the GEMM's reduction dimension, as sparse tensor cores (Ampere, Orin) and
    NVIDIA ASP's m4n2_1d want: for a Linear weight [out, in], every group of 4 consecutive
    `in` elements of a row keeps its 2 largest |w|. A width that is not a multiple of 4 is
    treated as zero-padded, so the last group keeps at most 2 too. `amount` is fixed at 1/2."""
    import torch
    import torch.nn.functional as F

    out, width = weight.shape
    pad = (-width) % 4
    groups = F.pad(weight.detach().abs(), (0, pad)).view(out, -1, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return mask.view(out, -1)[:, :width]


MASKS: dict[str, Callable] = {"unstructured": unstructured_mask, "2:4": two_four_mask}


def sparsify(model, cfg: SparsityConfig) -> list[tuple]:
    """Zero the selected Linears' weights by cfg.pattern; returns (weight, mask) pairs to keep
    the zeros through training (re-apply with reapply())."""
    if cfg.pattern == "none":
        return []
    make = MASKS[cfg.pattern]
    masked = []
    for layer in layouts.blocks(model):
        linears = layer_linears(layer)
        for kind in cfg.linears:
            for name in LINEARS[kind]:
                weight = linears[name].weight
                masked.append((weight, make(weight, cfg.amount)))
    odd = sorted({w.shape[1] for w, _ in masked if w.shape[1] % 4})
    if cfg.pattern == "2:4" and odd:
        log.warning("prune: input widths %s are not multiples of 4; their last 2:4 group is zero-padded, and sparse "
                    "kernels may skip such GEMMs (keep FFN widths multiples of 4 to avoid it)", odd)
    reapply(masked)
    return masked


def reapply(masked: list[tuple]) -> None:
    """Zero the masked weights again (after an optimizer step moved them)."""
    import torch

    with torch.no_grad():
        for weight, mask in masked:
            weight.mul_(mask)


def sparsity_stats(model, cfg: SparsityConfig) -> dict:
    """Share of zero weights of every Linear of every layer, measured on the weights."""
    per_layer = []
    zeros = total = 0
    selected = {name for kind in cfg.linears for name in LINEARS[kind]}
    for layer in layouts.blocks(model):
        row = {}
        for name, linear in layer_linears(layer).items():
            w = linear.weight.detach()
            z = int((w == 0).sum())
            row[name] = round(z / w.numel(), 4)
            if name in selected:
                zeros, total = zeros + z, total + w.numel()
        per_layer.append(row)
    return {"pattern": cfg.pattern, "amount": cfg.amount if cfg.pattern == "unstructured" else 0.5,
            "linears": list(cfg.linears), "zero_share": round(zeros / max(total, 1), 4), "layers": per_layer,
            "speedup": SPEEDUP[cfg.pattern]}


# What the zeros buy at run time, said plainly in the meta and the report.
SPEEDUP = {
    "2:4": ("needs sparse kernels on the target: TensorRT on Ampere/Orin GPUs with sparsity enabled at engine build "
            "(BuilderFlag.SPARSE_WEIGHTS, trtexec --sparsity=enable); ONNX Runtime on CPU multiplies the zeros "
            "like any other weight: no speedup"),
    "unstructured": ("no speedup on these targets: TensorRT's sparse tensor cores need the 2:4 pattern and ONNX "
                     "Runtime on CPU multiplies the zeros like any other weight; the zeros only make the model "
                     "compress better"),
}


def make_plan(model, heads: float, ffn: float, kind: str) -> dict:
    """What to keep in every layer, from the scores (Taylor needs .grad filled)."""
    plan: dict = {"heads": {}, "ffn": {}}
    for i, layer in enumerate(layouts.blocks(model)):
        if heads > 0:
            plan["heads"][str(i)] = keep_top(head_scores(layer, kind), heads)
        if ffn > 0:
            plan["ffn"][str(i)] = keep_top(ffn_scores(layer, kind), ffn)
    model.zero_grad(set_to_none=True)
    return plan


def compose(first: dict, second: dict) -> dict:
    """The plan that does `first` and then `second`: "layers" in the original model's layer
    indices; heads and ffn keyed by the final layer index, listing original head and neuron
    indices. A student narrowed by distill and pruned again must reload from one plan."""
    out: dict = {}
    first_layers, second_layers = first.get("layers"), second.get("layers")
    if second_layers is not None:
        out["layers"] = [first_layers[i] for i in second_layers] if first_layers is not None else list(second_layers)
    elif first_layers is not None:
        out["layers"] = list(first_layers)
    for part in ("heads", "ffn"):
        earlier = first.get(part, {})
        if second_layers is not None:
            # first's entries follow their layers to the new numbering; removed layers' entries go
            earlier = {str(j): earlier[str(old)] for j, old in enumerate(second_layers) if str(old) in earlier}
        out[part] = dict(earlier)
        for layer, kept in second.get(part, {}).items():
            base = earlier.get(layer)
            out[part][layer] = [base[i] for i in kept] if base is not None else kept
    return out


def structure(model) -> dict:
    """Heads and FFN neurons per layer and the hidden (residual stream) width, for reports."""
    layers = layouts.blocks(model)
    return {"hidden": model.config.hidden_size,
            "heads": [num_heads(layer) for layer in layers],
            "ffn": [layouts.linear(layer, "ffn_in").out_features for layer in layers]}


def prune(src: Artifact, cfg: PruneConfig, ctx) -> Artifact:
    from compress import distributed
    from compress.distill import no_dropout, train
    from compress.encoders import load_tokenizer
    from compress.models import count_params, load_hf_encoder, save_projection
    from compress.teacher_cache import TeacherSource

    student = load_hf_encoder(src.path)
    if cfg.heads > 0:
        layouts.check_heads_prunable(student, "stages.prune.heads")
    # Taylor importance and ranking layers by their skip loss run the teacher; recovery
    # reads its outputs from the teacher-output cache and loads the model only if they are not there.
    ranks_layers = isinstance(cfg.layers, int) and cfg.layers > 0
    teacher = load_hf_encoder(ctx.teacher.path) if cfg.importance == "taylor" or ranks_layers else None
    layers = src.meta.get("layers") or list(range(student.config.num_hidden_layers))
    tokenizer = load_tokenizer(src.path)
    no_dropout(student)
    before, shape_before = count_params(student), structure(student)
    # Whole layers go first: heads and neurons are then ranked in the model that remains.
    # Under --nproc the main rank ranks and the others take its choices, so every rank prunes alike.
    ranks_here = distributed.world().main or not distributed.collective()
    removed = layers_to_remove(student, teacher, layers, ctx.train_texts, tokenizer, cfg) if ranks_here else None
    removed = distributed.broadcast(removed) if distributed.collective() else removed
    kept_layers = [i for i in range(len(layouts.blocks(student))) if i not in removed]
    if removed:
        keep_layers(student, kept_layers)
        layers = [layers[i] for i in kept_layers]  # student layer i still learns the same teacher layer
        log.info("prune: removed student layers %s; the rest learn teacher layers %s", removed, layers)
    plan = None
    if ranks_here:
        if cfg.importance == "taylor" and (cfg.heads > 0 or cfg.ffn > 0):  # the gradients rank heads and neurons only
            importance(student, teacher, layers, ctx.train_texts, tokenizer, cfg)
        plan = make_plan(student, cfg.heads, cfg.ffn, cfg.importance)
    plan = distributed.broadcast(plan) if distributed.collective() else plan
    if removed:
        plan["layers"] = kept_layers
    apply_plan(student, plan)
    after = count_params(student)
    log.info("prune: %d -> %d parameters", before, after)
    # Zeros come after the structured pruning, so the masks are chosen on the final shapes.
    masked = sparsify(student, cfg.sparsity)

    stats = {}
    if cfg.recover_steps:
        recover = DistillConfig(max_steps=cfg.recover_steps, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                lr=cfg.lr, seed=cfg.seed)
        source = TeacherSource(ctx.cache_root, ctx.teacher.digest,
                               lambda: load_hf_encoder(ctx.teacher.path))
        stats = train(student, teacher, layers, ctx.train_texts, tokenizer, recover, ctx.progress, desc="prune: recover",
                      source=source, after_step=(lambda: reapply(masked)) if masked else None)

    out: Path = ctx.out
    student.save_pretrained(str(out), safe_serialization=True)
    save_projection(student, out)
    earlier = json.loads((src.path / PLAN_FILE).read_text()) if (src.path / PLAN_FILE).is_file() else {}
    (out / PLAN_FILE).write_text(json.dumps(compose(earlier, plan), indent=2, sort_keys=True))
    tokenizer_files = copy_tokenizer(src.path, out)
    sparsity = {"sparsity": sparsity_stats(student, cfg.sparsity)} if masked else {}
    return seal(out, "torch", {
        **src.meta,
        "parent": src.digest,
        "layers": layers,
        "num_layers": len(layers),
        "structure": structure(student),
        "params": after,
        "params_before_prune": before,
        "pruning": {"importance": cfg.importance, "layers_removed": removed,
                    **{part: [[kept, shape_before[part][i]] for kept, i in zip(now, kept_layers)]
                       for part, now in structure(student).items() if part != "hidden"}},
        **sparsity,
        "recovery": stats,
        "tokenizer_files": tokenizer_files,
    })
