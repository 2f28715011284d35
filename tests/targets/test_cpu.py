import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compress.errors import TargetError
from compress.export import export
from compress.recipe import CpuTargetConfig, ExportConfig
from compress.targets import cpu, get
from tests.conftest import make_texts
from tests.stage_helpers import context, teacher_artifact


def test_unknown_target_lists_known():
    with pytest.raises(TargetError, match=r"unknown target 'jetsonx' \(known: cpu\)"):
        get("jetsonx")


def test_cpu_rejects_unsupported_precision():
    with pytest.raises(TargetError, match="cannot build int4"):
        cpu.check(CpuTargetConfig(), "int4")


def test_cpu_build_runs_from_its_directory_alone(tiny_teacher, tmp_path):
    fp32 = export(teacher_artifact(tiny_teacher), ExportConfig(), context(tmp_path / "fp32", make_texts(20)))
    art = cpu.build(fp32, CpuTargetConfig(threads=1), context(tmp_path / "cpu", []))
    options = json.loads((art.path / "session_options.json").read_text())
    assert options["intra_op_num_threads"] == 1
    assert art.meta["session_options"] == options
    onnx.checker.check_model(onnx.load(str(art.model_file)))

    # Load exactly as a deployment would: tokenizer and session from the build directory only.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(art.path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = options["intra_op_num_threads"]
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, options["graph_optimization_level"])
    sess = ort.InferenceSession(str(art.model_file), so, providers=options["providers"])
    enc = tok(["a cat runs", "the big red house"], padding=True, return_tensors="np")
    out = sess.run(["sentence_embedding"], {"input_ids": enc["input_ids"].astype(np.int64),
                                            "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    ref = ort.InferenceSession(str(fp32.model_file), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    assert out.shape == (2, 32)
    assert np.abs(out - ref).max() < 1e-4


def test_graph_check_sees_integer_kernels_and_fusions(tiny_teacher, tmp_path):
    from compress.quantize import quantize
    from compress.recipe import QuantizeConfig

    fp32 = export(teacher_artifact(tiny_teacher), ExportConfig(), context(tmp_path / "fp32", make_texts(20)))
    int8 = quantize(fp32, QuantizeConfig(mode="dynamic"), context(tmp_path / "int8", make_texts(5)))
    f_build = cpu.build(fp32, CpuTargetConfig(threads=1), context(tmp_path / "f-cpu", []))
    q_build = cpu.build(int8, CpuTargetConfig(threads=1), context(tmp_path / "q-cpu", []))
    f, q = f_build.meta["graph"], q_build.meta["graph"]
    layers = 4
    assert f["int8_kernels"] == 0 and q["int8_kernels"] == 6 * layers  # Q, K, V, O, FFN in, FFN out
    assert not q["float_weight_matmuls"] and not q["qdq_float_matmuls"]
    assert q["fused"]["gelu"] == f["fused"]["gelu"] == layers and q["unfused"]["gelu"] == 0
    assert q["fused"]["layernorm"] == f["fused"]["layernorm"] == 2 * layers + 1
    assert cpu.compare_graphs(q, f) == []


def test_compare_graphs_names_what_quantization_broke():
    fp32 = {"int8_kernels": 0, "qdq_float_matmuls": [], "fused": {"attention": 0, "layernorm": 9, "gelu": 4}}
    broken = {"int8_kernels": 0, "qdq_float_matmuls": ["m1", "m2"], "fused": {"attention": 0, "layernorm": 9, "gelu": 1}}
    warnings = cpu.compare_graphs(broken, fp32)
    assert any("no integer kernel" in w for w in warnings)
    assert any(w.startswith("2 QDQ matrix products were not fused") for w in warnings)
    assert any("broke 3 of 4 gelu fusions" in w for w in warnings)
