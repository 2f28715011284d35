"""Tests for compress.bench on tiny models built here: structure and bookkeeping
of a run, never wall-clock values (BENCHMARKING.md: benchmarks are not tests)."""

import copy
import json
import os

import numpy as np
import pytest

from compress import bench
from compress.bench import BenchModel, Conditions, compare_to_baseline
from compress.errors import BenchError

VOCAB = 30522
SMALL = Conditions(
    batch=1, seq_len=16, threads=2, warmup=2, runs=8, rounds=2,
    throughput_batch=2, throughput_runs=3, measure_rss=True, vocab_size=VOCAB,
)
TEN_MB = 10 * 1024 * 1024


def _write_embedding_onnx(path, hidden=8):
    """input_ids -> Gather(embedding table) -> ReduceMean over tokens -> sentence_embedding."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.RandomState(1).standard_normal((VOCAB, hidden)).astype(np.float32)
    graph = helper.make_graph(
        nodes=[
            helper.make_node("Gather", ["table", "input_ids"], ["tokens"], axis=0),
            helper.make_node("ReduceMean", ["tokens", "axes"], ["sentence_embedding"], keepdims=0),
        ],
        name="tiny_embedding",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            # Declared but unused, as in real exports; the bench must still feed it.
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs=[helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bench_models")
    onnx_a = _write_embedding_onnx(root / "a.onnx")
    onnx_b = _write_embedding_onnx(root / "b.onnx", hidden=16)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )
    bert_dir = root / "bert"
    BertModel(config).eval().save_pretrained(bert_dir)
    return {"onnx_a": onnx_a, "onnx_b": onnx_b, "bert": str(bert_dir)}


@pytest.fixture(scope="module")
def result(tiny_models):
    models = [
        BenchModel("student", "onnx", tiny_models["onnx_a"]),
        BenchModel("teacher-ort-fp32", "onnx", tiny_models["onnx_b"]),
        BenchModel("teacher-torch-fp32", "torch-hf", tiny_models["bert"]),
    ]
    messages = []
    out = bench.run(models, SMALL, reference="teacher-ort-fp32", progress=messages.append)
    return out, messages


def test_result_is_json_and_has_every_model(result):
    out, _ = result
    assert json.loads(json.dumps(out)) == out
    assert set(out["models"]) == {"student", "teacher-ort-fp32", "teacher-torch-fp32"}
    assert out["models"]["student"]["kind"] == "onnx"
    assert out["models"]["teacher-torch-fp32"]["kind"] == "torch-hf"


def test_conditions_are_recorded(result):
    out, _ = result
    cond = out["conditions"]
    for key in ("batch", "seq_len", "threads", "warmup", "runs", "rounds", "throughput_batch"):
        assert cond[key] == getattr(SMALL, key)
    assert cond["allow_spinning"] == "1"
    assert cond["inter_op_threads"] == 1
    assert cond["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert cond["onnxruntime"]
    assert cond["torch"]
    assert cond["cpu"]
    assert isinstance(cond["cpu_flags"], list)
    assert set(cond["cpu_flags"]) <= set(bench.RELEVANT_CPU_FLAGS)


def test_latency_percentiles_are_ordered_and_count_every_run(result):
    out, _ = result
    for name, entry in out["models"].items():
        latency = entry["latency_ms"]
        assert latency["runs"] == SMALL.runs, name
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"], name
        assert latency["min"] <= latency["mean"], name
        assert entry["throughput_per_s"] > 0, name
        assert entry["flops"] is None


def test_ratios_exist_for_every_non_reference_model(result):
    out, _ = result
    assert set(out["ratios"]) == {"student/teacher-ort-fp32", "teacher-torch-fp32/teacher-ort-fp32"}
    for key, ratio in out["ratios"].items():
        low, high = ratio["spread"]
        assert 0 < low <= ratio["p50"] <= high, key
        assert ratio["throughput"] > 0, key


def test_progress_is_reported_for_every_block(result):
    _, messages = result
    assert "latency student round 1/2" in messages
    assert "latency teacher-torch-fp32 round 2/2" in messages
    latency_blocks = [m for m in messages if m.startswith("latency ")]
    assert len(latency_blocks) == 3 * SMALL.rounds
    # Blocks alternate A B C A B C, not A A B B C C.
    assert latency_blocks[:3] == [
        "latency student round 1/2",
        "latency teacher-ort-fp32 round 1/2",
        "latency teacher-torch-fp32 round 1/2",
    ]


def test_peak_rss_comes_from_a_child_process(result):
    out, _ = result
    for name, entry in out["models"].items():
        assert isinstance(entry["peak_rss_bytes"], int), name
        assert entry["peak_rss_bytes"] > TEN_MB, name
    # The ONNX child never imports torch. If it reported as much as the torch
    # child, it would be reporting the parent's peak (ru_maxrss survives exec).
    assert out["models"]["student"]["peak_rss_bytes"] < out["models"]["teacher-torch-fp32"]["peak_rss_bytes"]


def test_size_is_bytes_on_disk(result, tiny_models):
    out, _ = result
    assert out["models"]["student"]["size_bytes"] == os.path.getsize(tiny_models["onnx_a"])
    bert_dir = tiny_models["bert"]
    expected = sum(os.path.getsize(os.path.join(bert_dir, f)) for f in os.listdir(bert_dir))
    assert out["models"]["teacher-torch-fp32"]["size_bytes"] == expected


def test_size_follows_the_files_tuple(tiny_models, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[CLS]\n")
    model = BenchModel("student", "onnx", tiny_models["onnx_a"], files=(tiny_models["onnx_a"], str(vocab)))
    assert bench.size_bytes(model) == os.path.getsize(tiny_models["onnx_a"]) + os.path.getsize(vocab)


def test_energy_is_labelled_estimated_without_a_meter(result):
    if bench._rapl_readable():
        pytest.skip("this machine exposes RAPL, so energy is measured, not estimated")
    out, _ = result
    for name, entry in out["models"].items():
        energy = entry["energy_mj_per_inference"]
        assert energy["method"].startswith("estimated:"), name
        assert "W per busy core (profile " in energy["method"], name
        assert energy["value"] >= 0, name


def test_inputs_are_deterministic_and_framed():
    first = bench.make_inputs(2, 16, VOCAB)
    second = bench.make_inputs(2, 16, VOCAB)
    np.testing.assert_array_equal(first["input_ids"], second["input_ids"])
    ids = first["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 16)
    assert (ids[:, 0] == 101).all() and (ids[:, -1] == 102).all()
    assert ids[:, 1:-1].min() >= 1000 and ids.max() < VOCAB
    assert (first["attention_mask"] == 1).all()
    assert (first["token_type_ids"] == 0).all()


def test_runs_split_over_rounds_sum_to_runs():
    assert sum(bench._runs_per_round(Conditions(runs=10, rounds=4))) == 10
    assert bench._runs_per_round(Conditions(runs=10, rounds=4)) == [3, 3, 2, 2]


def test_no_reference_means_no_ratios_and_rss_can_be_skipped(tiny_models):
    cond = Conditions(
        seq_len=8, warmup=1, runs=2, rounds=1, throughput_batch=1, throughput_runs=1, measure_rss=False,
    )
    out = bench.run([BenchModel("only", "onnx", tiny_models["onnx_a"])], cond)
    assert out["ratios"] == {}
    assert out["models"]["only"]["peak_rss_bytes"] is None


def test_baseline_equal_to_result_passes(result):
    out, _ = result
    assert compare_to_baseline(out, copy.deepcopy(out)) == []


def test_baseline_flags_a_planted_regression(result):
    out, _ = result
    baseline = copy.deepcopy(out)
    baseline["ratios"]["student/teacher-ort-fp32"]["p50"] = 0.1
    messages = compare_to_baseline(out, baseline)
    assert len(messages) == 1
    assert messages[0].startswith("student/teacher-ort-fp32 p50 ratio ")
    assert "> baseline 0.10" in messages[0]
    assert "tolerance 10%" in messages[0]


def test_baseline_tolerance_is_applied():
    result = {"ratios": {"s/t": {"p50": 0.52}}}
    baseline = {"ratios": {"s/t": {"p50": 0.50}}}
    assert compare_to_baseline(result, baseline, tolerance=0.10) == []
    assert len(compare_to_baseline(result, baseline, tolerance=0.01)) == 1
    assert compare_to_baseline(result, baseline, tolerance=0.01)[0] == (
        "s/t p50 ratio 0.52 > baseline 0.50 (+4%, tolerance 1%)"
    )


def test_baseline_flags_missing_models_and_ratios(result):
    out, _ = result
    baseline = copy.deepcopy(out)
    baseline["models"]["teacher-ort-int8"] = copy.deepcopy(baseline["models"]["student"])
    baseline["ratios"]["teacher-ort-int8/teacher-ort-fp32"] = {"p50": 0.5, "spread": [0.5, 0.5], "throughput": 2.0}
    messages = compare_to_baseline(out, baseline)
    assert len(messages) == 2
    assert any("model teacher-ort-int8" in m and "missing" in m for m in messages)
    assert any("teacher-ort-int8/teacher-ort-fp32 ratio" in m and "missing" in m for m in messages)


def test_missing_path_raises_bench_error(tmp_path):
    missing = str(tmp_path / "nope.onnx")
    with pytest.raises(BenchError, match=r"cannot benchmark student: .*nope\.onnx does not exist"):
        bench.run([BenchModel("student", "onnx", missing)], SMALL)


def test_unknown_kind_and_reference_raise_bench_error(tiny_models):
    with pytest.raises(BenchError, match="kind is 'tflite'"):
        bench.run([BenchModel("student", "tflite", tiny_models["onnx_a"])], SMALL)
    with pytest.raises(BenchError, match="reference 'teacher' is not among the models"):
        bench.run([BenchModel("student", "onnx", tiny_models["onnx_a"])], SMALL, reference="teacher")


def test_failing_child_raises_bench_error_with_its_stderr(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(BenchError, match="cannot measure peak RSS of broken: child process exited 2: cannot benchmark"):
        bench.peak_rss_bytes(BenchModel("broken", "onnx", str(broken)), SMALL)


def test_torch_thread_count_is_restored(tiny_models):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cond = Conditions(
            seq_len=8, threads=2, warmup=1, runs=2, rounds=1,
            throughput_batch=1, throughput_runs=1, measure_rss=False,
        )
        bench.run([BenchModel("teacher", "torch-hf", tiny_models["bert"])], cond)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
