"""Where a Hugging Face encoder keeps its parts.

compress runs a teacher's layers itself (models.make_sentence_encoder,
classify.make_classifier), derives students by picking layers, and prunes,
narrows, sparsifies and fake-quantizes individual Linears. Those need to know
where the layers are and which Linear is a layer's query or its FFN input; the
families differ only in names:

- `bert`: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA (with its embedding
  projection), Data2Vec-text, ... (`encoder.layer[i].attention.self.query`);
- `mpnet`: MPNet (all-mpnet-base-v2); its layers take a relative position bias
  the encoder computes once per forward, shared across heads' layers, so its heads
  cannot be pruned or narrowed one layer at a time;
- `deberta-v2`: DeBERTa-v2 and -v3; its layers take relative positions and
  the encoder's relative embeddings, and a multiplicative mask; heads as MPNet;
- `distilbert`: DistilBERT (`transformer.layer[i].attention.q_lin`).

A layout is found from the model's structure, not its name, and `check`
verifies it: our layer loop must give the model's own last hidden state on a
padded probe batch, so a family with other inputs to its layers (DeBERTa's
ALBERT's shared layers, rotary ModernBERT) is refused with
one line instead of being silently distilled wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import RecipeError, SourceError

SUPPORTED = "BERT, RoBERTa, XLM-RoBERTa, ELECTRA, MPNet, DeBERTa-v2/v3 and DistilBERT"


@dataclass(frozen=True)
class Layout:
    name: str
    blocks: str  # the layer ModuleList, from the base model
    attention: str  # the self-attention module (holds the head size), from a layer
    linears: dict  # role -> path from a layer: query, key, value, attention_output, ffn_in, ffn_out
    heads_attrs: tuple  # attributes of the attention module that count heads / their width (kept in step on pruning)
    prunable_heads: bool = True


BERT = Layout("bert", "encoder.layer", "attention.self",
              {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
               "attention_output": "attention.output.dense", "ffn_in": "intermediate.dense",
               "ffn_out": "output.dense"},
              ("num_attention_heads", "all_head_size"))
MPNET = Layout("mpnet", "encoder.layer", "attention.attn",
               {"query": "attention.attn.q", "key": "attention.attn.k", "value": "attention.attn.v",
                "attention_output": "attention.attn.o", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
               ("num_attention_heads", "all_head_size"), prunable_heads=False)
# DeBERTa-v2/v3: disentangled attention over relative positions (its encoder's
# relative embeddings, shared by every layer) and a multiplicative [b, 1, s, s] mask.
DEBERTA = Layout("deberta-v2", "encoder.layer", "attention.self",
                 {"query": "attention.self.query_proj", "key": "attention.self.key_proj",
                  "value": "attention.self.value_proj", "attention_output": "attention.output.dense",
                  "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
                 ("num_attention_heads", "all_head_size"), prunable_heads=False)
DISTILBERT = Layout("distilbert", "transformer.layer", "attention",
                    {"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
                     "attention_output": "attention.out_lin", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2"},
                    ("n_heads",))
LAYOUTS = (BERT, MPNET, DEBERTA, DISTILBERT)


def get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _has(obj, dotted: str) -> bool:
    try:
        get(obj, dotted)
        return True
    except AttributeError:
        return False


def base_of(model):
    """The encoder itself: a task model's base_model (classifier), or the model."""
    base = getattr(model, "base_model", model)
    return base if base is not None else model


def find(model) -> Layout | None:
    base = base_of(model)
    for layout in LAYOUTS:
        if _has(base, layout.blocks) and len(get(base, layout.blocks)) and \
                all(_has(get(base, layout.blocks)[0], p) for p in layout.linears.values()) and _has(base, "embeddings"):
            return layout
    return None


def of(model) -> Layout:
    layout = find(model)
    if layout is None:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise SourceError(f"{type(model).__name__} ({kind}) has layers compress cannot run; "
                          f"supported encoder families: {SUPPORTED}")
    return layout


def blocks(model):
    """The encoder's layers (an nn.ModuleList)."""
    base = base_of(model)
    return get(base, of(base).blocks)


def set_blocks(model, modules) -> None:
    """Replace the layers (the config's layer count follows, so save_pretrained records it)."""
    import torch

    base = base_of(model)
    path = of(base).blocks.split(".")
    setattr(get(base, ".".join(path[:-1])), path[-1], torch.nn.ModuleList(list(modules)))
    base.config.num_hidden_layers = len(modules)  # attribute_map: DistilBERT's n_layers
    owner = get(base, ".".join(path[:-1]))
    if hasattr(owner, "n_layers"):
        owner.n_layers = len(modules)


def linear(layer, role: str, layout: Layout | None = None):
    return get(layer, (layout or _layer_layout(layer)).linears[role])


def set_linear(layer, role: str, module, layout: Layout | None = None) -> None:
    path = (layout or _layer_layout(layer)).linears[role].split(".")
    setattr(get(layer, ".".join(path[:-1])), path[-1], module)


def linears(layer) -> dict:
    """A layer's six Linears by role."""
    layout = _layer_layout(layer)
    return {role: get(layer, path) for role, path in layout.linears.items()}


def _layer_layout(layer) -> Layout:
    for layout in LAYOUTS:
        if all(_has(layer, p) for p in layout.linears.values()):
            return layout
    raise SourceError(f"{type(layer).__name__} is not a layer of a supported encoder ({SUPPORTED})")


def attention(layer):
    return get(layer, _layer_layout(layer).attention)


def head_size(layer) -> int:
    return int(attention(layer).attention_head_size)


def num_heads(layer) -> int:
    return linear(layer, "query").out_features // head_size(layer)


def set_heads(layer, heads: int) -> None:
    """Keep the attention module's head bookkeeping in step with pruned Q/K/V."""
    att = attention(layer)
    for attr in _layer_layout(layer).heads_attrs:
        if hasattr(att, attr):
            setattr(att, attr, heads * head_size(layer) if attr == "all_head_size" else heads)


def check_heads_prunable(model, what: str) -> None:
    layout = of(model)
    if not layout.prunable_heads:
        raise RecipeError(f"{what}: a {layout.name} encoder's layers share relative position terms per head, so "
                          "its heads cannot be removed or narrowed per layer; remove the heads/hidden setting "
                          "(layers and FFN width can be reduced)")


def embed(model, input_ids, attention_mask=None):
    """The embedding layer's output (the first hidden state)."""
    import torch

    base = base_of(model)
    layout = of(base)
    if layout is DEBERTA:  # its embeddings zero the padded positions
        hidden = base.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids),
                                 mask=attention_mask)
    elif layout is DISTILBERT:
        hidden = base.embeddings(input_ids)
    elif layout is MPNET:
        hidden = base.embeddings(input_ids=input_ids)
    else:
        hidden = base.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
    project = getattr(base, "embeddings_project", None)  # ELECTRA: embedding width -> hidden width
    return project(hidden) if project is not None else hidden


def layer_inputs(base, layout: Layout, hidden, attention_mask):
    """(the mask every layer takes, its other inputs, DeBERTa-v2's convolution after
    the first layer or None). The additive mask is built here: transformers' masking
    utilities trace to shape-specialised ONNX graphs, this does not."""
    if layout is DEBERTA:  # a multiplicative mask; relative positions and embeddings from its encoder
        encoder = base.encoder
        extra = {"relative_pos": encoder.get_rel_pos(hidden), "rel_embeddings": encoder.get_rel_embedding()}
        return encoder.get_attention_mask(attention_mask), extra, encoder.conv  # conv is None in v3
    keep = attention_mask[:, None, None, :].to(hidden.dtype)
    additive = (1.0 - keep) * -10000.0
    if layout is MPNET:  # one relative position bias per forward, shared by every layer
        return additive, {"position_bias": base.encoder.compute_position_bias(hidden)}, None
    return additive, {}, None


def run(model, input_ids, attention_mask):
    """Every hidden state (embeddings first)."""
    base = base_of(model)
    layout = of(base)
    hidden = embed(base, input_ids, attention_mask)
    layer_mask, extra, conv = layer_inputs(base, layout, hidden, attention_mask)
    states = [hidden]
    for i, layer in enumerate(get(base, layout.blocks)):
        hidden = layer(hidden, attention_mask=layer_mask, **extra)
        if isinstance(hidden, tuple):  # older transformers, MPNet and DeBERTa return tuples
            hidden = hidden[0]
        if i == 0 and conv is not None:
            hidden = conv(states[0], hidden, attention_mask)
        states.append(hidden)
    return states


def check(model, where) -> Layout:
    """The layout, after checking on a padded probe batch that our layer loop gives the
    model's own last hidden state (the one thing every task reads)."""
    import torch

    base = base_of(model)
    layout = of(base)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    was_training = base.training
    base.eval()
    try:
        with torch.inference_mode():
            ours = run(base, ids, mask)[-1]
            theirs = base(input_ids=ids, attention_mask=mask).last_hidden_state
    except Exception as exc:  # noqa: BLE001 - any failure means the layout does not fit
        raise SourceError(f"teacher {where}: running its {layout.name}-layout layers failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); supported encoder families: "
                          f"{SUPPORTED}") from None
    finally:
        base.train(was_training)
    keep = mask.bool()
    diff = float((ours[keep] - theirs[keep]).abs().max())
    if diff > 1e-3 * max(1.0, float(theirs[keep].abs().max())):
        kind = base.config.model_type
        raise SourceError(f"teacher {where} is a {kind} model whose layers need more than compress gives them "
                          f"(its own forward differs by {diff:.2g}); supported encoder families: {SUPPORTED}")
    return layout
