"""End to end on a tiny teacher: the build, the cache rules, kill-and-resume,
concurrent builds, gates, and `compress bench` against a baseline."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_recipe


def build(project: Path, *extra: str, cache: str = ".compress/cache", out: str = "build"):
    return run_cli("build", "-r", "compress.yaml", "--target", "cpu", "--cache", cache, "--out", out, *extra,
                   cwd=project)


def report(project: Path, out: str = "build") -> dict:
    return json.loads((project / out / "cpu" / "report.json").read_text())


def stage_cached(rep: dict) -> dict[str, bool]:
    return {s["stage"]: s["cached"] for s in rep["stages"]}


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("e2e")
    for name in ("train.txt", "pairs.jsonl", "compress.yaml"):
        shutil.copyfile(tiny_project / name, d / name)
    res = build(d)
    assert res.returncode == 0, res.stderr
    return d


def test_build_writes_a_complete_report(project):
    rep = report(project)
    out = project / "build" / "cpu"
    assert rep["schema_version"] == 1 and rep["target"] == "cpu"
    assert [s["stage"] for s in rep["stages"]] == ["distill", "export", "quantize", "target cpu"]
    assert [s["meta"].get("precision") for s in rep["stages"][1:]] == ["fp32", "int8", "int8"]
    for s in rep["stages"]:
        assert set(s["quality"]["retention"]) == {"pairs"}
        assert -1 <= s["quality"]["fidelity"]["cosine"] <= 1
    assert set(rep["bench"]["models"]) == {"student", "student-fp32", "teacher-torch-fp32", "teacher-ort-fp32",
                                           "teacher-ort-int8"}
    assert {"student/teacher-ort-int8", "student/student-fp32"} <= set(rep["bench"]["ratios"])
    # quantize mode auto: both modes built for the target, timed there, one kept
    decision = rep["stages"][2]["decision"]
    assert set(decision["candidates"]) == {"dynamic", "static"} and decision["target"] == "cpu"
    assert decision["chosen"] == rep["stages"][2]["meta"]["quantization"]["mode"]
    assert all(c["p50_ms"] > 0 and -1 <= c["fidelity"] <= 1 for c in decision["candidates"].values())
    assert "## Quantization mode, chosen by measurement" in (out / "report.md").read_text()
    # the target graph really runs integer kernels and kept the fp32 model's fusions
    graph = rep["summary"]["graph"]
    assert graph["int8_kernels"] > 0 and not graph["qdq_float_matmuls"]
    assert not [w for w in rep["summary"]["warnings"] if "fusion" in w], rep["summary"]["warnings"]
    assert rep["bench"]["conditions"]["seq_len"] == 128 and rep["bench"]["conditions"]["threads"] == 2
    assert rep["gates"]["passed"] is True
    for name in ("model.onnx", "tokenizer.json", "session_options.json", "report.md", "provenance.json"):
        assert (out / name).is_file(), name
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["teacher"]["digest"] == rep["teacher"]["digest"]
    assert len(prov["data"]["train"]["sha256"]) == 64
    assert "## Quality per stage" in (out / "report.md").read_text()
    assert not list((project / "build").glob(".cpu.*"))


def test_unchanged_rebuild_does_no_stage_work(project):
    before = report(project)["final"]["model_sha256"]
    res = build(project)
    assert res.returncode == 0, res.stderr
    assert "no stage work" in res.stderr
    assert "running" not in res.stderr
    rep = report(project)
    assert all(stage_cached(rep).values())
    assert rep["final"]["model_sha256"] == before


def test_changing_quantize_reruns_only_quantize_and_after(project, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(project, d, ignore=shutil.ignore_patterns("build"))
    (d / "compress.yaml").write_text((project / "compress.yaml").read_text().replace(
        "- quantize: {}", "- quantize: {per_channel: false}"))
    res = build(d)
    assert res.returncode == 0, res.stderr
    assert stage_cached(report(d)) == {"distill": True, "export": True, "quantize": False, "target cpu": False}
    assert "compress: distill: running" not in res.stderr.splitlines()


def test_killed_builds_resume_to_the_same_model(project, tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    for name in ("train.txt", "pairs.jsonl", "compress.yaml"):
        shutil.copyfile(project / name, d / name)
    cmd = [sys.executable, "-m", "compress", "build", "-r", "compress.yaml", "--target", "cpu"]
    # Kill at several moments: during start-up, distillation, export/quantize, eval and bench.
    for delay in (1.0, 3.0, 4.5, 6.0, 8.0):
        proc = subprocess.Popen(cmd, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = build(d)
    assert res.returncode == 0, res.stderr
    assert report(d)["final"]["model_sha256"] == report(project)["final"]["model_sha256"]
    assert not list((d / "build").glob(".cpu.*")), "a killed build's temporary directory was left behind"
    assert list((d / ".compress" / "cache" / "tmp").iterdir()) == []
    for entry in (d / ".compress" / "cache").iterdir():
        if entry.name == "teacher-outputs":  # distill's teacher outputs: a cache of their own, same rules
            assert list((entry / "tmp").iterdir()) == []
            assert all((e / "meta.json").is_file() for e in entry.iterdir() if e.name not in ("tmp", "locks"))
        elif entry.name not in ("tmp", "locks"):
            assert (entry / "meta.json").is_file()


def test_two_concurrent_builds_share_the_cache(project, tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    for name in ("train.txt", "pairs.jsonl", "compress.yaml"):
        shutil.copyfile(project / name, d / name)
    procs = [subprocess.Popen([sys.executable, "-m", "compress", "build", "-r", "compress.yaml", "--out", out],
                              cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in ("out-a", "out-b")]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    sha = {report(d, out)["final"]["model_sha256"] for out in ("out-a", "out-b")}
    assert sha == {report(project)["final"]["model_sha256"]}
    # each stage ran once: the second build waited on the lock, then hit the cache
    runs = sum(err.splitlines().count("compress: distill: running") for _, err in results)
    assert runs == 1, "\n=====\n".join(err for _, err in results)


def test_failed_gate_exits_1_and_keeps_report(project, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(project, d, ignore=shutil.ignore_patterns("build"))
    teacher = report(project)["recipe"]["teacher"]["source"].removeprefix("hf:")
    (d / "compress.yaml").write_text(tiny_recipe(Path(teacher), gates="{retention: 5.0}"))
    res = build(d)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("compress: error: gate failed: cpu: retention pairs") and "< gates.retention 5.0" in last
    rep = report(d)
    assert rep["gates"]["passed"] is False and rep["gates"]["failed"]
    assert (d / "build" / "cpu" / "model.onnx").is_file()


def test_refuses_to_replace_a_directory_that_is_not_a_build(project, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(project, d, ignore=shutil.ignore_patterns("build"))
    (d / "build" / "cpu").mkdir(parents=True)
    (d / "build" / "cpu" / "notes.txt").write_text("mine")
    res = build(d)
    assert res.returncode == 2
    assert "is not a compress build" in res.stderr
    assert (d / "build" / "cpu" / "notes.txt").read_text() == "mine"


def test_bench_and_baseline_gate(project, tmp_path):
    out = project / "build" / "cpu"
    saved = tmp_path / "bench.json"
    res = run_cli("bench", str(out), "--runs", "6", "--no-rss", "--save", str(saved), cwd=project)
    assert res.returncode == 0, res.stderr
    result = json.loads(saved.read_text())
    assert "student/teacher-ort-int8" in result["ratios"]
    # a baseline with an impossible ratio must be reported as a regression
    baseline = json.loads(saved.read_text())
    baseline["ratios"]["student/teacher-ort-int8"]["p50"] = 1e-6
    bad = tmp_path / "baseline.json"
    bad.write_text(json.dumps(baseline))
    res = run_cli("bench", str(out), "--runs", "6", "--no-rss", "--baseline", str(bad), cwd=project)
    assert res.returncode == 1
    assert "REGRESSION: student/teacher-ort-int8" in res.stdout


def test_inspect(project):
    res = run_cli("inspect", str(project / "build" / "cpu"), cwd=project)
    assert res.returncode == 0, res.stderr
    assert "target cpu" in res.stdout and "train data sha256" in res.stdout


def test_onnx_teacher_is_quantized_and_built_without_distill(project, tmp_path):
    """An ONNX teacher: no distill, but quantize, target, eval and bench all run."""
    from compress.export import export
    from compress.recipe import ExportConfig
    from tests.conftest import make_texts
    from tests.stage_helpers import context, teacher_artifact

    teacher_dir = Path(report(project)["recipe"]["teacher"]["source"].removeprefix("hf:"))
    fp32 = export(teacher_artifact(teacher_dir), ExportConfig(), context(tmp_path / "fp32", make_texts(10)))
    d = tmp_path / "p"
    d.mkdir()
    for name in ("train.txt", "pairs.jsonl"):
        shutil.copyfile(project / name, d / name)
    recipe = tiny_recipe(teacher_dir).replace(f"hf:{teacher_dir}", f"onnx:{fp32.model_file}").replace(
        "  - distill: {epochs: 1, batch_size: 16, max_length: 32}\n", "")
    (d / "compress.yaml").write_text(recipe)
    res = build(d)
    assert res.returncode == 0, res.stderr
    rep = report(d)
    assert [s["stage"] for s in rep["stages"]] == ["quantize", "target cpu"]
    assert rep["teacher"]["kind"] == "onnx"
    assert "teacher-torch-fp32" not in rep["bench"]["models"]
    assert rep["stages"][-1]["quality"]["fidelity"]["cosine"] > 0.9

    # and an ONNX teacher cannot be distilled: said before any work
    (d / "compress.yaml").write_text(recipe.replace("  - quantize: {}", "  - distill: {}\n  - quantize: {}"))
    res = build(d, out="other")
    assert res.returncode == 2 and "distill needs a torch teacher" in res.stderr
    assert not (d / "other").exists()


def test_prune_stage_in_a_build(project, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(project, d, ignore=shutil.ignore_patterns("build"))
    recipe = (project / "compress.yaml").read_text().replace(
        "  - quantize: {}", "  - prune: {heads: 0.5, ffn: 0.5, recover_steps: 5, batch_size: 16, max_length: 32}\n  - quantize: {}")
    (d / "compress.yaml").write_text(recipe)
    res = build(d)
    assert res.returncode == 0, res.stderr
    rep = report(d)
    assert [s["stage"] for s in rep["stages"]] == ["distill", "prune", "export", "quantize", "target cpu"]
    assert stage_cached(rep)["distill"] is True  # same distill as the project's: reused from the copied cache
    prune_meta = rep["stages"][1]["meta"]
    assert prune_meta["params"] < prune_meta["params_before_prune"]
    assert rep["stages"][-1]["meta"]["params"] == prune_meta["params"]


def test_pick_quantization_takes_the_fastest_that_keeps_quality():
    from compress.pipeline import pick_quantization

    def cand(ratio, fidelity, failures=()):
        return {"p50_ms": ratio * 4, "ratio": ratio, "fidelity": fidelity, "retention_min": 1.0,
                "gate_failures": list(failures)}

    table, chosen, _ = pick_quantization({"dynamic": cand(1.0, 0.92), "static": cand(0.8, 0.915)}, 0.01)
    assert chosen == "static" and table["static"]["eligible"]
    # faster but loses too much fidelity: not taken, and the table says why
    table, chosen, reason = pick_quantization({"dynamic": cand(1.0, 0.92), "static": cand(0.7, 0.85)}, 0.01)
    assert chosen == "dynamic" and reason == "the only candidate that keeps quality"
    assert "more than 0.01 below" in table["static"]["why_not"]
    # faster but fails a gate: not taken
    _, chosen, _ = pick_quantization({"dynamic": cand(1.0, 0.92), "static": cand(0.5, 0.92, ["retention x 0.9 < 0.95"])}, 0.01)
    assert chosen == "dynamic"
    # none keeps quality: the best one is kept and the gates fail the build later
    _, chosen, reason = pick_quantization({"dynamic": cand(1.0, 0.8, ["f"]), "static": cand(0.5, 0.7, ["f"])}, 0.01)
    assert chosen == "dynamic" and reason.startswith("no candidate keeps quality")


def test_auto_tries_qat_only_when_post_training_misses_the_gates(project, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(project, d, ignore=shutil.ignore_patterns("build"))
    teacher = Path(report(project)["recipe"]["teacher"]["source"].removeprefix("hf:"))
    quant = "{candidates: [dynamic, qat], qat_steps: 4, qat_batch_size: 8}"
    # no gates: dynamic keeps quality, qat is not trained
    (d / "compress.yaml").write_text(tiny_recipe(teacher, quantize=quant))
    res = build(d)
    assert res.returncode == 0, res.stderr
    decision = report(d)["stages"][2]["decision"]
    assert set(decision["candidates"]) == {"dynamic"} and "qat" in decision["not_tried"]
    assert "trying qat" not in res.stderr
    # a gate no post-training candidate can pass: qat is trained and timed too
    (d / "compress.yaml").write_text(tiny_recipe(teacher, quantize=quant, gates="{retention: 5.0}"))
    res = build(d, out="gated")
    assert res.returncode == 1 and "trying qat" in res.stderr, res.stderr
    decision = report(d, "gated")["stages"][2]["decision"]
    assert set(decision["candidates"]) == {"dynamic", "qat"} and not decision["not_tried"]
    assert all(c["p50_ms"] > 0 for c in decision["candidates"].values())


def test_static_and_qat_quantize_keys_follow_the_calibration_length():
    """Calibration rows are truncated to teacher.max_length: another length is another static model."""
    from compress.pipeline import Builder, BuildOptions, Inputs
    from compress.recipe import QuantizeConfig, parse

    extras = []
    for length in (128, 256):
        b = Builder(parse({"teacher": {"max_length": length}}), BuildOptions(targets=["cpu"]))
        b.inputs = Inputs([], [], [], digests={"calibration": "c", "train": "t", "heldout": "h"})
        extras.append(b.stage_extra("quantize", QuantizeConfig(mode="static")))
    assert extras[0] != extras[1] and extras[0]["calibration"] == extras[1]["calibration"]


def test_build_with_a_narrower_hidden_width(tiny_project, tiny_teacher, tmp_path):
    """student.hidden 16 of the teacher's 32, then prune: the report's structure
    shows the width, and the built model's embeddings are teacher-width, so
    fidelity and eval compare them with the teacher's."""
    d = tmp_path / "h"
    d.mkdir()
    for name in ("train.txt", "pairs.jsonl"):
        shutil.copyfile(tiny_project / name, d / name)
    recipe = tiny_recipe(tiny_teacher, quantize="{mode: dynamic}",
                         distill="{student: {hidden: 16}, epochs: 1, batch_size: 16, max_length: 32}").replace(
        "  - quantize:", "  - prune: {ffn: 0.5, recover_steps: 5, batch_size: 16, max_length: 32}\n  - quantize:")
    (d / "compress.yaml").write_text(recipe)
    res = build(d)
    assert res.returncode == 0, res.stderr
    rep = report(d)
    assert [s["stage"] for s in rep["stages"]] == ["distill", "prune", "export", "quantize", "target cpu"]
    distill_meta, prune_meta = rep["stages"][0]["meta"], rep["stages"][1]["meta"]
    assert distill_meta["structure"]["hidden"] == 16 and prune_meta["structure"]["hidden"] == 16
    assert prune_meta["structure"]["ffn"] == [21, 21]  # 64 less student.ffn 0.35 (42), then half
    assert rep["stages"][2]["meta"]["outputs"]["sentence_embedding"] == ["batch", 32]
    assert rep["final"]["params"] < 0.6 * rep["teacher"]["params"]
    assert rep["summary"]["fidelity"]["cosine"] > 0.5  # cosine to the teacher, at its width; measured 0.82


def test_distill_key_follows_the_student_config_file(tmp_path):
    """student.config as a path: the file's fields are part of distill's cache key, so editing it re-runs distill."""
    from compress.pipeline import Builder, BuildOptions, Inputs
    from compress.recipe import parse

    path = tmp_path / "student.json"
    r = parse({"stages": [{"distill": {"student": {"config": str(path)}}}]})
    b = Builder(r, BuildOptions(targets=["cpu"]))
    b.inputs = Inputs([], [], [], digests={"calibration": "c", "train": "t", "heldout": "h"})
    cfg = r.stage_plan()[0][1]
    extras = []
    for hidden in (16, 8):
        path.write_text(json.dumps({"hidden_size": hidden, "num_attention_heads": 2}))
        extras.append(b.stage_extra("distill", cfg))
    assert extras[0]["student_config"] == {"hidden_size": 16, "num_attention_heads": 2}
    assert extras[0] != extras[1] and extras[0]["train"] == extras[1]["train"] == "t"


def test_build_with_a_config_student(tiny_project, tiny_teacher, tmp_path):
    """student.config as a config.json beside the recipe: the build distils a
    2-layer, hidden-16 student, exports teacher-width embeddings and records how
    the student was made; a missing file is one line before any work."""
    d = tmp_path / "c"
    d.mkdir()
    for name in ("train.txt", "pairs.jsonl"):
        shutil.copyfile(tiny_project / name, d / name)
    (d / "student.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
                                                "intermediate_size": 32}))
    recipe = tiny_recipe(tiny_teacher, quantize="{mode: dynamic}",
                         distill="{student: {config: student.json}, epochs: 1, batch_size: 16, max_length: 32}")
    (d / "compress.yaml").write_text(recipe)
    res = build(d)
    assert res.returncode == 0, res.stderr
    rep = report(d)
    meta = rep["stages"][0]["meta"]
    assert meta["structure"] == {"hidden": 16, "heads": [2, 2], "ffn": [32, 32]} and meta["layers"] == [1, 3]
    assert meta["student_config"]["source"] == "student.json"
    assert rep["stages"][1]["meta"]["outputs"]["sentence_embedding"] == ["batch", 32]
    assert rep["final"]["params"] < 0.6 * rep["teacher"]["params"]

    (d / "compress.yaml").write_text(recipe.replace("config: student.json", "config: missing.json"))
    res = build(d, out="missing")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "stages.distill.student.config: missing.json does not exist" in res.stderr
    assert not (d / "missing").exists()
