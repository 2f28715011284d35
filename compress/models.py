"""Torch-side model helpers: load a Hugging Face encoder, run it as a sentence
encoder (mean pooling + L2 norm), and make a student: derived (a layer subset,
optionally with a narrower hidden width) or built from a config of the
teacher's type; a narrower one has an output projection back to the teacher's width.

Used by distill (training), export (the graph that becomes ONNX) and eval.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compress.errors import RecipeError, SourceError

log = logging.getLogger(__name__)


def load_hf_encoder(path: str | Path):
    """Load a Hugging Face encoder with eager attention (exportable, fusable)."""
    from transformers import AutoModel

    from compress.prune import PLAN_FILE, load_pruned

    if (Path(path) / PLAN_FILE).is_file():
        model = load_pruned(Path(path))
    else:
        try:
            model = AutoModel.from_pretrained(str(path), attn_implementation="eager")
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceError(f"cannot load a Hugging Face model from {path}: {first}; "
                              "point teacher.source at a directory with config.json and weights") from exc
        check_supported(model, path)
    load_projection(model, Path(path))
    return model.eval()


def check_supported(model, where) -> None:
    """One line when compress cannot run this encoder's layers (compress/layouts.py)."""
    from compress import layouts

    layouts.check(model, where)


def make_sentence_encoder(model):
    """Wrap an HF encoder (a family compress/layouts.py knows) as (input_ids, attention_mask) -> embedding."""
    import torch
    import torch.nn.functional as F

    from compress import layouts

    class SentenceEncoder(torch.nn.Module):
        """Mean-pooled, L2-normalised sentence embedding, plus every hidden state.

        The layers run in layouts.run, with an additive attention mask built there rather
        than by transformers' masking utilities, which trace to shape-specialised ONNX graphs.
        """

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            # A narrower student's output projection: registered here, so it trains
            # with the encoder and is part of the exported graph.
            self.projection = projection_of(encoder)

        def encode(self, input_ids, attention_mask):
            states = layouts.run(self.encoder, input_ids, attention_mask)
            hidden = states[-1]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if self.projection is not None:
                pooled = self.projection(pooled)
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

    from compress import layouts

    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        from compress.errors import RecipeError
        raise RecipeError(f"stages.distill.student.layers {layers} is not a non-empty list of "
                          f"teacher layer indices in 0..{n - 1}; pick e.g. {every_other_layer(n)}")
    student = copy.deepcopy(teacher)
    layouts.set_blocks(student, [copy.deepcopy(layouts.blocks(teacher)[i]) for i in layers])
    return student


def count_params(model) -> int:
    """The encoder's parameters and its output projection's, if it has one."""
    proj = projection_of(model)
    extra = sum(p.numel() for p in proj.parameters()) if proj is not None else 0
    return sum(p.numel() for p in model.parameters()) + extra


# --- narrower hidden width ----------------------------------------------------
#
# A student narrower than its teacher keeps `hidden` of the teacher's residual
# dimensions and hidden / head_dim whole heads per layer, sliced from the
# teacher's weights: a standard HF model of the smaller config (from_pretrained
# reloads it). Its mean-pooled output goes through a Linear(hidden -> teacher
# hidden) before the L2 norm, so its embeddings live in the teacher's space.
# The projection is kept out of the HF model's state dict (in the module's
# __dict__, not registered): model.safetensors stays a plain checkpoint of the
# architecture config.json names, and the projection has its own file.

PROJECTION_FILE = "projection.safetensors"
PROJECTION_META = "projection.json"


def selection_projection(dims: list[int], width: int):
    """Linear(len(dims) -> width) that puts student dimension j back at teacher
    dimension dims[j] (the transpose of the selection) and leaves the rest 0."""
    import torch

    proj = torch.nn.Linear(len(dims), width)
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.zero_()
        proj.weight[torch.tensor(dims), torch.arange(len(dims))] = 1.0
    proj.dims = list(dims)
    return proj


def projection_of(model):
    """The output projection of a narrower student, or None."""
    return model.__dict__.get("sentence_projection")


def attach_projection(model, proj) -> None:
    model.__dict__["sentence_projection"] = proj


def save_projection(model, out: Path) -> None:
    """projection.safetensors (weight, bias) and projection.json beside the HF files, when there is one."""
    from safetensors.torch import save_file

    proj = projection_of(model)
    if proj is None:
        return
    save_file({"weight": proj.weight.detach().contiguous(), "bias": proj.bias.detach().contiguous()},
              str(out / PROJECTION_FILE))
    (out / PROJECTION_META).write_text(json.dumps(
        {"in_features": proj.in_features, "out_features": proj.out_features, "dims": list(proj.dims),
         "applied": "to the mean-pooled output, before the L2 norm"}, indent=2))


def load_projection(model, path: Path) -> None:
    from safetensors.torch import load_file

    if not (path / PROJECTION_META).is_file():
        return
    info = json.loads((path / PROJECTION_META).read_text())
    if info["in_features"] != model.config.hidden_size:
        raise SourceError(f"{path / PROJECTION_META}: projection from width {info['in_features']}, but the model's "
                          f"hidden size is {model.config.hidden_size}; the artifact is inconsistent, rebuild it")
    proj = selection_projection(info["dims"], info["out_features"])
    weights = load_file(str(path / PROJECTION_FILE))
    proj.load_state_dict({"weight": weights["weight"], "bias": weights["bias"]}, strict=True)
    attach_projection(model, proj)


def residual_scores(model):
    """One importance score per residual-stream dimension: |gamma| of every
    LayerNorm plus the word embeddings' column norm, each term scaled to mean 1
    so that no single norm decides."""
    import torch

    terms = [model.embeddings.word_embeddings.weight.detach().norm(dim=0)]
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
            terms.append(module.weight.detach().abs())
    return sum(t / t.mean().clamp(min=1e-12) for t in terms)


def _top(scores, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def narrow_hidden(model, hidden: int):
    """A copy of `model` with hidden width `hidden`, its weights sliced from
    `model`'s; an output projection back to the original width is attached
    (selection_projection of the kept dimensions). Heads are kept whole: the
    student has hidden / head_dim of them, chosen per layer by weight magnitude."""
    import torch
    from transformers import AutoModel

    from compress import layouts
    from compress.prune import head_scores

    layouts.check_heads_prunable(model, "stages.distill.student.hidden")
    width = model.config.hidden_size
    layers = layouts.blocks(model)
    head_dim = layouts.head_size(layers[0])
    if hidden >= width or hidden % head_dim:
        raise RecipeError(f"stages.distill.student.hidden {hidden} must be a multiple of the teacher's head size "
                          f"{head_dim} below its hidden size {width}; pick one of "
                          f"{list(range(head_dim, width, head_dim)) or 'none (the teacher has one head)'}")
    if projection_of(model) is not None or width != model.embeddings.word_embeddings.weight.shape[1]:
        raise RecipeError("stages.distill.student.hidden: the teacher is itself a narrowed student or has a "
                          "separate embedding width; distill from a standard encoder teacher")
    heads = hidden // head_dim
    few = [i for i, layer in enumerate(layers) if layouts.num_heads(layer) < heads]
    if few:
        raise RecipeError(f"stages.distill.student.hidden {hidden} keeps {heads} heads of {head_dim} dims, but "
                          f"teacher layers {few} have fewer; pick a smaller hidden")
    dims = _top(residual_scores(model), hidden)
    rows = []  # per layer: the Q/K/V rows (and attention-output columns) of the kept heads
    for layer in layers:
        kept = _top(head_scores(layer, "magnitude"), heads)
        rows.append(torch.tensor([h * head_dim + j for h in kept for j in range(head_dim)]))

    config = type(model.config).from_dict(model.config.to_dict())
    config.hidden_size, config.num_attention_heads = hidden, heads
    student = AutoModel.from_config(config, attn_implementation="eager")
    student.load_state_dict(_sliced(model.state_dict(), student.state_dict(), torch.tensor(dims), rows,
                                    layouts.of(model), width), strict=True)
    attach_projection(student, selection_projection(dims, width))
    return student.eval()


def _sliced(old: dict, new: dict, r, rows: list, layout, width: int) -> dict:
    """`old`'s tensors cut to `new`'s shapes: r = kept residual dims, rows[i] =
    layer i's kept attention rows; which Linear plays which role comes from the layout."""
    roles = {f"{layout.blocks}.{i}.{path}": (role, a)
             for i, a in enumerate(rows) for role, path in layout.linears.items()}
    out = {}
    for name, target in new.items():
        t = old[name]
        module, _, kind = name.rpartition(".")
        role, a = roles.get(module, (None, None))
        if role in ("query", "key", "value"):
            t = t[a][:, r] if kind == "weight" else t[a]
        elif role == "attention_output" and kind == "weight":
            t = t[r][:, a]
        elif (role == "ffn_in" and kind == "weight") or name.endswith("_embeddings.weight"):
            t = t[:, r]
        elif name.endswith("pooler.dense.weight"):
            t = t[r][:, r]
        elif t.shape != target.shape and t.ndim >= 1 and t.shape[0] == width:
            t = t[r]  # LayerNorms, output.dense rows and every bias of the residual stream
        if t.shape != target.shape:
            raise RecipeError(f"stages.distill.student.hidden: cannot slice {name} {tuple(old[name].shape)} to "
                              f"{tuple(target.shape)} (an unknown layout); leave hidden unset")
        out[name] = t.clone()
    return out


# --- a student given as a config ------------------------------------------------
#
# Instead of being cut from the teacher, the student can be any model of the
# teacher's type: a Hugging Face config (fields over the teacher's, or a
# config.json). Its layers start at Hugging Face's random init, since a layer of
# another shape has no honest counterpart in the teacher; its embeddings start
# as the teacher's, sliced to the residual dimensions narrow_hidden would keep.
# A narrower student gets the output projection of a `hidden` student, starting
# as the transpose of that slice.

CONFIG_FIELD = "stages.distill.student.config"
# Keys a saved config.json carries about itself, not about the architecture.
_BOOKKEEPING = ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "model_type")
_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")


def student_config_problem(fields: dict) -> str | None:
    """What is wrong with a student config's fields on their own, or None.
    Light (no torch): the recipe runs it; checks against the teacher are in config_student."""
    for name in _SIZES:
        value = fields.get(name)
        if name in fields and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{name} must be an integer >= 1, got {value!r}"
    hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
    if hidden is not None and heads is not None and hidden % heads:
        return (f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; pick a multiple of "
                f"{heads} (e.g. {heads * max(1, round(hidden / heads))}) or another head count")
    return None


def student_config_fields(config: dict | str) -> dict:
    """The fields of student.config: the mapping itself, or the JSON of the config.json it names
    (a directory means its config.json)."""
    if isinstance(config, dict):
        fields = dict(config)
    else:
        path = Path(config).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise RecipeError(f"{CONFIG_FIELD}: {path} does not exist; give the path of a config.json "
                              "or a mapping of config fields")
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{CONFIG_FIELD}: cannot read {path} as JSON ({exc}); fix the file") from None
        if not isinstance(fields, dict):
            raise RecipeError(f"{CONFIG_FIELD}: {path} holds a JSON {type(fields).__name__}, not an object of "
                              "config fields; save the config with config.save_pretrained()")
    problem = student_config_problem(fields)
    if problem:
        raise RecipeError(f"{CONFIG_FIELD}: {problem}")
    return fields


def config_student(teacher, config: dict | str, max_length: int, seed: int = 0):
    """(student, names of the tensors initialised from the teacher): a model of
    the teacher's type built from `config` (see the section comment)."""
    import torch
    from transformers import AutoModel

    fields = student_config_fields(config)
    base = teacher.config.to_dict()
    kind = teacher.config.model_type
    if fields.get("model_type", kind) != kind:
        raise RecipeError(f"{CONFIG_FIELD}.model_type: {fields['model_type']!r} differs from the teacher's "
                          f"{kind!r}; the student is a model of the teacher's type: drop model_type")
    unknown = sorted(k for k in fields if k not in base and k not in _BOOKKEEPING)
    if unknown:
        raise RecipeError(f"{CONFIG_FIELD}: unknown field {unknown[0]!r} for a {kind} config; check the spelling "
                          f"(e.g. {', '.join(_SIZES)})")
    merged = {**base, **{k: v for k, v in fields.items() if k not in _BOOKKEEPING}}
    problem = student_config_problem(merged)
    if problem:
        raise RecipeError(f"{CONFIG_FIELD}: {problem}")
    width, hidden = teacher.config.hidden_size, merged["hidden_size"]
    if hidden > width:
        raise RecipeError(f"{CONFIG_FIELD}.hidden_size: {hidden} is wider than the teacher's {width}; "
                          f"give at most {width}")
    if merged["vocab_size"] != teacher.config.vocab_size:
        raise RecipeError(f"{CONFIG_FIELD}.vocab_size: {merged['vocab_size']}, but the student reads the "
                          f"teacher's tokenizer ({teacher.config.vocab_size} tokens); drop vocab_size")
    positions = merged.get("max_position_embeddings")
    if positions is not None and positions < max_length:
        raise RecipeError(f"{CONFIG_FIELD}.max_position_embeddings: {positions} is below the {max_length} tokens "
                          "inputs are truncated to; raise it, or lower teacher.max_length and distill max_length")

    torch.manual_seed(seed)
    student = AutoModel.from_config(type(teacher.config).from_dict(merged), attn_implementation="eager")
    dims = _top(residual_scores(teacher), hidden)
    copied = teacher_embeddings(student, teacher, dims)
    if hidden < width:
        attach_projection(student, selection_projection(dims, width))
    return student.eval(), copied


def teacher_embeddings(student, teacher, dims: list[int]) -> list[str]:
    """Copy the teacher's embeddings (word, position, token type and their
    LayerNorm) into `student`'s at residual dimensions `dims`; of the position
    and token-type tables, the rows both have (the rest keep their init).
    Returns the names of the tensors written."""
    import torch

    r = torch.tensor(dims)
    width = teacher.config.hidden_size
    source = dict(teacher.embeddings.named_parameters())
    copied = []
    with torch.no_grad():
        for name, param in student.embeddings.named_parameters():
            t = source.get(name)
            if t is None:
                continue
            if name.endswith("_embeddings.weight") and t.shape[1] == width:
                rows = min(t.shape[0], param.shape[0])
                param[:rows] = t[:rows][:, r]
            elif t.ndim == 1 and t.shape[0] == width:
                param.copy_(t[r])
            else:
                continue
            copied.append(f"embeddings.{name}")
    return copied


def evenly_spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer each student layer learns: evenly spaced, the last
    student layer on the teacher's last (as every_other_layer does for half the depth)."""
    return [((i + 1) * teacher_layers + student_layers - 1) // student_layers - 1 for i in range(student_layers)]


def config_layers(layers: list[int] | None, student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each layer of a config student learns."""
    default = evenly_spaced_layers(teacher_layers, student_layers)
    if layers is None:
        return default
    if len(layers) != student_layers:
        raise RecipeError(f"stages.distill.student.layers: {len(layers)} teacher layers for a student.config of "
                          f"num_hidden_layers {student_layers}; give one per student layer, e.g. {default}")
    bad = [i for i in layers if not 0 <= i < teacher_layers]
    if bad:
        raise RecipeError(f"stages.distill.student.layers {layers}: {bad[0]} is not a teacher layer index in "
                          f"0..{teacher_layers - 1}; pick e.g. {default}")
    return list(layers)
