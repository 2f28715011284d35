"""Task causal-lm: distillation of causal language models, teacher -> smaller
student (torch), and the ONNX export; the distill and export stages hand over
to `distill` and `export` here when meta task says causal-lm.

Any decoder-only Hugging Face AutoModelForCausalLM is a teacher: its blocks are
found as the one nn.ModuleList of config.num_hidden_layers modules (`blocks_path`:
GPT-2, GPT-Neo, Bloom, Falcon `transformer.h`; GPT-NeoX `gpt_neox.layers`; OPT
`model.decoder.layers`; Llama, Mistral, Qwen2/3, Phi, Gemma `model.layers`), not
from a table of families. Tested: GPT-2 by a whole `compress build`, Llama stage
by stage (distill, export, quantize, eval), and the student's derivation, KV-cache
generation, reload and ONNX export for Llama, Qwen2, GPT-NeoX, OPT and GPT-Neo.
An encoder-decoder or a model without one such list is a SourceError naming
what is supported.

The student keeps a subset of the teacher's blocks, initialised from them
(`derive_student`), and is built from a config of its own depth with the
per-layer config lists (layer_types, ...) sliced alike (`student_config`), so
it generates with a KV cache and reloads with from_pretrained. `train` fits it
to the teacher with the losses named in `LmDistillConfig.losses`:

- `logit` (off-policy, Hinton et al. 2015): the train texts are run through
  both models and the student matches the teacher's next-token distribution at
  every real position, KL(teacher_T || student_T) * T^2 (`temperature`), plus an
  optional next-token cross entropy (`hard_label_weight`).
- `on_policy` (GKD, Agarwal et al. 2024): an off-policy student meets states at
  generation time it never saw in training (its own mistakes) and compounds
  them. So with probability `lmbda` a batch is made on-policy: prompts (the
  first `prompt_tokens` tokens of train texts) are continued by the student
  itself (eval mode, no_grad; `max_new_tokens`, `sample_temperature`, `top_p`),
  the teacher scores the student's sequence, and the student is trained on the
  generated positions only with the generalized JSD(`beta`) (0 forward KL,
  1 reverse KL). The other batches use the same divergence on the train texts.

The teacher's logits on the train texts are computed once and stored as their
top `teacher_topk` per position (compress/teacher_cache.py), so the train-text
losses run no teacher forward after the first run (their `*_topk` variants
compare the distributions over that set); only on-policy batches, on samples
no cache can know, run the live teacher.

Both can be listed; their losses add. Retention metrics are in compress/lm_eval.py;
`export_causal_lm` writes the ONNX graph the targets run. On several processes
(`--nproc`), `train` deals the texts, and the on-policy prompts, out among them
(compress/distributed.py).
"""

from __future__ import annotations

import copy
import logging
import random
import warnings
from pathlib import Path

from compress.artifact import Artifact, copy_tokenizer, seal
from compress.errors import RecipeError, SourceError, StageError
from compress.recipe import ExportConfig, LmDistillConfig

log = logging.getLogger(__name__)

VERSION = 1

# A causal-lm teacher is a decoder-only model whose class is one of these kinds
CAUSAL_LM_KINDS = ("ForCausalLM", "LMHeadModel")
TESTED_FAMILIES = "GPT-2, Llama, Qwen2, GPT-NeoX, OPT"
SUPPORTED = (f"task causal-lm distils decoder-only AutoModelForCausalLM models whose blocks are one "
             f"nn.ModuleList of config.num_hidden_layers modules (tested: {TESTED_FAMILIES})")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def num_layers(config) -> int | None:
    """The config's block count: num_hidden_layers, which attribute_map
    renames where a family spells it otherwise (GPT-2 n_layer, GPT-Neo num_layers)."""
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def blocks_path(model) -> str:
    """Where the decoder blocks live ('transformer.h' in GPT-2, 'model.layers' in
    Llama, 'gpt_neox.layers', 'model.decoder.layers' in OPT, ...): the one
    nn.ModuleList, outermost, whose length is the config's number of hidden
    layers. Found by that property rather than by a table of paths, so a family
    nobody listed works when it is built the usual way."""
    import torch

    name, config = type(model).__name__, getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not name.endswith(CAUSAL_LM_KINDS):
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "not a causal LM"
        raise SourceError(f"{name} is {kind}; {SUPPORTED}")
    n = num_layers(config)
    if n is None:
        raise SourceError(f"{name}'s config ({type(config).__name__}) has no num_hidden_layers; {SUPPORTED}")
    lists = [path for path, module in model.named_modules()
             if path and isinstance(module, torch.nn.ModuleList) and len(module) == n]
    # a list inside a block (experts, heads) may have n entries too: the blocks hold it
    outer = [path for path in lists if not any(path.startswith(other + ".") for other in lists)]
    if len(outer) == 1:
        return outer[0]
    found = f"{len(outer)} such lists ({', '.join(outer)})" if outer else "none"
    raise SourceError(f"{name}: cannot tell which nn.ModuleList holds its {n} decoder blocks, found {found}; "
                      f"{SUPPORTED}")


def per_layer_fields(config, n: int) -> list[str]:
    """Config fields that hold one entry per block (layer_types, per-layer
    sliding windows or head counts): the list-valued fields of length n, less
    the generic ones (architectures, token ids) a list of n may be by chance."""
    from transformers import PretrainedConfig

    generic = set(PretrainedConfig().to_dict())
    return [key for key, value in config.to_dict().items()
            if isinstance(value, list) and len(value) == n and key not in generic and "token_id" not in key]


# per-layer lists a config expands on load from another field, which is what it saves: field -> how to set that one
_EXPANDED = {"attention_layers": lambda kept: {"attention_types": [[kept, 1]]}}  # GPT-Neo


def student_config(config, layers: list[int]):
    """`config` with the blocks `layers` only: the layer count set and each
    per-layer list sliced, checked to survive save_pretrained/from_pretrained
    (the student is reloaded by every later stage)."""
    n = num_layers(config)
    fields = per_layer_fields(config, n)
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(layers)
    for key in fields:
        kept = [getattr(config, key)[i] for i in layers]
        setattr(config, key, kept)
        if key in _EXPANDED:
            for other, value in _EXPANDED[key](kept).items():
                setattr(config, other, value)
    try:
        reloaded = type(config).from_dict(config.to_dict())
    except (TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{config.model_type}: the config of a student of layers {layers} does not reload "
                          f"({first}); {SUPPORTED}") from exc
    for key in ["num_hidden_layers", *fields]:
        if getattr(reloaded, key, None) != getattr(config, key):
            raise SourceError(f"{config.model_type}: the student's config.{key} {getattr(config, key)} reloads as "
                              f"{getattr(reloaded, key, None)}, so a student of layers {layers} would not survive "
                              f"from_pretrained; {SUPPORTED}")
    return config


def check_teacher(source: str) -> None:
    """A causal-lm teacher must be a decoder-only causal LM; found from its config, before any stage runs."""
    import json

    from compress import sources

    _, path = sources.check(source, None)
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith(CAUSAL_LM_KINDS) for a in archs):
        raise SourceError(f"teacher.source: {path} is a {', '.join(archs) or 'model without architectures'}, not a "
                          "causal language model; task causal-lm needs an AutoModelForCausalLM directory "
                          f"saved with save_pretrained (tested: {TESTED_FAMILIES})")
    if config.get("is_encoder_decoder"):
        raise SourceError(f"teacher.source: {path} is an encoder-decoder ({', '.join(archs)}); {SUPPORTED}")


def load_causal_lm(path: str | Path):
    """A Hugging Face causal LM with eager attention (the graph the exporter knows), in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot load a causal LM from {path}: {first}; point teacher.source at an "
                          "AutoModelForCausalLM directory") from exc
    return model.eval()


def derive_student(teacher, layers: list[int]):
    """A copy of `teacher` keeping only the blocks `layers` (in that order),
    initialised from them; embeddings, final norm and LM head are copied.

    The student is built from a config with fewer layers (`student_config`),
    not by slicing the module list, so what each block knows of its index
    (the attention's layer_idx, which addresses the KV cache; its layer type,
    sliding or full attention) is that of its new place, and the student
    generates with a cache and reloads with from_pretrained."""
    import torch

    from compress.models import every_other_layer

    path = blocks_path(teacher)
    n = len(_get(teacher, path))
    if not layers or any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise RecipeError(f"student layers {layers} must be distinct indices of the teacher's {n} blocks "
                          f"(0..{n - 1}); pick e.g. {every_other_layer(n)}")
    config = student_config(teacher.config, layers)
    with torch.random.fork_rng():  # the fresh weights are all overwritten: leave the caller's RNG stream alone
        student = type(teacher)(config)
    source = teacher.state_dict()
    prefix = path + "."
    state = {}
    for key, value in student.state_dict().items():
        origin = key
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            origin = f"{prefix}{layers[int(index)]}.{rest}"
        if origin not in source or source[origin].shape != value.shape:
            # a family whose blocks differ by index in a way no per-layer config list records
            got = f"is {tuple(source[origin].shape)}" if origin in source else "does not exist"
            raise SourceError(f"{type(teacher).__name__}: the student's {key} {tuple(value.shape)} would come from "
                              f"the teacher's {origin}, which {got}; this family's blocks differ by index (dense and "
                              f"expert blocks, say), so layers {layers} cannot be kept; {SUPPORTED}")
        state[key] = source[origin].clone()
    student.load_state_dict(state, strict=True)
    return student.eval()


def _pad_right(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def encode(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def pad_id_of(tokenizer) -> int:
    for tok in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok is not None:
            return tok
    return 0


def sample_continuations(model, prompts, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                         pad_id: int = 0, eos_id: int | None = None):
    """The model continues `prompts` ([batch, prompt_len], no padding) in eval
    mode without gradients; temperature 0 is greedy. Returns (sequences [batch,
    prompt_len + new], mask [batch, new] of the generated tokens that count:
    up to and including the first EOS)."""
    import torch
    from transformers import GenerationConfig

    greedy = temperature == 0
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy,
                           temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                           top_k=None, pad_token_id=pad_id, eos_token_id=eos_id)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        seqs = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gen)
    model.train(was_training)
    new = seqs[:, prompts.shape[1]:]
    keep = torch.ones_like(new, dtype=torch.bool)
    if eos_id is not None:
        # generate pads the rows that ended while others go on
        is_eos = (new == eos_id).long()
        keep = (is_eos.cumsum(1) - is_eos) == 0
    return seqs, keep


def train(student, teacher, texts: list[str], tokenizer, cfg: LmDistillConfig, progress=None,
          desc: str = "distill", source=None) -> dict:
    """Distil `student` (in place) towards `teacher` on `texts`; returns stats.

    The teacher's logits on the train texts are computed once and kept as its
    top `teacher_topk` per position (teacher_cache.obtain_topk): on disk under
    `source.cache_root` when there is one, where later runs and rebuilds find
    them, else in memory for this run. `teacher` may be None when `source.load`
    can give it: it is then loaded only if the entry must be computed or
    on-policy batches need it to score the student's own samples.

    On several ranks (compress/distributed.py) each step deals one global batch
    of batch_size x world texts out across them, and an on-policy step deals
    out batch_size x world prompts drawn alike on every rank: each rank samples
    continuations of its own prompts with the bare student (generation is not
    a DDP forward), then runs its one DDP forward for the loss. Each rank draws
    its samples from its own torch seed (cfg.seed + rank)."""
    import torch

    from compress import distributed
    from compress.distill import _Silent, coverage, no_dropout, optimizer
    from compress.losses import generalized_jsd, generalized_jsd_topk, hard_label_ce, logit_kl_topk

    world = distributed.world() if distributed.collective() else distributed.World()
    torch.manual_seed(cfg.seed + world.rank)  # the continuations sampled; rank 0 draws as one process does
    rng = random.Random(cfg.seed)  # the same on every rank: batches, on-policy steps and prompts alike
    no_dropout(student)
    pad_id = pad_id_of(tokenizer)
    eos_id = tokenizer.eos_token_id
    use_logit, use_policy = "logit" in cfg.losses, "on_policy" in cfg.losses

    encoded = [e for e in encode(texts, tokenizer, cfg.max_length) if len(e) >= 2]
    if not encoded:
        raise SourceError(f"{desc}: none of the {len(texts)} train texts has 2 tokens or more; "
                          "a causal LM learns from token sequences, give it longer texts")
    prompts = [e[:cfg.prompt_tokens] for e in encoded if len(e) > cfg.prompt_tokens]
    if use_policy and cfg.lmbda > 0 and not prompts:
        longest = max(len(e) for e in encoded)
        raise RecipeError(f"{desc}: on_policy needs train texts longer than prompt_tokens {cfg.prompt_tokens}, "
                          f"the longest has {longest} tokens; lower prompt_tokens below {longest}")
    # global batches of texts of similar length (a batch pads little), dealt out across the ranks
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    size = cfg.batch_size * world.size
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    total = cfg.max_steps or len(batches) * cfg.epochs

    live = LiveTeacher(teacher, source, desc)
    # the train-text batches (logit, and on_policy's off-policy share) read the teacher from the top-k entry
    cached = None
    if use_logit or (use_policy and cfg.lmbda < 1):
        cached = teacher_topk(live, encoded, pad_id, min(cfg.teacher_topk, student.config.vocab_size), cfg,
                              source, progress if world.main else None, desc)

    opt, sched = optimizer(student, total, cfg.lr, cfg.weight_decay, cfg.warmup)
    step_fn = distributed.wrap(lm_step(student))
    bar = progress(total=total, desc=desc) if progress and world.main else _Silent()

    history, seen, on_policy_steps, generated = [], [], 0, 0
    for _, rows, weight in distributed.dealt_steps(batches, total, rng, world, seen):
        student.train()
        on_policy = use_policy and cfg.lmbda > 0 and rng.random() < cfg.lmbda
        uses_texts = use_logit or (use_policy and not on_policy)
        forward = []  # the (ids, mask) pairs of this step's one student forward
        if uses_texts:
            ids, mask = _pad_right([encoded[i] for i in rows], pad_id)
            forward.append((ids, mask))
        if on_policy:
            picked = rng.sample(prompts, min(size, len(prompts)))
            mine = distributed.deal(picked, world.rank, world.size)
            policy_weight = len(mine) * world.size / len(picked)
            batch_prompts = torch.tensor(mine or picked[:1])  # a rank dealt none samples one, at weight 0
            seqs, keep = sample_continuations(student, batch_prompts, cfg.max_new_tokens,
                                              cfg.sample_temperature, cfg.top_p, pad_id, eos_id)
            on_policy_steps += 1
            generated += int(keep.sum()) if mine else 0
            forward.append((seqs, torch.ones_like(seqs)))
        outs = step_fn(*forward)
        # the losses on this rank's texts and on its samples, each weighted by its share of the global batch
        text_loss = sample_loss = torch.zeros(())
        parts = {}
        if uses_texts:
            s_data, t_data = outs[0], cached.batch(rows, ids.shape[1])
        if use_logit:
            # every real position has a teacher distribution to copy, the last one included
            kd = logit_kl_topk(s_data, t_data, cfg.temperature, mask)
            parts["logit"] = kd.item()
            text_loss = text_loss + kd
            if cfg.hard_label_weight > 0:
                labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))[:, 1:]
                ce = hard_label_ce(s_data[:, :-1], labels)
                parts["ce"] = ce.item()
                text_loss = text_loss + cfg.hard_label_weight * ce
        if on_policy:
            # the distributions the generated tokens were drawn from: positions start-1 .. end-1
            start = batch_prompts.shape[1]
            s_gen = outs[-1][:, start - 1:-1]
            t_gen = live.logits(seqs, torch.ones_like(seqs))[:, start - 1:-1]
            sample_loss = generalized_jsd(s_gen, t_gen, cfg.beta, cfg.temperature, keep)
            parts["on_policy"] = sample_loss.item()
        elif use_policy:
            pol = generalized_jsd_topk(s_data, t_data, cfg.beta, cfg.temperature, mask)
            parts["on_policy"] = pol.item()
            text_loss = text_loss + pol
        loss = weight * text_loss + (policy_weight * sample_loss if on_policy else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        value = (text_loss + sample_loss).item()  # on this rank's share, unweighted
        history.append(value)
        bar.update(1, loss=value, **parts)
    bar.close()
    student.eval()
    step = len(history)
    window = max(1, min(20, len(history) // 4))
    head = sum(history[:window]) / window
    tail = sum(history[-window:]) / window
    forwards = (cached.forwards if cached is not None else 0) + live.forwards
    if world.size > 1:  # totals over the ranks
        generated, forwards = (sum(x) for x in zip(*distributed.gather((generated, forwards))))
    log.info("%s: %d steps (%d on-policy, %d generated tokens), loss %.4f -> %.4f",
             desc, step, on_policy_steps, generated, head, tail)
    return {"steps": step, "on_policy_steps": on_policy_steps, "generated_tokens": generated,
            "loss_first": head, "loss_last": tail, "history": history,
            "teacher_forwards": forwards, "teacher_loaded": live.loaded,
            "teacher_outputs": cached.stats() if cached is not None else None,
            "data": coverage(seen, len(encoded), world)}


def lm_step(student):
    """The student's logits on each (ids, mask) pair of a step (the train texts,
    the on-policy samples), as one module call: DistributedDataParallel
    synchronises the gradients of one forward per backward."""
    import torch

    class LmStep(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, *pairs):
            return [self.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits for ids, mask in pairs]

    return LmStep(student)


class LiveTeacher:
    """The teacher model for the forwards the cache cannot serve: the one given,
    or loaded through source.load the first time it is needed (never, when
    every teacher output comes from a cached entry). Counts the forwards of
    `logits` (the on-policy batches)."""

    def __init__(self, model, source, desc: str):
        self.model, self.source, self.desc = model, source, desc
        self.loaded = model is not None
        self.forwards = 0
        if model is not None:
            model.eval()

    def get(self):
        from compress.errors import CacheError

        if self.model is None:
            load = getattr(self.source, "load", None)
            if load is None:
                raise CacheError(f"{self.desc}: the teacher is needed (its outputs are not cached under "
                                 f"{getattr(self.source, 'cache_root', None)}, or on_policy scores samples) and no "
                                 "teacher model or loader was given; pass the teacher to lm_distill.train()")
            self.model = load().eval()
            self.loaded = True
        return self.model

    def logits(self, ids, mask):
        import torch

        model = self.get()
        self.forwards += 1
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def teacher_topk(live: LiveTeacher, encoded: list[list[int]], pad_id: int, k: int, cfg: LmDistillConfig, source,
                 progress, desc: str):
    """The teacher's top-k logits at every real position of the encoded train
    texts (teacher_cache.TopK), keyed by the teacher, the token ids (texts,
    tokenizer, max_length), k and max_length."""
    from compress import teacher_cache

    settings = {"task": "causal-lm", "logits": "top-k", "max_length": cfg.max_length, "dtype": "float16"}

    def runner():
        model = live.get()  # on a miss only: a cached entry never loads the teacher

        def run(rows):
            import torch

            ids, mask = _pad_right(rows, pad_id)
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        return run

    return teacher_cache.obtain_topk(source, encoded, settings, k, runner, progress, desc)


def export_causal_lm(model, path: str | Path, opset: int = 17) -> Path:
    """Export (input_ids, attention_mask) -> logits [batch, sequence, vocab] to
    ONNX with the TorchScript exporter (dynamo=False, as compress/export.py),
    dynamic batch and sequence axes, no KV cache."""
    import onnx
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    path = Path(path)
    module = Logits(model).eval()
    # a dummy with padding, so the traced graph keeps the mask path
    ids = torch.ones((2, 12), dtype=torch.long)
    mask = torch.ones((2, 12), dtype=torch.long)
    mask[1, 8:] = 0
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        try:
            torch.onnx.export(module, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        except RuntimeError as exc:  # the exporter's errors (OnnxExporterError) are RuntimeErrors
            # e.g. a mixture of experts' routing (aten::histc); the exporter's message ends in the whole graph
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageError(f"export: {type(model).__name__} does not export to ONNX opset {opset}: {first}; try "
                             f"another stages.export.opset, or a teacher of a tested family ({TESTED_FAMILIES})") from exc
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


# -- the stages -----------------------------------------------------------------

def distill(src: Artifact, cfg: LmDistillConfig, ctx) -> Artifact:
    """Stage `distill` for task causal-lm (the embedding stage hands over here)."""
    from compress.encoders import load_tokenizer
    from compress.models import count_params, every_other_layer
    from compress.teacher_cache import TeacherSource

    teacher = load_causal_lm(src.path)
    n = len(_get(teacher, blocks_path(teacher)))
    layers = cfg.layers or every_other_layer(n)
    student = derive_student(teacher, layers)
    teacher_params = count_params(teacher)
    # The student holds what it needs of the teacher; training reloads the
    # teacher only if its logits are not cached yet or on_policy scores samples.
    del teacher
    tokenizer = load_tokenizer(src.path)
    source = TeacherSource(ctx.cache_root, src.digest, load=lambda: load_causal_lm(src.path))
    stats = train(student, None, ctx.train_texts, tokenizer, cfg, ctx.progress, source=source)
    stats.pop("history")  # one value per step: the first and last windows are kept
    student.save_pretrained(str(ctx.out), safe_serialization=True)
    return seal(ctx.out, "torch", {
        **src.meta,
        "parent": src.digest,
        "layers": layers,
        "num_layers": len(layers),
        "params": count_params(student),
        "teacher_params": teacher_params,
        "losses": list(cfg.losses),
        **stats,
        "train_inputs": len(ctx.train_texts),
        "tokenizer_files": copy_tokenizer(src.path, ctx.out),
    })


def export(src: Artifact, cfg: ExportConfig, ctx) -> Artifact:
    """Stage `export` for task causal-lm: (input_ids, attention_mask) -> logits
    [batch, sequence, vocab], validated against torch on held-out texts (every
    real position) and random tokens with ragged padding."""
    from compress.export import validate
    from compress.lm_eval import OnnxLm, TorchLm

    model = load_causal_lm(src.path)
    path = export_causal_lm(model, ctx.out / "model.onnx", cfg.opset)
    tokenizer_files = copy_tokenizer(src.path, ctx.out)

    def logits(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    texts = list(ctx.validation_texts)
    real, rand = validate(TorchLm(src.path, ctx.max_length, model), OnnxLm(path, ctx.out, ctx.max_length),
                          logits, model.config.vocab_size, texts, cfg, "ONNX logits disagree")
    config = model.config
    return seal(ctx.out, "onnx", {
        **src.meta,
        "parent": src.digest,
        "precision": "fp32",
        "opset": cfg.opset,
        "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
        "outputs": {"logits": ["batch", "sequence", config.vocab_size]},
        "model_type": config.model_type,
        "num_heads": config.num_attention_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "validation": {"texts": real, "random": rand, "num_texts": len(texts)},
        "tokenizer_files": tokenizer_files,
    })
