"""Stage `distill`: teacher (torch) -> smaller student (torch).

The student keeps a subset of the teacher's layers, initialised from them (or
is built from a config of the teacher's type, student.config), and learns to
reproduce the teacher's pooled embedding and the hidden state after each
mapped teacher layer (relative MSE + cosine). Teacher targets are computed once per
input and kept in the teacher-output cache (compress/teacher_cache.py), reused
across epochs, rebuilds and prune's recovery; batches group inputs of similar length.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Callable

from compress import layouts
from compress.artifact import Artifact, copy_tokenizer, seal
from compress.recipe import DistillConfig, PruneConfig

log = logging.getLogger(__name__)

VERSION = 1
BORN_AGAIN_GENERATIONS = 2  # self, born-again, when the recipe gives no generations


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by length, so a batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def bf16_supported() -> bool:
    from pathlib import Path as _P

    try:
        flags = _P("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def feature_loss(s_pooled, t_pooled, s_states, t_states, mask, cfg: DistillConfig):
    """Relative MSE + (1 - cosine), on the pooled embedding and on each mapped
    hidden state (padding excluded). Relative MSE keeps the loss scale-free:
    MiniLM's hidden states have a few dimensions far larger than the rest."""
    import torch.nn.functional as F

    def rel_mse(s, t, m=None):
        err, ref = (s - t).pow(2), t.pow(2)
        if m is not None:
            err, ref = err * m, ref * m
        return err.sum() / ref.sum().clamp(min=1e-12)

    pooled = rel_mse(s_pooled, t_pooled) + (1 - F.cosine_similarity(s_pooled, t_pooled, dim=-1)).mean()
    m = mask.unsqueeze(-1).float()
    hidden = 0.0
    for s, t in zip(s_states, t_states):
        cos = F.cosine_similarity(s, t, dim=-1)
        hidden = hidden + rel_mse(s, t, m) + ((1 - cos) * mask).sum() / mask.sum()
    hidden = hidden / max(len(s_states), 1)
    return cfg.pooled_weight * pooled + cfg.hidden_weight * hidden, pooled.detach(), hidden.detach()


def self_loss(s_pooled, s_states, ids, mask, cfg: DistillConfig, previous=None):
    """Self-distillation. born-again: the feature loss against `previous`, a
    frozen trained copy of the student (an encoder as make_sentence_encoder
    gives), on the pooled embedding and every hidden state. deep-to-shallow: the
    mean-pooled state after each layer but the last learns the student's own
    final embedding (detached: the deep end teaches, it is not pulled back), as
    1 - cosine."""
    import torch
    import torch.nn.functional as F

    if cfg.self_mode == "born-again":
        with torch.no_grad():
            _, p_pooled, p_states = previous.encode(ids, mask)
        loss, _, _ = feature_loss(s_pooled, p_pooled.float(), s_states[1:], [p.float() for p in p_states[1:]], mask, cfg)
        return loss
    m = mask.unsqueeze(-1).to(s_states[0].dtype)
    # The final state mean-pooled: s_pooled itself, unless a narrower student's
    # output projection has taken it to the teacher's width.
    target = ((s_states[-1] * m).sum(1) / m.sum(1).clamp(min=1.0)).detach()
    terms = []
    for h in s_states[1:-1]:  # after each layer but the last
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        terms.append((1 - F.cosine_similarity(pooled, target, dim=-1)).mean())
    return torch.stack(terms).mean() if terms else s_pooled.sum() * 0.0


def state_lifts(student, count: int):
    """A narrower student's hidden states cannot be compared with the teacher's:
    one learned Linear(hidden -> teacher hidden) per mapped state (TinyBERT),
    each starting as the output projection did (kept dimensions back in their
    places). Trained with the student for the feature loss, never exported.
    None for a student of the teacher's width."""
    import torch

    from compress.models import projection_of, selection_projection

    proj = projection_of(student)
    if proj is None:
        return None
    return torch.nn.ModuleList([selection_projection(proj.dims, proj.out_features) for _ in range(count)])


def lifted(states: list, lifts) -> list:
    """States taken to the teacher's width by their lifts (unchanged without)."""
    return list(states) if lifts is None else [lift(s) for lift, s in zip(lifts, states)]


def optimizer(module, total: int, lr: float, weight_decay: float, warmup: float):
    """AdamW (no weight decay on biases and norms) with a linear warm-up over the
    `warmup` share of `total` steps, then a linear decay to 0: the schedule of
    every distillation loop (embedding, classification, causal LM)."""
    import torch

    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps = int(warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: (step + 1) / max(steps, 1) if step < steps else max(0.0, (total - step) / max(total - steps, 1)))
    return opt, sched


def no_dropout(model) -> None:
    """Dropout only blurs the function the student copies."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def train(student, teacher, layers: list[int], texts: list[str], tokenizer, cfg: DistillConfig,
          progress, desc: str = "distill", after_step: Callable[[], None] | None = None, source=None,
          previous=None) -> dict:
    """Feature distillation of `student` (in place) towards `teacher`.

    Student layer i learns the hidden state after teacher layer layers[i]
    (states[0] is the embeddings). Shared by distill and prune's recovery.
    `after_step` runs after every optimizer step (prune re-applies its sparsity masks there).
    Teacher targets come from `source` (a teacher_cache.TeacherSource): with a
    cache root they are stored on disk and reused by later runs, which then
    need no teacher model (teacher may be None) and run no teacher forward.
    With the `self` loss: `previous` (born-again) is a frozen trained copy of the
    student whose embedding and hidden states the student also learns; in
    deep-to-shallow mode every shallower layer learns the student's own embedding.
    """
    import torch

    from compress.models import make_sentence_encoder

    from compress import distributed

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the same on every rank: all take the global batches in one order
    no_dropout(student)
    s_enc = make_sentence_encoder(student).train()
    world = distributed.world() if distributed.collective() else distributed.World()

    encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    # One global batch per step, dealt out across the ranks (compress/distributed.py).
    batches = _batches([len(e) for e in encoded], cfg.batch_size * world.size)
    steps_per_epoch = len(batches)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    use_bf16 = cfg.bf16 and bf16_supported()
    use_feature, use_attention = "feature" in cfg.losses, "attention" in cfg.losses
    pad_id = tokenizer.pad_token_id or 0

    use_self = "self" in cfg.losses and (cfg.self_mode == "deep-to-shallow" or previous is not None)
    outputs = teacher_outputs(teacher, layers, encoded, pad_id, cfg, source, progress, desc)
    lifts = state_lifts(student, len(layouts.blocks(student))) if use_feature else None
    trainee = student_step(s_enc, cfg.relation_heads if use_attention else 0, lifts)
    opt, sched = optimizer(trainee, total, cfg.lr, cfg.weight_decay, cfg.warmup)  # the student and its lifts
    step_fn = distributed.wrap(trainee)
    p_enc = make_sentence_encoder(previous).eval() if previous is not None else None
    bar = progress(total=total, desc=desc) if world.main else _Silent()
    history, seen, part_history = [], [], {}
    for _, rows, weight in distributed.dealt_steps(batches, total, rng, world, seen):
        ids, mask = _pad([encoded[i] for i in rows], pad_id)
        t_pooled, t_states, t_rel = outputs.batch(rows, ids.shape[1])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            s_pooled, s_states, s_rel, s_wide = step_fn(ids, mask)
        loss = lp = lh = torch.zeros(())
        if use_feature:
            loss, lp, lh = feature_loss(s_pooled.float(), t_pooled, [s.float() for s in s_wide],
                                        t_states, mask, cfg)
        parts = {"pooled": lp.item(), "hidden": float(lh)}
        if use_attention:
            la = relation_loss(s_rel, t_rel, mask)
            loss = loss + cfg.attention_weight * la
            parts["attention"] = la.item()
        if use_self:
            ls = self_loss(s_pooled.float(), [s.float() for s in s_states], ids, mask, cfg, p_enc)
            loss = loss + cfg.self_weight * ls
            parts["self_distill"] = ls.item()
        opt.zero_grad(set_to_none=True)
        (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(trainee.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step()
        sched.step()
        value = loss.item()
        history.append(value)
        for k, v in parts.items():
            part_history.setdefault(k, []).append(v)
        bar.update(1, loss=value, **parts)
    bar.close()
    step = len(history)
    student.eval()
    head = sum(history[:20]) / max(len(history[:20]), 1)
    tail = sum(history[-20:]) / max(len(history[-20:]), 1)
    log.info("%s: %d steps, loss %.4f -> %.4f", desc, step, head, tail)
    parts_log = {k: (sum(v[:20]) / len(v[:20]), sum(v[-20:]) / len(v[-20:])) for k, v in part_history.items() if v}
    return {"steps": step, "loss_first": head, "loss_last": tail, "bf16": use_bf16,
            "losses": {k: {"first": a, "last": b} for k, (a, b) in parts_log.items()},
            "teacher_forwards": outputs.forwards, "teacher_outputs": outputs.stats(),
            "data": coverage(seen, len(encoded), world)}


class _Silent:
    def update(self, n: int = 1, **postfix) -> None:
        pass

    def close(self) -> None:
        pass


def coverage(seen: list[list[int]], n: int, world) -> dict:
    """How the inputs were seen, per epoch, over all ranks: `seen` is this rank's
    input indices of each epoch (an epoch cut short by max_steps included). A
    complete epoch has seen == distinct == inputs."""
    from collections import Counter

    from compress import distributed

    ranks = distributed.gather(seen) if world.size > 1 else [seen]
    epochs = []
    for e in range(len(seen)):
        counts = Counter(i for r in ranks for i in r[e])
        epochs.append({"seen": sum(counts.values()), "distinct": len(counts),
                       "per_rank": [len(r[e]) for r in ranks]})
    return {"inputs": n, "ranks": world.size, "epochs": epochs}


def student_step(s_enc, relation_heads: int, lifts=None):
    import torch

    class StudentStep(torch.nn.Module):
        """One student forward for a distillation step, as a module so that
        DistributedDataParallel sees (and synchronises) it: the pooled
        embedding, every hidden state, with the attention loss the last
        layer's relations, and the states after each layer at the teacher's
        width (through `lifts` when the student is narrower)."""

        def __init__(self, s_enc, relation_heads: int, lifts):
            super().__init__()
            self.s_enc, self.relation_heads, self.lifts = s_enc, relation_heads, lifts

        def forward(self, ids, mask):
            _, pooled, states = self.s_enc.encode(ids, mask)
            rel = (relations(layouts.blocks(self.s_enc.encoder)[-1], states[-2], mask, self.relation_heads)
                   if self.relation_heads else ())
            return pooled, states, rel, lifted(states[1:], self.lifts)

    return StudentStep(s_enc, relation_heads, lifts)


def teacher_outputs(teacher, layers: list[int], encoded, pad_id: int, cfg: DistillConfig, source, progress,
                    desc: str):
    """The teacher's targets for every input (teacher_cache.TeacherOutputs): the
    pooled embedding, the hidden state after each teacher layer in `layers`, and
    the last one's relations when the attention loss is on."""
    import torch

    from compress import teacher_cache
    from compress.models import make_sentence_encoder

    use_attention = "attention" in cfg.losses
    targets = [l + 1 for l in layers]
    settings = {"max_length": cfg.max_length, "states": targets, "dtype": "float16",
                "relations": {"layer": layers[-1], "heads": cfg.relation_heads} if use_attention else None}

    def runner():
        model = teacher_cache.teacher_model(teacher, source, desc, "distill.train()")
        t_enc = make_sentence_encoder(model).eval()

        def run(ids, mask):
            with torch.inference_mode():
                _, pooled, states = t_enc.encode(ids, mask)
                rel = (relations(layouts.blocks(model)[layers[-1]], states[layers[-1]], mask, cfg.relation_heads)
                       if use_attention else ())
            return pooled, [states[j] for j in targets], list(rel), None  # an encoder has no class logits

        return run

    return teacher_cache.obtain(source, encoded, settings, pad_id, cfg.relation_heads if use_attention else 0,
                                runner, progress, desc)


def relations(layer, hidden, mask, heads: int):
    """MiniLM-v2 self-attention relations of one layer: log-softmax of Q·Kᵀ and
    V·Vᵀ over `heads` relation heads, from the layer's own projections
    of its input. Splitting into a fixed number of relation heads lets a student
    with other head counts (or pruned heads) match the teacher."""
    import torch

    lin = layouts.linears(layer)
    q, k, v = lin["query"](hidden), lin["key"](hidden), lin["value"](hidden)
    b, s, width = q.shape
    if width % heads:
        from compress.errors import RecipeError
        raise RecipeError(f"stages.distill.relation_heads {heads} does not divide the attention width {width}; "
                          "pick a divisor of both the teacher's and the student's")
    d = width // heads

    def split(x):
        return x.reshape(b, s, heads, d).transpose(1, 2)

    additive = (1.0 - mask[:, None, None, :].to(q.dtype)) * -10000.0
    qk = torch.matmul(split(q), split(k).transpose(-1, -2)) / d ** 0.5 + additive
    vv = torch.matmul(split(v), split(v).transpose(-1, -2)) / d ** 0.5 + additive
    return torch.log_softmax(qk.float(), -1), torch.log_softmax(vv.float(), -1)


def relation_loss(student_rel, teacher_rel, mask):
    """KL(teacher || student) per query position, averaged over real tokens."""
    import torch

    keep = mask[:, None, :].float()  # [b, 1, s]: query positions that are tokens
    total = 0.0
    for s_log, t_log in zip(student_rel, teacher_rel):
        kl = (t_log.exp() * (t_log - s_log)).sum(-1)  # [b, heads, s]
        total = total + (kl * keep).sum() / (keep.sum() * kl.shape[1])
    return total / len(student_rel)


def narrow(student, teacher, layers: list[int], texts: list[str], tokenizer, cfg: DistillConfig) -> dict | None:
    """Remove cfg.student's share of heads and FFN neurons from the student encoder
    (in place, Taylor-ranked on the feature loss) before training: distillation then
    recovers what they carried, at no extra cost (unlike pruning afterwards).
    Returns the plan to save beside the weights, or None when nothing is removed."""
    from compress import prune as pruning

    from compress import distributed

    if not (cfg.student.ffn > 0 or cfg.student.heads > 0):
        return None
    no_dropout(student)
    plan = None
    if distributed.world().main or not distributed.collective():  # one ranking, the same on every rank
        pruning.importance(student, teacher, layers, texts, tokenizer,
                           PruneConfig(batch_size=cfg.batch_size, max_length=cfg.max_length))
        plan = pruning.make_plan(student, cfg.student.heads, cfg.student.ffn, "taylor")
    plan = distributed.broadcast(plan) if distributed.collective() else plan
    pruning.apply_plan(student, plan)
    return plan


def born_again(student, teacher, layers: list[int], texts: list[str], tokenizer, cfg: DistillConfig, progress,
               source, first: dict) -> dict:
    """Generations 2..cfg.generations of born-again self-distillation: each
    starts from the trained student and learns from the teacher and from a
    frozen copy of the generation before (the teacher's outputs come from the
    cache the first generation filled). Returns the last generation's stats,
    with every generation's under `generations`."""
    import copy

    runs = [first]
    for g in range(2, (cfg.generations or BORN_AGAIN_GENERATIONS) + 1):
        previous = copy.deepcopy(student).eval()
        for p in previous.parameters():
            p.requires_grad_(False)
        gen_cfg = cfg.model_copy(update={"seed": cfg.seed + g - 1})  # another order of batches
        runs.append(train(student, teacher, layers, texts, tokenizer, gen_cfg, progress,
                          desc=f"distill: generation {g}", source=source, previous=previous))
    keep = ("steps", "loss_first", "loss_last", "losses")
    return {**runs[-1], "generations": [{k: r.get(k) for k in keep} for r in runs],
            "steps": sum(r["steps"] for r in runs)}


def distill(src: Artifact, cfg: DistillConfig, ctx) -> Artifact:
    from compress.encoders import load_tokenizer
    from compress.models import (config_layers, config_student, count_params, derive_student, every_other_layer,
                                 load_hf_encoder, narrow_hidden, projection_of, save_projection)
    from compress.teacher_cache import TeacherSource

    from compress import prune as pruning

    task = src.meta.get("task", "embedding")
    student_cfg = getattr(cfg, "student", None)  # causal-lm's LmDistillConfig has none
    if task != "embedding" and student_cfg is not None and student_cfg.hidden is not None:
        from compress.errors import RecipeError
        raise RecipeError(f"stages.distill.student.hidden: a narrower hidden width is implemented for task embedding "
                          f"only, not {task}; drop hidden (student.layers/ffn/heads still apply)")
    if task not in ("embedding", "classification") and student_cfg is not None and student_cfg.config is not None:
        from compress.errors import RecipeError
        raise RecipeError(f"stages.distill.student.config: a student given as a config is implemented for tasks "
                          f"embedding and classification, not {task}; drop config (student.layers/ffn/heads "
                          "derive the student from the teacher)")
    if src.meta.get("task") == "image-classification":  # a CNN on images
        from compress import vision

        return vision.distill(src, cfg, ctx)
    if src.meta.get("task") == "classification":  # logits, labels, the head: its own module
        from compress import classify

        return classify.distill(src, cfg, ctx)
    if src.meta.get("task") == "causal-lm":  # logit KD and on-policy GKD of a causal LM
        from compress import lm_distill

        return lm_distill.distill(src, cfg, ctx)
    out: Path = ctx.out
    teacher = load_hf_encoder(src.path)
    if projection_of(teacher) is not None:  # its hidden states and its embedding differ in width
        from compress.errors import RecipeError
        raise RecipeError(f"teacher.source: {src.path} is a student with an output projection (student.hidden); "
                          "distill from the teacher it came from")
    from_config, config_meta = cfg.student.config is not None, {}
    if from_config:
        student, copied = config_student(teacher, cfg.student.config, max(cfg.max_length, ctx.max_length), cfg.seed)
        layers = config_layers(cfg.student.layers, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        source_of = cfg.student.config if isinstance(cfg.student.config, str) else "recipe"
        config_meta = {"student_config": {"source": source_of, "from_teacher": copied}}
    else:
        layers = cfg.student.layers or every_other_layer(teacher.config.num_hidden_layers)
        student = derive_student(teacher, layers)
        if cfg.student.hidden is not None:  # before heads/ffn: narrow() ranks them in the narrower model
            student = narrow_hidden(student, cfg.student.hidden)
    tokenizer = load_tokenizer(src.path)
    # A config student has the shape its config gives (the recipe forbids heads/ffn beside it).
    plan = None if from_config else narrow(student, teacher, layers, ctx.train_texts, tokenizer, cfg)
    source = TeacherSource(ctx.cache_root, src.digest)
    stats = train(student, teacher, layers, ctx.train_texts, tokenizer, cfg, ctx.progress, source=source)
    if "self" in cfg.losses and cfg.self_mode == "born-again":
        stats = born_again(student, teacher, layers, ctx.train_texts, tokenizer, cfg, ctx.progress, source, stats)

    student.save_pretrained(str(out), safe_serialization=True)
    save_projection(student, out)
    if plan is not None:
        (out / pruning.PLAN_FILE).write_text(json.dumps(plan, indent=2, sort_keys=True))
    tokenizer_files = copy_tokenizer(src.path, out)
    return seal(out, "torch", {
        **src.meta,
        "parent": src.digest,
        "layers": layers,
        "num_layers": len(layers),
        "structure": pruning.structure(student),
        "params": count_params(student),
        "teacher_params": count_params(teacher),
        **stats,
        **config_meta,
        "train_inputs": len(ctx.train_texts),
        "tokenizer_files": tokenizer_files,
    })
