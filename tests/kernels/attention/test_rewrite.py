"""The attention rewrite on tiny BERTs exported through compress's export path:
structure after the rewrite, the fused op against the numpy oracle, the fused graph
against the unfused one through ONNX Runtime (padded rows included), head-pruned
layers, and the reasons a graph does not match."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.export import export, random_inputs
from compress.kernels.attention.reference import attention
from compress.kernels.attention.rewrite import OPS, fuse_attention
from compress.recipe import ExportConfig
from tests.conftest import make_texts, tokenizer_dir
from tests.stage_helpers import context, teacher_artifact

HIDDEN, HEADS, HEAD_SIZE, LAYERS = 32, 4, 8, 2
PRUNE_PLAN = {"heads": {"0": [0, 1, 3], "1": [1, 2]}}  # widths 24 and 16, below the hidden size


def tiny_bert(d: Path, plan: dict | None = None):
    """A 2-layer BERT with random biases and peaked attention, saved (pruned when a plan is given)."""
    import torch
    from transformers import BertConfig, BertModel

    from compress.prune import PLAN_FILE, apply_plan

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.2)
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    if plan:
        apply_plan(model, plan)
        (d / PLAN_FILE).write_text(json.dumps(plan))
    model.save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir() / name, d / name)
    return model


def exported(tmp_path_factory, plan=None):
    d = tmp_path_factory.mktemp("bert")
    model = tiny_bert(d, plan)
    art = export(teacher_artifact(d), ExportConfig(), context(tmp_path_factory.mktemp("onnx"), make_texts(6)))
    return model, onnx.load(str(art.model_file))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    return exported(tmp_path_factory, PRUNE_PLAN)


def with_outputs(model: onnx.ModelProto, names: list[str], rank: int = 3) -> onnx.ModelProto:
    """The model with extra float graph outputs (hidden states of every row, padded ones too)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * rank) for n in names)
    return model


def run(model: onnx.ModelProto, ids, mask) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, "attention_mask": mask})


def layer_outputs(model: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in model.graph.node
            if n.op_type == "LayerNormalization" and "/output/LayerNorm" in n.name and "/attention/" not in n.name]


def check_against_unfused(graph: onnx.ModelProto, op: str, heads: list[int]):
    hidden = layer_outputs(graph)
    assert len(hidden) == LAYERS
    plain = with_outputs(graph, hidden)
    fused, result = fuse_attention(plain, op)
    onnx.checker.check_model(fused, full_check=True)
    ops = Counter((n.domain, n.op_type) for n in fused.graph.node)
    assert ops[("com.microsoft", op)] == LAYERS
    assert ops[("", "Softmax")] == 0 and ops[("", "Transpose")] == 0
    nodes = [n for n in fused.graph.node if n.op_type == op]
    assert [helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "num_heads"] == heads
    assert result.fused == LAYERS and result.heads == heads and result.unmatched == []

    ids, mask = random_inputs(30522, batch=4, seq=24)
    assert (mask == 0).any() and (mask == 1).any()
    want, got = run(plain, ids, mask), run(fused, ids, mask)
    for a, b in zip(got, want):  # the embedding, then every layer's [B, S, hidden] including padded rows
        np.testing.assert_allclose(a, b, atol=1e-4)
    return fused


@pytest.mark.parametrize("op", OPS)
def test_every_layer_fuses_and_agrees(full, op):
    _, graph = full
    fused = check_against_unfused(graph, op, [HEADS] * LAYERS)
    if op == "Attention":  # one packed [hidden, 3 x width] projection per layer
        weights = {t.name: list(t.dims) for t in fused.graph.initializer}
        packed = [weights[n.input[1]] for n in fused.graph.node if n.op_type == "Attention"]
        assert packed == [[HIDDEN, 3 * HEADS * HEAD_SIZE]] * LAYERS


@pytest.mark.parametrize("op", OPS)
def test_head_pruned_layers_fuse_with_their_own_width(pruned, op):
    _, graph = pruned
    heads = [len(PRUNE_PLAN["heads"][str(i)]) for i in range(LAYERS)]
    check_against_unfused(graph, op, heads)
    _, result = fuse_attention(graph, op)
    assert result.head_size == [HEAD_SIZE] * LAYERS


@pytest.mark.parametrize("op", OPS)
def test_fused_op_matches_the_oracle(pruned, op):
    """Layer 0's fused output against reference.attention on the same input and weights."""
    model, graph = pruned
    fused, _ = fuse_attention(graph, op)
    node = next(n for n in fused.graph.node if n.op_type == op)
    x_name = _layer_input(fused, node, op)
    ids, mask = random_inputs(30522, batch=3, seq=16, seed=3)
    x, context = run(with_outputs(fused, [x_name, node.output[0]]), ids, mask)[1:]
    sa = model.encoder.layer[0].attention.self
    weights = tuple(lin.weight.detach().numpy().T for lin in (sa.query, sa.key, sa.value))
    biases = tuple(lin.bias.detach().numpy() for lin in (sa.query, sa.key, sa.value))
    want = attention(x, weights, biases, mask, num_heads=len(PRUNE_PLAN["heads"]["0"]))
    assert context.shape == want.shape == (3, 16, 24)
    np.testing.assert_allclose(context, want, atol=1e-4)


def _layer_input(model: onnx.ModelProto, node: onnx.NodeProto, op: str) -> str:
    """The hidden states a fused node projects from (MultiHeadAttention reads them through MatMul + Add)."""
    if op == "Attention":
        return node.input[0]
    producer = {o: n for n in model.graph.node for o in n.output}
    add = producer[node.input[0]]
    matmul = next(producer[i] for i in add.input if i in producer and producer[i].op_type == "MatMul")
    return matmul.input[0]


def test_a_layer_that_does_not_fit_is_kept_with_its_reason(full):
    _, graph = full
    graph = onnx.ModelProto.FromString(graph.SerializeToString())
    producer = {o: n for n in graph.graph.node for o in n.output}
    mul = next(n for n in graph.graph.node if n.name == "/layer.0/attention/self/Mul")
    scale = producer[mul.input[1]]
    scale.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(0.2, dtype=np.float32)))
    fused, result = fuse_attention(graph, "Attention")
    assert result.fused == 1 and result.heads == [HEADS]
    assert len(result.unmatched) == 1
    assert "layer.0" in result.unmatched[0] and "scale 0.2 is not 1/sqrt(head_size 8)" in result.unmatched[0]
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Softmax"] == 1 and ops["Attention"] == 1
    onnx.checker.check_model(fused, full_check=True)
    ids, mask = random_inputs(30522, batch=2, seq=12)
    np.testing.assert_allclose(run(fused, ids, mask)[0], run(graph, ids, mask)[0], atol=1e-4)


def test_probabilities_used_elsewhere_are_not_fused(full):
    _, graph = full
    softmax = next(n for n in graph.graph.node if n.op_type == "Softmax")
    exposed = with_outputs(graph, [softmax.output[0]], rank=4)
    _, result = fuse_attention(exposed, "Attention")
    assert result.fused == LAYERS - 1
    assert "the attention probabilities are used by more than the context MatMul" in result.unmatched[0]


def test_a_graph_without_attention_passes_through_with_the_reason():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=-1)], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fused, result = fuse_attention(model, "Attention")
    assert result.fused == 0
    assert result.unmatched == ["sm: Softmax does not read scores + mask (no Add before it)"]
    assert [n.op_type for n in fused.graph.node] == ["Softmax"]
