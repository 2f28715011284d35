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
    art = quantize(fp32, QuantizeConfig(per_channel=per_channel), context(tmp_path, make_texts(5)))
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
