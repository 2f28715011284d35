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
def test_static_qdq_each_calibration(fp32, tmp_path, calibration, capfd):
    import numpy as np

    ctx = context(tmp_path, make_texts(5))
    ctx.calibration_texts = make_texts(24, seed=5)
    art = quantize(fp32, QuantizeConfig(mode="static", calibration=calibration), ctx)
    assert capfd.readouterr().out == ""  # stdout is the user's: the calibrators' chatter stays off it
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


# -- sensitivity, fallback, fp16 -------------------------------------------------

PLANTED = "/layer.1/intermediate/dense/MatMul"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 2-layer BERT (hidden 32, FFN 64) whose PLANTED MatMul gets one input
    channel scaled by 1e3 (its weight row scaled back, so fp32 is unchanged up to
    rounding) and weights x30 (so the node matters): an int8 activation range
    that one channel dominates rounds every other channel to zero."""
    import shutil

    import numpy as np
    import torch
    from onnx import helper, numpy_helper
    from transformers import BertConfig, BertModel

    from compress.artifact import seal
    from tests.conftest import tokenizer_dir

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert2")
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir() / name, d / name)
    src = export(teacher_artifact(d), ExportConfig(), context(tmp_path_factory.mktemp("bert2-fp32"), make_texts(20)))

    model = onnx.load(str(src.model_file))
    init = {t.name: t for t in model.graph.initializer}
    at, node = next((i, n) for i, n in enumerate(model.graph.node) if n.name == PLANTED)
    w = numpy_helper.to_array(init[node.input[1]]) * 30
    scale = np.ones(w.shape[0], np.float32)
    scale[3] = 1e3
    w[3] /= scale[3]
    init[node.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), node.input[1]))
    model.graph.initializer.append(numpy_helper.from_array(scale, "planted_scale"))
    model.graph.node.insert(at, helper.make_node("Mul", [node.input[0], "planted_scale"], ["planted_in"], name="planted/Mul"))
    node.input[0] = "planted_in"
    out = tmp_path_factory.mktemp("planted")
    onnx.save(model, str(out / "model.onnx"))
    for name in src.meta["tokenizer_files"]:
        shutil.copyfile(src.path / name, out / name)
    return seal(out, "onnx", dict(src.meta))


def _fallback_ctx(tmp_path):
    ctx = context(tmp_path, make_texts(5), validation=make_texts(24, seed=7))
    ctx.calibration_texts = make_texts(24, seed=5)
    return ctx


def _float_weight_matmuls(model) -> set[str]:
    """Names of MatMuls that still run in float on a weight initializer (QDQ: not fed by DequantizeLinear)."""
    init = {t.name for t in model.graph.initializer}
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in init
            and producer.get(n.input[0]) != "DequantizeLinear"}


@pytest.mark.parametrize("mode,measure", [("dynamic", "simulated"), ("static", "simulated"), ("dynamic", "onnxruntime")])
def test_fallback_keeps_the_planted_node_in_fp32(planted, tmp_path, mode, measure):
    from compress.recipe import FallbackConfig

    cfg = QuantizeConfig(mode=mode, fallback=FallbackConfig(enabled=True, min_agreement=0.999, rows=2, sensitivity=measure))
    art = quantize(planted, cfg, _fallback_ctx(tmp_path))
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    fb = art.meta["quantization"]["fallback"]
    ranked = fb["sensitivity"]
    # every weight MatMul is ranked (static also ranks the two attention products per layer)
    assert len(ranked) == 2 * 6 + (2 * 2 if mode == "static" else 0)
    assert {r["measured"] for r in ranked} == {measure}
    assert ranked[0]["node"] == PLANTED and ranked[0]["layer"] == 1
    assert ranked[0]["sensitivity"] > 100 * ranked[1]["sensitivity"]
    # all-int8 failed the check, keeping exactly the planted node passed it
    assert [s["fp32"] for s in fb["steps"]] == [[], [PLANTED]]
    assert [s["passed"] for s in fb["steps"]] == [False, True]
    assert fb["steps"][0]["agreement"] < 0.999 <= fb["steps"][1]["agreement"]
    assert fb["status"] == "passed" and fb["fp32_nodes"] == [PLANTED]
    assert _float_weight_matmuls(model) == {PLANTED}
    # what keeping it costs in time: the kept model against the all-int8 one, in one run
    cost = fb["latency_cost"]
    assert cost["p50_ratio"] > 0 and cost["spread"][0] <= cost["p50_ratio"] <= cost["spread"][1]
    assert (art.path / ".scratch").exists() is False
    # the int8 FLOPs lost are exactly the planted node's: 2 * seq * hidden * ffn at batch 1, seq 128
    s, h, f, layers = 128, 32, 64, 2
    weights = layers * (4 * 2 * s * h * h + 2 * 2 * s * h * f)
    attention = layers * 2 * (2 * s * s * h)
    flops = art.meta["quantization"]["flops"]
    assert flops["int8"] == weights + (attention if mode == "static" else 0) - 2 * s * h * f
    assert flops["int8_share"] == flops["int8"] / (weights + attention)


def test_simulated_int8_is_exact_int8_arithmetic(planted, tmp_path, mode="dynamic"):
    """A gate of the switchable graph gives what onnx's reference evaluator
    computes on ONNX Runtime's model with only that node in int8; shut gates
    leave the fp32 output exactly. (Dynamic only: static QDQ rounds a tensor for
    all its consumers, so ORT's "only this node" model also rounds its siblings'
    and the residual's input; the gate rounds this node's input, weight and output.)"""
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    from compress.export import random_inputs
    from compress.quantize import int8_writer, quantizable_nodes, switchable

    ctx = _fallback_ctx(tmp_path)
    write, _ = int8_writer(planted, QuantizeConfig(mode=mode), ctx, tmp_path)
    write(tmp_path / "all.onnx")
    nodes = quantizable_nodes(planted.model_file, mode)
    model, gates = switchable(onnx.load(str(planted.model_file)), onnx.load(str(tmp_path / "all.onnx")), nodes, mode)
    assert set(gates) == {n["node"] for n in nodes}
    onnx.checker.check_model(model, full_check=True)
    def evaluator(m):
        # onnx 1.23's reference evaluator implements DequantizeLinear from opset 19 only;
        # nothing in this graph means anything else at 19
        m.opset_import[0].version = max(m.opset_import[0].version, 19)
        return ReferenceEvaluator(m)

    ids, mask = random_inputs(30522, batch=2, seq=16)
    feed = {"input_ids": ids, "attention_mask": mask, **{g: np.zeros((), np.float32) for g in gates.values()}}
    sim = evaluator(model)
    fp32 = evaluator(onnx.load(str(planted.model_file))).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert np.array_equal(sim.run(None, feed)[0], fp32)
    for name in (PLANTED, "/layer.0/attention/self/value/MatMul"):
        write(tmp_path / "one.onnx", only=[name])
        int8 = evaluator(onnx.load(str(tmp_path / "one.onnx"))).run(None, {"input_ids": ids, "attention_mask": mask})[0]
        got = sim.run(None, {**feed, gates[name]: np.ones((), np.float32)})[0]
        assert np.abs(got - int8).max() < 1e-5 < np.abs(got - fp32).max(), name


def test_fallback_budget_exhausted_is_recorded_not_raised(planted, tmp_path):
    """metric retention goes through ctx.accept (the pipeline builds it from the
    gates); here a check that never passes, scored by agreement to fp32."""
    from compress.export import compare, random_inputs
    from compress.quantize import run_onnx
    from compress.recipe import FallbackConfig

    ids, mask = random_inputs(30522)
    ref = run_onnx(planted.model_file, ids, mask)
    seen = []

    def accept(model):
        seen.append(model)
        cos = compare(run_onnx(model, ids, mask), ref)["mean_cosine"]
        return False, {"score": cos - 1.0, "agreement": cos}

    ctx = _fallback_ctx(tmp_path)
    ctx.accept = accept
    cfg = QuantizeConfig(mode="dynamic", fallback=FallbackConfig(enabled=True, metric="retention", max_fp32=2, rows=2))
    art = quantize(planted, cfg, ctx)
    fb = art.meta["quantization"]["fallback"]
    assert fb["status"] == "exhausted" and len(seen) == 3
    top = [r["node"] for r in fb["sensitivity"][:2]]
    assert [s["fp32"] for s in fb["steps"]] == [[], top[:1], top]
    best = max(range(3), key=lambda i: fb["steps"][i]["score"])
    assert fb["chosen_step"] == best and best > 0  # keeping the planted node beats all-int8
    assert fb["fp32_nodes"] == fb["steps"][best]["fp32"]
    assert _float_weight_matmuls(onnx.load(str(art.model_file))) == set(fb["fp32_nodes"])


def test_fallback_retention_without_gates_is_an_error(planted, tmp_path):
    from compress.errors import StageError
    from compress.recipe import FallbackConfig

    cfg = QuantizeConfig(mode="dynamic", fallback=FallbackConfig(enabled=True, metric="retention"))
    with pytest.raises(StageError, match="needs the build's gates"):
        quantize(planted, cfg, _fallback_ctx(tmp_path))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fallback_disabled_matches_plain_onnxruntime(planted, tmp_path, mode):
    """Without fallback the stage writes what ONNX Runtime's quantizer writes
    with the stage's settings (static: ranges read back from the calibration cache)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from compress.encoders import load_tokenizer
    from compress.quantize import _Reader

    ctx = _fallback_ctx(tmp_path / "stage")
    art = quantize(planted, QuantizeConfig(mode=mode, calibration="minmax"), ctx)
    assert "fallback" not in art.meta["quantization"]
    direct = tmp_path / "direct.onnx"
    if mode == "dynamic":
        quantize_dynamic(str(planted.model_file), str(direct), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    else:
        reader = _Reader(ctx.calibration_texts, load_tokenizer(planted.path), 64, ["input_ids", "attention_mask"])
        quantize_static(str(planted.model_file), str(direct), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "ActivationSymmetric": False,
                                       "WeightSymmetric": True})
    ours, theirs = onnx.load(str(art.model_file)), onnx.load(str(direct))
    assert [(n.op_type, list(n.input)) for n in ours.graph.node] == [(n.op_type, list(n.input)) for n in theirs.graph.node]
    init = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.graph.initializer}
    for t in ours.graph.initializer:
        assert (onnx.numpy_helper.to_array(t) == init[t.name]).all(), t.name


def test_fp16_matches_fp32(fp32, tmp_path):
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    from compress.export import compare, random_inputs
    from compress.quantize import run_onnx

    art = quantize(fp32, QuantizeConfig(dtype="fp16"), context(tmp_path, make_texts(5)))
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    assert art.meta["precision"] == "fp16" and art.meta["quantization"]["dtype"] == "fp16"
    # weights are half precision, inputs and outputs stay as the fp32 model's
    floats = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert art.model_file.stat().st_size < 0.6 * fp32.model_file.stat().st_size
    # Tolerance on L2-normalised embeddings: max |diff| 2e-3, mean cosine 0.9999 (measured: 5e-4, 0.9999998).
    # ORT's CPU provider computes the MatMuls of an fp16 graph in fp32; the reference evaluator runs them in fp16.
    ids, mask = random_inputs(30522, batch=2, seq=24, seed=3)
    half = ReferenceEvaluator(model).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    for got in (half.astype(np.float32), run_onnx(art.model_file, ids, mask)):
        res = compare(got, run_onnx(fp32.model_file, ids, mask))
        assert res["max_abs_diff"] < 2e-3 and res["mean_cosine"] > 0.9999, res


def test_cpu_target_refuses_fp16(tmp_path, tiny_teacher):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import compress
    from tests.conftest import tiny_recipe

    (tmp_path / "train.txt").write_text("a cat runs\nthe dog sleeps\n" * 50)
    (tmp_path / "pairs.jsonl").write_text('{"text1": "a", "text2": "b", "score": 1}\n' * 3)
    (tmp_path / "compress.yaml").write_text(tiny_recipe(tiny_teacher, quantize="{dtype: fp16}"))
    # The CLI of this checkout (from another directory, `import compress` would find the installed one).
    env = {**os.environ, "PYTHONPATH": str(Path(compress.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-m", "compress", "build", "-r", "compress.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == ["compress: error: target cpu cannot build fp16 (supported: fp32, int8); "
                     "set quantize.dtype: int8 or drop the quantize stage"]
    assert not (tmp_path / ".compress").exists() and not (tmp_path / "build").exists()


def test_fallback_recipe_errors():
    from compress import recipe as recipes
    from compress.errors import RecipeError
    from compress.pipeline import preflight

    with pytest.raises(RecipeError, match="fallback applies to dtype int8, got dtype fp16"):
        recipes.parse({"stages": [{"quantize": {"dtype": "fp16", "fallback": {"enabled": True}}}]})
    r = recipes.parse({"stages": [{"quantize": {"fallback": {"enabled": True, "metric": "retention"}}}]})
    with pytest.raises(RecipeError, match="fallback.metric: retention .* set gates.retention"):
        preflight(r, ["cpu"])


def test_candidate_gates_score_a_candidate_model(fp32, tiny_teacher, tiny_project, tmp_path, monkeypatch):
    """The pipeline's retention check: the recipe's gates on a candidate ONNX
    model, scored by the smallest margin (the fallback keeps the best score)."""
    import yaml

    from compress import recipe as recipes, sources
    from compress.pipeline import BuildOptions, Builder, load_inputs
    from tests.conftest import tiny_recipe

    monkeypatch.chdir(tiny_project)
    verdicts = {}
    for retention in (0.9, 1.5):
        recipe = recipes.parse(yaml.safe_load(tiny_recipe(tiny_teacher, gates=f"{{retention: {retention}, fidelity: 0.99}}")))
        builder = Builder(recipe, BuildOptions(targets=["cpu"], cache_root=tmp_path / "cache", progress=False))
        builder.inputs = load_inputs(recipe)
        builder.teacher = sources.teacher_artifact(recipe.teacher.source, None, builder.cache, recipe.task)
        verdicts[retention] = builder.candidate_gates(fp32)(fp32.model_file)
    (ok, info), (bad, worse) = verdicts[0.9], verdicts[1.5]
    # the exported teacher is the teacher: it keeps its metric and its embeddings
    assert ok and info["failed"] == [] and info["fidelity"] > 0.999
    assert info["score"] == pytest.approx(min(info["retention"]["pairs"] - 0.9, info["fidelity"] - 0.99))
    assert not bad and worse["score"] < 0 and worse["failed"][0].startswith("retention pairs")


def test_report_lists_sensitive_and_fp32_nodes():
    from compress.report import markdown

    fb = {"sensitivity": [{"node": f"/layer.{i}/output/dense/MatMul", "layer": i, "sensitivity": 10.0 ** -i}
                          for i in range(8)],
          "fp32_nodes": ["/layer.0/output/dense/MatMul"], "status": "passed", "metric": "agreement",
          "steps": [{}, {}], "max_fp32": 4}
    quality = {"metrics": {"pairs": 0.5}, "retention": {"pairs": 1.0}, "fidelity": {"cosine": 1.0, "top10_agreement": 1.0}}
    stage = {"stage": "quantize", "kind": "onnx", "cached": False, "quality": quality,
             "meta": {"precision": "int8", "quantization": {"fallback": fb}}}
    target = {**stage, "stage": "target cpu"}  # carries the same meta: listed once
    report = {"target": "cpu", "task": "embedding", "teacher": {"source": "t", "params": 1, "metrics": {"pairs": 0.5}, "kind": "torch"},
              "final": {"params": 1, "model_sha256": "x"}, "stages": [stage, target], "summary": {},
              "gates": {"retention": None, "fidelity": None, "passed": True, "failed": []}}
    md = markdown(report)
    assert md.count("## Quantize: sensitivity and fp32 fallback") == 1
    assert "`/layer.0/output/dense/MatMul` 1.0e+00" in md and "`/layer.4/output/dense/MatMul` 1.0e-04" in md
    assert "/layer.5/" not in md.split("## Quantize")[1].split("Kept")[0]  # top 5 only
    assert "Kept in fp32: `/layer.0/output/dense/MatMul` (fallback passed: agreement check, 1 step(s), budget 4)" in md
