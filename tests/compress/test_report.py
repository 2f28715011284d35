"""The report's compute line: parameters and FLOPs of teacher and student,
counted on ONNX graphs, in report.json and report.md."""

from __future__ import annotations

from types import SimpleNamespace

from compress import report as rep
from compress.artifact import Artifact
from compress.recipe import Recipe
from tests.conftest import make_texts


def _stage(name, meta):
    return {"stage": name, "kind": "onnx", "cached": False, "digest": "d", "size_bytes": 10, "meta": meta,
            "quality": {"metrics": {"pairs": 0.5}, "retention": {"pairs": 0.9},
                        "fidelity": {"cosine": 0.95, "top10_agreement": 0.8}}}


def test_report_states_params_and_flops_of_teacher_and_student():
    stages = [_stage("distill", {"params": 16_100_000, "teacher_params": 22_700_000, "teacher_forwards": 0,
                                 "teacher_outputs": {"cached": True}}),
              _stage("target cpu", {"params": 16_100_000, "teacher_params": 22_700_000})]
    inputs = SimpleNamespace(train=["a"] * 3, heldout=["b"], digests={})
    teacher = Artifact(path=None, kind="torch", digest="t")
    counted = {"batch": 1, "seq_len": 128, "teacher_flops": 2_900_000_000, "student_flops": 1_100_000_000}
    report = rep.make_report(Recipe(), "cpu", Recipe().targets.cpu, teacher, {"pairs": 0.55}, stages, None, inputs,
                             compute=counted)
    c = report["summary"]["compute"]
    assert c["teacher"] == {"params": 22_700_000, "flops": 2_900_000_000}
    assert c["student"] == {"params": 16_100_000, "flops": 1_100_000_000}
    assert round(c["flops_ratio"], 2) == 0.38 and round(c["params_ratio"], 2) == 0.71
    assert report["teacher"]["flops"] == 2_900_000_000 and report["final"]["flops"] == 1_100_000_000
    md = rep.markdown(report)
    assert ("student 16.1M params, 1.1 GFLOP vs teacher 22.7M params, 2.9 GFLOP (0.38x FLOPs, 0.71x params)"
            in md)
    assert "batch 1, sequence 128" in md
    assert "Teacher forward batches: distill 0 (outputs cached)." in md
    # without a count (older callers) the report still builds, with nulls
    bare = rep.make_report(Recipe(), "cpu", Recipe().targets.cpu, teacher, {"pairs": 0.55}, stages, None, inputs)
    assert bare["summary"]["compute"] is None and "Compute:" not in rep.markdown(bare)


def test_builder_counts_teacher_and_student_flops_on_onnx(tiny_teacher, tmp_path):
    """Counted on the exported tiny BERT (hidden 32, 4 layers, FFN 64) at batch 1,
    sequence 128: per layer Q, K, V, O 4·2·128·32·32, scores and context
    2·2·128·128·32, FFN 2·2·128·32·64."""
    from compress.export import VERSION, export
    from compress.pipeline import Builder, BuildOptions, Inputs, StageRecord
    from compress.recipe import ExportConfig
    from tests.stage_helpers import teacher_artifact

    builder = Builder(Recipe(), BuildOptions(targets=["cpu"], cache_root=tmp_path / "cache", progress=False))
    texts = make_texts(20)
    builder.inputs = Inputs(train=texts, heldout=texts, eval_sets=[])
    builder.teacher = teacher_artifact(tiny_teacher)
    # the student here is the exported teacher itself: same graph, so the same count
    onnx_teacher = builder.run_stage("export", export, VERSION, builder.teacher, ExportConfig()).artifact
    builder.records = [StageRecord("export", "k", onnx_teacher, False, 0.0)]

    per_layer = 4 * 2 * 128 * 32 * 32 + 2 * 2 * 128 * 128 * 32 + 2 * 2 * 128 * 32 * 64
    counted = builder.compute_stats(onnx_teacher, builder.records)
    assert counted == {"batch": 1, "seq_len": 128, "teacher_flops": 4 * per_layer, "student_flops": 4 * per_layer}
