"""Distillation on two processes (gloo): `compress build --nproc 2` and torchrun.

The two-process build must see every input exactly once per epoch and reach
the single-process build's quality when both take the same global batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from compress import distributed
from compress.cli import _without_nproc
from compress.errors import RecipeError
from compress.tasks import TASKS
from tests.conftest import make_texts, run_cli, tiny_recipe


def test_deal_gives_every_input_of_a_global_batch_to_one_rank():
    batch = list(range(11))
    shares = [distributed.deal(batch, r, 3) for r in range(3)]
    assert sorted(i for s in shares for i in s) == batch
    assert [len(s) for s in shares] == [4, 4, 3]
    assert distributed.deal([5], 1, 2) == []  # a short last batch leaves a rank nothing (it then trains at weight 0)


def test_nproc_is_removed_from_the_relaunched_command():
    assert _without_nproc(["-v", "build", "--nproc", "2", "-o", "b"]) == ["-v", "build", "-o", "b"]
    assert _without_nproc(["build", "--nproc=4", "--no-bench"]) == ["build", "--no-bench"]


def _recipe(teacher: Path, batch: int) -> str:
    return tiny_recipe(teacher, "{mode: dynamic}", distill=f"{{student: {{layers: [1, 3], ffn: 0.25}}, epochs: 3, "
                                                          f"batch_size: {batch}, max_length: 32, lr: 1.0e-3}}")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("distributed")
    (d / "train.txt").write_text("\n".join(make_texts(300, seed=3)) + "\n")
    rows = [{"text1": a, "text2": b, "score": float(len(a) % 5)}
            for a, b in zip(make_texts(30, seed=4), make_texts(30, seed=5))]
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # the same global batch: 16 on one process, 8 on each of two
    (d / "one.yaml").write_text(_recipe(tiny_teacher, 16))
    (d / "two.yaml").write_text(_recipe(tiny_teacher, 8))
    return d


def _distill_meta(report: dict) -> dict:
    return next(s for s in report["stages"] if s["stage"] == "distill")["meta"]


def _check_two_process_build(report: dict, single: dict) -> None:
    meta = _distill_meta(report)
    data = meta["data"]
    assert data["ranks"] == 2
    assert len(data["epochs"]) == 3
    for epoch in data["epochs"]:  # every input once per epoch, split evenly between the ranks
        assert epoch["seen"] == epoch["distinct"] == data["inputs"]
        assert abs(epoch["per_rank"][0] - epoch["per_rank"][1]) <= 8
    assert data["inputs"] == _distill_meta(single)["data"]["inputs"]
    # the same number of optimizer steps as one process with the same global batch
    assert meta["steps"] == _distill_meta(single)["steps"]
    q1, q2 = single["stages"][-1]["quality"], report["stages"][-1]["quality"]
    assert q2["fidelity"]["cosine"] == pytest.approx(q1["fidelity"]["cosine"], abs=0.005)
    assert q2["fidelity"]["top10_agreement"] == pytest.approx(q1["fidelity"]["top10_agreement"], abs=0.03)
    # it learned as much as the single run did
    assert meta["loss_last"] < 0.2 * meta["loss_first"]
    assert meta["loss_last"] == pytest.approx(_distill_meta(single)["loss_last"], rel=0.25)


@pytest.fixture(scope="module")
def single(project):
    r = run_cli("build", "-r", "one.yaml", "-o", "b1", "--cache", "c1", "--no-bench", cwd=project)
    assert r.returncode == 0, r.stderr
    return json.loads((project / "b1" / "cpu" / "report.json").read_text())


def test_nproc_2_matches_one_process_and_sees_every_input_once_per_epoch(project, single):
    r = run_cli("build", "--nproc", "2", "-r", "two.yaml", "-o", "b2", "--cache", "c2", "--no-bench", cwd=project)
    assert r.returncode == 0, r.stderr
    assert "2 processes" in r.stderr
    report = json.loads((project / "b2" / "cpu" / "report.json").read_text())
    _check_two_process_build(report, single)
    data = _distill_meta(single)["data"]
    assert data["ranks"] == 1 and all(e["seen"] == e["distinct"] == data["inputs"] for e in data["epochs"])
    # the teacher pass was sharded: the entry records both ranks, and as many forwards as one process ran
    entries = [json.loads(p.read_text()) for p in (project / "c2" / "teacher-outputs").glob("*/meta.json")]
    assert [e["ranks"] for e in entries] == [2]
    assert entries[0]["forwards"] == _distill_meta(single)["teacher_forwards"]


def test_torchrun_runs_the_same_distributed_build(project, single):
    """What a multi-node user runs (README), on one node: torchrun starts the ranks itself."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "compress", "build", "-r", "two.yaml", "-o", "b3", "--cache", "c3", "--no-bench"],
                       cwd=project, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_two_process_build(json.loads((project / "b3" / "cpu" / "report.json").read_text()), single)


def test_nproc_refuses_what_it_cannot_run(project, monkeypatch):
    r = run_cli("build", "--nproc", "0", "-r", "two.yaml", cwd=project)
    assert r.returncode == 2 and "--nproc 0" in r.stderr
    # every task trains on several processes; a task whose loop does not deal batches would be refused
    assert set(distributed.DISTRIBUTED_TASKS) == set(TASKS)
    for task in TASKS:
        distributed.check_recipe(SimpleNamespace(task=task))
    with pytest.raises(RecipeError) as exc:
        distributed.check_recipe(SimpleNamespace(task="segmentation"))
    assert str(exc.value) == ("--nproc / torchrun: distributed distillation supports tasks embedding, classification, "
                              "causal-lm, image-classification, and this recipe's task is segmentation; build it with "
                              "one process (drop --nproc)")
    # --nproc inside a torchrun world would start processes within processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="already runs under torchrun; drop --nproc"):
        distributed.check_nproc(2)
    distributed.check_nproc(1)
