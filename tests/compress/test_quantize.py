from collections import Counter

import onnx
import pytest

from compress.export import export
from compress.quantize import quantize
from compress.recipe import ExportConfig, QuantizeConfig
from tests.conftest import make_texts
from tests.stage_helpers import context, teacher_artifact


@pytest.fixture(scope="module")
def fp32(tiny_teacher, tmp_path_factory):
    return export(teacher_artifact(tiny_teacher), ExportConfig(), context(tmp_path_factory.mktemp("fp32"), make_texts(20)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_int8(fp32, tmp_path, per_channel):
    art = quantize(fp32, QuantizeConfig(mode="dynamic", per_channel=per_channel), context(tmp_path, make_texts(5)))
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    before = Counter(n.op_type for n in onnx.load(str(fp32.model_file)).graph.node)
    # every weight MatMul became an integer MatMul fed by a dynamic activation quantizer
    assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0
    assert ops["MatMulInteger"] + ops["MatMul"] == before["MatMul"]
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8, "weights are stored as int8"
    assert art.model_file.stat().st_size < fp32.model_file.stat().st_size
    assert art.meta["precision"] == "int8" and art.meta["parent"] == fp32.digest
    assert art.meta["quantization"]["agreement_random"]["mean_cosine"] > 0.95
    assert (art.path / "tokenizer.json").is_file()
    flops = art.meta["quantization"]["flops"]
    # weight projections are int8; the attention products (activation x activation) stay float
    # counted exactly at batch 1, seq 128 for the tiny teacher (4 layers, hidden 32, FFN 64)
    s, h, f, layers = 128, 32, 64, 4
    assert flops["uncounted"] == 0
    assert flops["int8"] == layers * (4 * 2 * s * h * h + 2 * 2 * s * h * f)
    assert flops["float"] == layers * 2 * (2 * s * s * h)


def _qdq_params(model):
    """(scale, zero point) initializers of every QuantizeLinear, by node."""
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            yield node.name, init[node.input[1]], init[node.input[2]]


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_static_qdq_each_calibration(fp32, tmp_path, calibration):
    import numpy as np

    ctx = context(tmp_path, make_texts(5))
    ctx.calibration_texts = make_texts(24, seed=5)
    art = quantize(fp32, QuantizeConfig(mode="static", calibration=calibration), ctx)
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    params = list(_qdq_params(model))
    assert params
    for name, scale, zero in params:
        assert np.all(np.isfinite(scale)) and np.all(scale > 0), name
        assert zero.dtype == np.uint8  # u8s8: asymmetric uint8 activations
    assert art.meta["quantization"]["calibration"] == calibration
    assert art.meta["quantization"]["flops"]["int8_share"] >= 0.5
    assert art.meta["quantization"]["agreement_random"]["mean_cosine"] > 0.9


def test_tensorrt_flavour_is_symmetric_int8(fp32, tmp_path):
    import numpy as np

    ctx = context(tmp_path, make_texts(5))
    ctx.calibration_texts = make_texts(24, seed=5)
    art = quantize(fp32, QuantizeConfig(mode="static", calibration="minmax", flavour="s8s8-symmetric"), ctx)
    model = onnx.load(str(art.model_file))
    params = list(_qdq_params(model))
    assert params
    for name, scale, zero in params:
        assert zero.dtype == np.int8, name
        assert np.all(zero == 0), name
    # weights too: every int8 initializer feeding a DequantizeLinear has zero point 0
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2] in init:
            assert np.all(init[node.input[2]] == 0)


def test_static_without_calibration_inputs_is_an_error(fp32, tmp_path):
    from compress.errors import StageError

    with pytest.raises(StageError, match="needs calibration inputs"):
        quantize(fp32, QuantizeConfig(mode="static"), context(tmp_path, make_texts(5)))
