"""Stage `fuse` on an exported tiny artifact: structure, numerics against its input,
validity, what meta records, pass-through when nothing matches, the error when the
fused graph disagrees, and quantize after fuse."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compress.artifact import copy_tokenizer, seal
from compress.errors import StageError
from compress.export import compare, export, random_inputs
from compress.fuse import fuse
from compress.quantize import quantize, run_onnx
from compress.recipe import ExportConfig, FuseConfig, QuantizeConfig
from tests.conftest import make_texts
from tests.stage_helpers import context, teacher_artifact

LAYERS, HEADS = 4, 2  # the tiny teacher of tests/conftest.py


@pytest.fixture(scope="module")
def fp32(tiny_teacher, tmp_path_factory):
    return export(teacher_artifact(tiny_teacher), ExportConfig(), context(tmp_path_factory.mktemp("fp32"), make_texts(20)))


@pytest.fixture(scope="module")
def fused(fp32, tmp_path_factory):
    return fuse(fp32, FuseConfig(), context(tmp_path_factory.mktemp("fused"), make_texts(8)))


def test_fuse_replaces_every_attention_and_agrees(fp32, fused):
    model = onnx.load(str(fused.model_file))
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Attention"] == LAYERS and ops["Softmax"] == 0
    attention = fused.meta["fusion"]["attention"]
    assert attention["fused"] == LAYERS and attention["heads"] == [HEADS] * LAYERS and attention["unmatched"] == []
    assert fused.meta["parent"] == fp32.digest and fused.meta["precision"] == "fp32"
    assert (fused.path / "tokenizer.json").is_file()
    checks = fused.meta["fusion"]["validation"]
    assert set(checks) == {"random tokens", "held-out texts"}
    assert all(c["max_abs_diff"] < 1e-4 and c["min_cosine"] > 0.9999 for c in checks.values())
    ids, mask = random_inputs(30522, batch=3, seq=20, seed=7)
    assert compare(run_onnx(fused.model_file, ids, mask), run_onnx(fp32.model_file, ids, mask))["max_abs_diff"] < 1e-4


def test_quantize_after_fuse_validates_and_counts_fused_flops(fp32, fused, tmp_path):
    art = quantize(fused, QuantizeConfig(mode="dynamic"), context(tmp_path, make_texts(5)))
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QAttention"] == LAYERS and ops["Attention"] == 0  # packed QKV projection now int8
    assert art.meta["quantization"]["agreement_random"]["mean_cosine"] > 0.95
    # The same FLOPs as the unfused graph (tests/compress/test_quantize.py), now partly inside QAttention
    s, h, f = 128, 32, 64
    flops = art.meta["quantization"]["flops"]
    assert flops["uncounted"] == 0
    assert flops["int8"] == LAYERS * (4 * 2 * s * h * h + 2 * 2 * s * h * f)
    assert flops["float"] == LAYERS * 2 * (2 * s * s * h)


def test_multiheadattention_op_is_selectable(fp32, tmp_path):
    art = fuse(fp32, FuseConfig(op="MultiHeadAttention"), context(tmp_path, make_texts(4)))
    ops = Counter(n.op_type for n in onnx.load(str(art.model_file)).graph.node)
    assert ops["MultiHeadAttention"] == LAYERS and ops["Softmax"] == 0 and ops["Attention"] == 0
    assert art.meta["fusion"]["attention"]["op"] == "MultiHeadAttention"


def test_no_match_passes_the_graph_through_with_reasons(fp32, tmp_path):
    # An input whose attention scale is not 1/sqrt(head_size): nothing fuses, nothing fails.
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    model = onnx.load(str(fp32.model_file))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.name.endswith("attention/self/Constant_8"):
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(0.2, dtype=np.float32)))
    onnx.save(model, str(src_dir / "model.onnx"))
    copy_tokenizer(fp32.path, src_dir)
    src = seal(src_dir, "onnx", fp32.meta)
    art = fuse(src, FuseConfig(), context(tmp_path / "out", make_texts(4)))
    attention = art.meta["fusion"]["attention"]
    assert attention["fused"] == 0 and len(attention["unmatched"]) == LAYERS
    assert all("scale 0.2 is not 1/sqrt(head_size 16)" in r for r in attention["unmatched"])
    assert Counter(n.op_type for n in onnx.load(str(art.model_file)).graph.node)["Softmax"] == LAYERS


def test_disagreement_is_a_stage_error_with_the_numbers(fp32, tmp_path, monkeypatch):
    from compress.kernels.attention import rewrite

    real = rewrite.fuse_attention

    def wrong_bias(model, op):  # a rewrite bug: the packed QKV bias is off
        out, result = real(model, op)
        bias_name = next(n.input[2] for n in out.graph.node if n.op_type == "Attention")
        bias = next(t for t in out.graph.initializer if t.name == bias_name)
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 5.0, bias_name))
        return out, result

    monkeypatch.setattr(rewrite, "fuse_attention", wrong_bias)
    with pytest.raises(StageError, match=r"fuse: fused model disagrees with its input on random tokens: max \|diff\|"):
        fuse(fp32, FuseConfig(), context(tmp_path, make_texts(4)))


def test_attention_off_copies_the_graph(fp32, tmp_path):
    art = fuse(fp32, FuseConfig(attention=False), context(tmp_path, make_texts(4)))
    assert onnx.load(str(art.model_file)).graph.node == onnx.load(str(fp32.model_file)).graph.node
    assert art.meta["fusion"]["attention"] == {"enabled": False, "op": "Attention"}


def test_recipe_places_fuse_between_export_and_quantize():
    from compress import recipe
    from compress.pipeline import stage_function

    r = recipe.parse({"stages": [{"quantize": {}}, {"fuse": {"op": "MultiHeadAttention"}}]})
    assert [name for name, _ in r.stage_plan()] == ["export", "fuse", "quantize"]
    assert dict(r.stage_plan())["fuse"] == FuseConfig(op="MultiHeadAttention")
    assert stage_function("fuse") == (fuse, 1)
    with pytest.raises(Exception, match="op"):
        recipe.parse({"stages": [{"fuse": {"op": "FlashAttention"}}]})


def test_fuse_and_static_int8_of_a_narrower_student(tiny_teacher, tmp_path):
    """hidden 16, one head, and the output projection after pooling: every
    attention fuses, and static int8 keeps the teacher-width embedding."""
    from tests.stage_helpers import narrowed_student

    student = narrowed_student(tiny_teacher, tmp_path / "s", make_texts(60))
    plain = export(student, ExportConfig(), context(tmp_path / "e", make_texts(20)))
    fused = fuse(plain, FuseConfig(), context(tmp_path / "f", make_texts(8)))
    attention = fused.meta["fusion"]["attention"]
    assert attention["fused"] == 2 and attention["heads"] == [1, 1] and attention["head_size"] == [16, 16]
    ctx = context(tmp_path / "q", make_texts(40))
    ctx.calibration_texts = make_texts(32, seed=3)
    art = quantize(fused, QuantizeConfig(mode="static"), ctx)
    ids, mask = random_inputs(30522, batch=3, seq=20, seed=7)
    out = run_onnx(art.model_file, ids, mask)
    assert out.shape == (3, 32)
    assert compare(out, run_onnx(plain.model_file, ids, mask))["mean_cosine"] > 0.99
