"""Speed and quality goals of the cpu build, as ratios measured in one run.

Goals (issue 2): student p50 <= 1/2 of the teacher's ONNX Runtime dynamic-int8
p50 at batch 1, sequence 128, 2 threads; task retention >= 0.95 on every metric.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from compress import bench

LATENCY_GOAL = 0.5
RETENTION_GOAL = 0.95


def _session(path: str, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feed(sess, batch=1, seq=128):
    inputs = bench.make_inputs(batch, seq, 30522)
    return {i.name: inputs[i.name] for i in sess.get_inputs()}


@pytest.mark.parametrize("which", ["student", "teacher-ort-int8", "teacher-ort-fp32"])
def test_latency_batch1_seq128(benchmark, build_dir, reference_models, which):
    path = str(build_dir / "model.onnx") if which == "student" else reference_models[which].path
    sess = _session(path)
    feed = _feed(sess)
    benchmark.extra_info.update({"model": which, "batch": 1, "seq_len": 128, "threads": 2, "allow_spinning": "1"})
    benchmark.pedantic(sess.run, args=(None, feed), rounds=100, iterations=1, warmup_rounds=10)
    del sess
    gc.collect()


def test_student_vs_teacher_int8_ratio(benchmark, build_dir, reference_models):
    """Alternating blocks, one session alive at a time (BENCHMARKING.md)."""
    models = [bench.BenchModel("student", "onnx", str(build_dir / "model.onnx")), reference_models["teacher-ort-int8"]]
    cond = bench.Conditions(runs=100, rounds=4, measure_rss=False)
    result = benchmark.pedantic(bench.run, args=(models, cond), kwargs={"reference": "teacher-ort-int8"},
                                rounds=1, iterations=1)
    ratio = result["ratios"]["student/teacher-ort-int8"]
    benchmark.extra_info.update({"ratio_p50": ratio["p50"], "spread": ratio["spread"],
                                 "student_p50_ms": result["models"]["student"]["latency_ms"]["p50"],
                                 "teacher_int8_p50_ms": result["models"]["teacher-ort-int8"]["latency_ms"]["p50"]})
    assert ratio["p50"] <= LATENCY_GOAL, f"student/teacher-ort-int8 p50 ratio {ratio['p50']:.3f} > goal {LATENCY_GOAL}"


def test_retention_goal(report, benchmark):
    retention = report["summary"]["retention"]
    benchmark.extra_info.update({"retention": retention, "fidelity": report["summary"]["fidelity"]})
    benchmark.pedantic(lambda: None, rounds=1)
    low = {k: v for k, v in retention.items() if not v >= RETENTION_GOAL}
    assert not low, f"retention below {RETENTION_GOAL}: {low}"
