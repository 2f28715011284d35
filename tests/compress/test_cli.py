"""The CLI as a user meets it: one-line errors with exit 2, nothing left on disk."""

import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli, tiny_recipe


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from compress import cli, recipe; recipe.load(None); "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_schema_is_json_schema(tmp_path):
    res = run_cli("schema", cwd=tmp_path)
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert set(schema["properties"]) >= {"teacher", "task", "data", "stages", "targets", "gates"}


def _error_case(tmp_path, name, tiny_teacher):
    """Write a project for one error case; return the CLI args."""
    (tmp_path / "train.txt").write_text("a cat runs\nthe dog sleeps\n" * 50)
    (tmp_path / "pairs.jsonl").write_text('{"text1": "a", "text2": "b", "score": 1}\n' * 3)
    good = tiny_recipe(tiny_teacher)
    recipes = {
        "missing teacher": good.replace(str(tiny_teacher), str(tmp_path / "no-such-teacher")),
        "malformed yaml": good + "\nstages: [unclosed\n",
        "unknown field": good.replace("heldout_fraction: 0.1", "heldout_fraction: 0.1\n  trian: {source: x}"),
        "unknown stage": good.replace("- quantize: {}", "- quantise: {}"),
        "empty data": good,
        "not onnx": good.replace(f"hf:{tiny_teacher}", str(tmp_path / "teacher.onnx")).replace(
            "  - distill: {epochs: 1, batch_size: 16, max_length: 32}\n", ""),
    }
    if name == "empty data":
        (tmp_path / "train.txt").write_text("\n\n")
    if name == "not onnx":
        (tmp_path / "teacher.onnx").write_text("this is not a protobuf")
    (tmp_path / "compress.yaml").write_text(recipes.get(name, good))
    args = ["build", "-r", "compress.yaml"]
    if name == "unknown target":
        args += ["--target", "jetsn"]
    return args


@pytest.mark.parametrize("case,message", [
    ("missing teacher", r"teacher.source: .*no-such-teacher does not exist"),
    ("malformed yaml", r"malformed YAML at line"),
    ("unknown field", r"unknown field 'trian' in data"),
    ("unknown stage", r"unknown stage 'quantise' \(known: distill, prune, export, fuse, quantize\)"),
    ("unknown target", r"unknown target 'jetsn' \(known: cpu\)"),
    ("not onnx", r"teacher.onnx is not an ONNX model"),
    ("empty data", r"data.train: train.txt has no inputs"),
])
def test_user_errors(tmp_path, tiny_teacher, case, message):
    import re

    args = _error_case(tmp_path, case, tiny_teacher)
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("compress: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "build").exists()
    assert not (tmp_path / ".compress").exists()


def test_inspect_and_bench_need_a_build(tmp_path):
    for cmd in ("inspect", "bench"):
        res = run_cli(cmd, str(tmp_path / "nothing"), cwd=tmp_path)
        assert res.returncode == 2
        assert "is not a compress build" in res.stderr
