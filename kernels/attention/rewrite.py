"""ONNX rewrite: the unfused self-attention subgraph of an exported BERT-family
encoder -> one com.microsoft fused attention node per layer.

Used by the `fuse` stage (compress/fuse.py), after export and before quantize.
A direct matcher over onnx.GraphProto in the shape of onnxscript's rewriter
(`pattern`, `check`, `rewrite`; a failed match is a `NoMatch` carrying its
reason), so the stage adds no dependency beyond onnx.

Matched, per layer (the TorchScript export of transformers' eager attention):

    x -> MatMul(Wq) -> Add(bq) -> Reshape[B,S,H,D] -> Transpose(0,2,1,3) --------\\
    x -> MatMul(Wk) -> Add(bk) -> Reshape[B,S,H,D] -> Transpose(0,2,3,1) -> MatMul -> Mul(1/sqrt D) | Div(sqrt D)
    x -> MatMul(Wv) -> Add(bv) -> Reshape -> Transpose(0,2,1,3) ------\\              -> Add((1 - mask) * f)
                                                                       MatMul <- Softmax(-1)
    -> Transpose(0,2,1,3) -> Reshape[B,S,H*D]

Head counts and sizes are read per layer from the Reshape shapes and checked
against the weight shapes, so head-pruned layers (H*D < hidden) fuse too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# The two fused ops ONNX Runtime's CPU provider has for encoder self-attention.
OPS = ("Attention", "MultiHeadAttention")
MASK_NAME = "attention_mask_int32"
SCALE_RTOL = 1e-5


@dataclass(frozen=True)
class NoMatch:
    """A failed match: where it was tried and why it did not fit."""

    where: str
    reason: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Projection:
    """One of Q, K, V: x @ weight + bias, split into heads."""

    matmul: onnx.NodeProto
    add: onnx.NodeProto
    weight: np.ndarray  # [hidden, heads * head_size]
    bias: np.ndarray  # [heads * head_size]
    heads: int
    head_size: int
    nodes: list[onnx.NodeProto]  # matmul, add, reshape, transpose(s)

    @property
    def width(self) -> int:
        return self.heads * self.head_size


@dataclass
class AttentionMatch:
    """Everything a fused node needs, bound from one layer's subgraph."""

    name: str  # the Softmax node's name: names the layer in reports
    x: str  # hidden states the three projections read
    q: Projection
    k: Projection
    v: Projection
    scale: float
    mask_input: str  # the graph input holding the 0/1 attention mask
    mask_filter_value: float  # what a masked position adds to its score
    output: str  # [B, S, heads * head_size], what the output projection reads
    nodes: list[onnx.NodeProto] = field(default_factory=list)  # the core: scores, softmax, context

    @property
    def heads(self) -> int:
        return self.q.heads

    @property
    def head_size(self) -> int:
        return self.q.head_size


class GraphIndex:
    """Producers, consumers and constant values of a graph's tensors."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input}
        self.graph_outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant, or Identity of one), else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
            return None
        if node.op_type == "Identity":
            return self.const(node.input[0])
        return None

    def parent(self, node: onnx.NodeProto, i: int) -> onnx.NodeProto | None:
        return self.producer.get(node.input[i]) if i < len(node.input) else None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.graph_outputs:
            return None
        return users[0]


def _key(node: onnx.NodeProto) -> tuple[str, ...]:
    """A node's identity: its outputs (protobuf wrappers are not stable objects, so id() is not)."""
    return tuple(node.output)


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def _is(node: onnx.NodeProto | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _scalar(value: np.ndarray | None) -> float | None:
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _split_other(node: onnx.NodeProto, known: str) -> str:
    """The input of a binary node that is not `known`."""
    return node.input[1] if node.input[0] == known else node.input[0]


def _reshape_tail(index: GraphIndex, reshape: onnx.NodeProto, count: int) -> list[int] | NoMatch:
    """The last `count` entries of a Reshape's target shape, when they are constants.

    The exporter builds [B, S, H, D] as Concat(Unsqueeze(batch), Unsqueeze(seq), H, D),
    so the leading entries are dynamic and only the tail is known."""
    where = reshape.name or reshape.output[0]
    shape = index.const(reshape.input[1])
    if shape is not None:
        return [int(d) for d in shape.reshape(-1)[-count:]]
    concat = index.parent(reshape, 1)
    if not _is(concat, "Concat"):
        return NoMatch(where, "target shape is neither a constant nor a Concat")
    tail = []
    for name in concat.input[-count:]:
        value = index.const(name)
        if value is None or value.size != 1:
            return NoMatch(where, f"target shape entry {name} is not a constant")
        tail.append(int(value.reshape(-1)[0]))
    return tail


def _projection(index: GraphIndex, head_input: str, perm: list[int], which: str) -> Projection | NoMatch:
    """Walk back from what the score/context MatMul reads to x @ W + b."""
    nodes = []
    transpose = index.producer.get(head_input)
    where = f"{which} of {transpose.name if transpose is not None else head_input}"
    if not _is(transpose, "Transpose") or _perm(transpose) != perm:
        got = f"{transpose.op_type} perm {_perm(transpose)}" if transpose is not None else "a graph input"
        return NoMatch(where, f"expected Transpose perm {perm} before the {which} MatMul, got {got}")
    nodes.append(transpose)
    reshape = index.parent(transpose, 0)
    if not _is(reshape, "Reshape"):
        return NoMatch(where, f"expected Reshape [B, S, heads, head_size] before the {which} Transpose")
    nodes.append(reshape)
    tail = _reshape_tail(index, reshape, 2)
    if isinstance(tail, NoMatch):
        return tail
    heads, head_size = tail
    add = index.parent(reshape, 0)
    if not _is(add, "Add"):
        return NoMatch(where, f"expected the {which} bias Add before the head split")
    matmul = next((index.producer.get(n) for n in add.input if _is(index.producer.get(n), "MatMul")), None)
    if matmul is None:
        return NoMatch(where, f"expected the {which} projection MatMul before its bias Add")
    bias = index.const(_split_other(add, matmul.output[0]))
    weight = index.const(matmul.input[1])
    if weight is None or weight.ndim != 2:
        return NoMatch(where, f"the {which} projection weight is not a constant 2-D matrix")
    if bias is None or bias.ndim != 1:
        return NoMatch(where, f"the {which} projection bias is not a constant vector")
    if head_size <= 0:
        return NoMatch(where, f"the {which} head split has head_size {head_size}, expected a positive constant")
    if heads == -1:  # transformers >= 5 reshapes to (*input_shape, -1, head_size): heads follow from W
        if weight.shape[1] % head_size:
            return NoMatch(where, f"the {which} width {weight.shape[1]} is not a multiple of head_size {head_size}")
        heads = weight.shape[1] // head_size
    if heads <= 0:
        return NoMatch(where, f"the {which} head split has {heads} heads, expected a positive count")
    nodes = [matmul, add, *reversed(nodes)]
    return Projection(matmul, add, weight, bias, heads, head_size, nodes)


def _mask(index: GraphIndex, name: str) -> tuple[str, float] | NoMatch:
    """Bind (graph input, filter value) of an additive mask built as (1 - m) * f,
    m = Cast(Unsqueeze(Unsqueeze(attention_mask))) of shape [B, 1, 1, S]."""
    mul = index.producer.get(name)
    where = f"mask {name}"
    if not _is(mul, "Mul"):
        return NoMatch(where, "the score Add does not read a (1 - mask) * value tensor")
    sub = next((index.producer.get(n) for n in mul.input if _is(index.producer.get(n), "Sub")), None)
    if sub is None:
        return NoMatch(where, "the additive mask is not (1 - mask) * value")
    value = _scalar(index.const(_split_other(mul, sub.output[0])))
    one = _scalar(index.const(sub.input[0]))
    if value is None or one != 1.0:
        return NoMatch(where, f"expected (1 - mask) * constant, got ({one} - mask) * {value}")
    node = index.producer.get(sub.input[1])
    axes_seen = []
    while node is not None and (_is(node, "Cast") or _is(node, "Unsqueeze")):
        if _is(node, "Unsqueeze"):
            axes = index.const(node.input[1]) if len(node.input) > 1 else None
            if axes is None:  # opset < 13 keeps axes as an attribute
                axes = np.array([a for attr in node.attribute if attr.name == "axes" for a in attr.ints])
            axes_seen.extend(int(a) for a in axes.reshape(-1))
        source = node.input[0]
        node = index.producer.get(source)
        if source in index.graph_inputs:
            # [B, S] -> [B, 1, 1, S]: the mask covers keys, the same for every head and query.
            if sorted(axes_seen) != [1, 2]:
                return NoMatch(where, f"mask is unsqueezed on axes {sorted(axes_seen)}, expected [1, 2] "
                                      "(a [batch, 1, 1, seq] key padding mask)")
            return source, value
    return NoMatch(where, "the mask does not come from a graph input through Cast/Unsqueeze")


def pattern(index: GraphIndex, softmax: onnx.NodeProto) -> AttentionMatch | NoMatch:
    """Bind the attention subgraph around one Softmax, or say where it stops fitting."""
    where = softmax.name or softmax.output[0]
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        return NoMatch(where, f"Softmax axis {axis} is not the key axis (-1)")
    add = index.parent(softmax, 0)
    if not _is(add, "Add"):
        return NoMatch(where, "Softmax does not read scores + mask (no Add before it)")
    scaled = next((index.producer.get(n) for n in add.input
                   if _is(index.producer.get(n), "Mul") or _is(index.producer.get(n), "Div")), None)
    if scaled is None:
        return NoMatch(where, "no Mul/Div scaling of the scores before the mask Add")
    mask_name = _split_other(add, scaled.output[0])
    scores = index.producer.get(scaled.input[0])
    factor = _scalar(index.const(scaled.input[1]))
    if not _is(scores, "MatMul") or factor is None:
        return NoMatch(where, "expected MatMul(Q, K^T) scaled by a constant")
    scale = factor if scaled.op_type == "Mul" else 1.0 / factor
    context = index.only_consumer(softmax.output[0])
    if not _is(context, "MatMul") or context.input[0] != softmax.output[0]:
        return NoMatch(where, "the attention probabilities are used by more than the context MatMul")
    out_transpose = index.only_consumer(context.output[0])
    if not _is(out_transpose, "Transpose") or _perm(out_transpose) != [0, 2, 1, 3]:
        return NoMatch(where, "the context is not transposed back to [B, S, heads, head_size]")
    out_reshape = index.only_consumer(out_transpose.output[0])
    if not _is(out_reshape, "Reshape"):
        return NoMatch(where, "the context is not reshaped back to [B, S, width]")
    width = _reshape_tail(index, out_reshape, 1)
    if isinstance(width, NoMatch):
        return width

    q = _projection(index, scores.input[0], [0, 2, 1, 3], "query")
    k = _projection(index, scores.input[1], [0, 2, 3, 1], "key")
    v = _projection(index, context.input[1], [0, 2, 1, 3], "value")
    for proj in (q, k, v):
        if isinstance(proj, NoMatch):
            return proj
    mask = _mask(index, mask_name)
    if isinstance(mask, NoMatch):
        return mask
    if width[0] not in (-1, v.width):
        return NoMatch(where, f"output width {width[0]} is not value heads x head_size {v.width}")
    core = [scores, scaled, add, softmax, context, out_transpose, out_reshape]
    return AttentionMatch(where, q.matmul.input[0], q, k, v, scale, mask[0], mask[1], out_reshape.output[0], core)


def check(index: GraphIndex, match: AttentionMatch) -> NoMatch | None:
    """Conditions under which the fused op computes exactly what the subgraph does."""
    where = match.name
    if not (match.q.matmul.input[0] == match.k.matmul.input[0] == match.v.matmul.input[0]):
        return NoMatch(where, "Q, K and V are projected from different tensors (not self-attention)")
    shapes = {(p.heads, p.head_size) for p in (match.q, match.k, match.v)}
    if len(shapes) != 1:
        return NoMatch(where, f"Q, K, V split into different (heads, head_size): {sorted(shapes)}")
    for name, proj in (("query", match.q), ("key", match.k), ("value", match.v)):
        if proj.weight.shape[1] != proj.width or proj.bias.shape[0] != proj.width:
            return NoMatch(where, f"{name} weight {list(proj.weight.shape)} / bias {list(proj.bias.shape)} "
                                  f"do not give heads {proj.heads} x head_size {proj.head_size} = {proj.width}")
    expected = 1.0 / math.sqrt(match.head_size)
    if abs(match.scale - expected) > SCALE_RTOL * expected:
        return NoMatch(where, f"scale {match.scale:.6g} is not 1/sqrt(head_size {match.head_size}) = {expected:.6g}")
    # Every intermediate must die inside the subgraph, or removing it changes the graph's meaning.
    inside = {_key(n) for n in [*match.nodes, *match.q.nodes, *match.k.nodes, *match.v.nodes]}
    for node in [*match.nodes[:-1], *match.q.nodes, *match.k.nodes, *match.v.nodes]:
        for out in node.output:
            outside = [c.name or c.op_type for c in index.consumers.get(out, []) if _key(c) not in inside]
            if outside or out in index.graph_outputs:
                return NoMatch(where, f"{out} is also used outside the attention subgraph "
                                      f"({', '.join(outside) or 'a graph output'})")
    return None


def rewrite(match: AttentionMatch, op: str, mask_int32: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The fused node (and its packed weights) that replaces one matched subgraph."""
    prefix = match.name.rsplit("/", 1)[0] if "/" in match.name else match.name
    attrs = {"num_heads": match.heads, "scale": float(match.scale), "mask_filter_value": float(match.mask_filter_value)}
    if op == "Attention":
        # Packed [Wq | Wk | Wv]: one GEMM for all three projections (QAttention once quantized).
        # The three widths are equal (check), so qkv_hidden_sizes is not needed even when the
        # width is below the hidden size; ONNX Runtime's quantizer skips nodes that carry it.
        weight = np.concatenate([match.q.weight, match.k.weight, match.v.weight], axis=1).astype(np.float32)
        bias = np.concatenate([match.q.bias, match.k.bias, match.v.bias]).astype(np.float32)
        w_name, b_name = f"{prefix}/qkv_weight", f"{prefix}/qkv_bias"
        inits = [numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias, b_name)]
        node = helper.make_node("Attention", [match.x, w_name, b_name, mask_int32], [match.output],
                                name=f"{prefix}/Attention", domain=MS_DOMAIN, **attrs)
        return [node], inits
    # MultiHeadAttention reads the projected Q, K, V; the projections stay ordinary
    # MatMul + Add, which dynamic quantization turns into int8 GEMMs with fused bias.
    inputs = [match.q.add.output[0], match.k.add.output[0], match.v.add.output[0], "", mask_int32]
    node = helper.make_node("MultiHeadAttention", inputs, [match.output], name=f"{prefix}/MultiHeadAttention",
                            domain=MS_DOMAIN, **attrs)
    kept = [match.q.matmul, match.q.add, match.k.matmul, match.k.add, match.v.matmul, match.v.add]
    return [*kept, node], []


@dataclass
class FusionResult:
    fused: int
    heads: list[int]  # per fused layer, in graph order
    head_size: list[int]
    unmatched: list[str]  # one reason per Softmax that did not fuse

    def to_json(self) -> dict:
        return {"fused": self.fused, "heads": self.heads, "head_size": self.head_size, "unmatched": self.unmatched}


def fuse_attention(model: onnx.ModelProto, op: str = "Attention") -> tuple[onnx.ModelProto, FusionResult]:
    """A copy of `model` with every matching self-attention subgraph fused into `op`.

    A graph with no match comes back unchanged (but re-sorted), with the reasons."""
    if op not in OPS:
        raise ValueError(f"op {op!r} is not one of {OPS}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    index = GraphIndex(graph)
    matches, unmatched = [], []
    for node in graph.node:
        if not _is(node, "Softmax"):
            continue
        found = pattern(index, node)
        if not isinstance(found, NoMatch):
            failure = check(index, found)
            found = failure if failure is not None else found
        if isinstance(found, NoMatch):
            unmatched.append(str(found))
            log.info("attention rewrite: no match at %s", found)
        else:
            matches.append(found)
    if not matches:
        return model, FusionResult(0, [], [], unmatched)

    mask_int32 = MASK_NAME
    removed, new_nodes, new_inits = set(), [], []
    for m in matches:
        removed.update(_key(n) for n in [*m.nodes, *m.q.nodes, *m.k.nodes, *m.v.nodes])
    masks = sorted({m.mask_input for m in matches})
    if len(masks) != 1:
        return model, FusionResult(0, [], [], unmatched + [f"graph: layers read different masks {masks}"])
    # ONNX Runtime's fused ops take the 0/1 mask itself as int32 and apply
    # (mask > 0 ? 0 : mask_filter_value), the same additive mask the graph built.
    new_nodes.append(helper.make_node("Cast", [masks[0]], [mask_int32], name="attention_mask/Cast_int32",
                                      to=onnx.TensorProto.INT32))
    for m in matches:
        nodes, inits = rewrite(m, op, mask_int32)
        new_nodes.extend(nodes)
        new_inits.extend(inits)
    kept = [_copy(n) for n in graph.node if _key(n) not in removed]
    _replace(graph.node, _toposort([*kept, *new_nodes], index.graph_inputs | set(index.initializers) | {t.name for t in new_inits}))
    graph.initializer.extend(new_inits)
    _drop_dead(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, FusionResult(len(matches), [m.heads for m in matches], [m.head_size for m in matches], unmatched)


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced before it is read (stable otherwise)."""
    ready = set(available) | {""}
    pending = list(nodes)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in ready})[:3]
            raise ValueError(f"attention rewrite left nodes with unproduced inputs {missing}")
        pending = rest
    return ordered


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (the old mask, shape and weight plumbing)."""
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        alive = [n for n in graph.node if any(o in used for o in n.output)]
        if len(alive) == len(graph.node):
            break
        _replace(graph.node, alive)
    used = {i for n in graph.node for i in n.input}
    _replace(graph.initializer, [t for t in graph.initializer if t.name in used])
    produced = {o for n in graph.node for o in n.output}
    _replace(graph.value_info, [vi for vi in graph.value_info if vi.name in produced])


def _copy(message):
    clone = type(message)()
    clone.CopyFrom(message)
    return clone


def _replace(field, items) -> None:
    """Set a repeated protobuf field to `items`, copied first: clearing the field
    invalidates the element objects that were read from it."""
    items = [_copy(item) for item in items]
    del field[:]
    field.extend(items)
