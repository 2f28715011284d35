"""Task classification on a tiny BERT classifier (hidden 32, 4 layers) trained
here on a toy separable set: logit distillation, the logits export, labelled
data, an end-to-end build whose retention is accuracy ratios, recipe errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.artifact import Artifact, digest_files
from compress.errors import RecipeError, SourceError
from compress.recipe import DistillConfig, StudentConfig
from tests.conftest import tokenizer_dir
from tests.stage_helpers import context

ANIMALS = "cat dog bird fish horse mouse cow sheep".split()
THINGS = "car city river house tree road bridge tower".split()
FILLER = "the a runs over under fast slow big small old new".split()


def toy(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Label 1 when animal words outnumber thing words (ties avoided)."""
    rng = random.Random(seed)
    texts, labels = [], []
    while len(texts) < n:
        a, t = rng.randint(0, 4), rng.randint(0, 4)
        if a == t:
            continue
        words = [rng.choice(ANIMALS) for _ in range(a)] + [rng.choice(THINGS) for _ in range(t)] + \
            [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(a > t))
    return texts, labels


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a shared, loaded machine torch's second thread spins against other
    processes: these tiny models train ~15x faster on one (measured here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def artifact(path: Path) -> Artifact:
    return Artifact(path=path, kind="torch", digest=digest_files(path), meta={"task": "classification"})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from compress.classify import finetune
    from compress.encoders import load_tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-classifier")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2,
                     id2label={0: "things", 1: "animals"}, label2id={"things": 0, "animals": 1})
    model = BertForSequenceClassification(cfg)
    texts, labels = toy(400, seed=0)
    finetune(model, texts, labels, load_tokenizer(tokenizer_dir()),
             {"epochs": 3, "batch_size": 16, "lr": 2e-3, "max_length": 32, "seed": 0, "warmup": 0.1})
    model.save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir() / name, d / name)
    return d


def test_teacher_has_real_accuracy(teacher_dir):
    from compress.classify import TorchClassifier, accuracy

    texts, labels = toy(200, seed=5)
    assert accuracy(TorchClassifier(teacher_dir, 64).embed(texts), labels) > 0.9


def test_logit_loss_is_zero_only_for_equal_logits():
    import torch

    from compress.classify import logit_loss

    t = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    assert float(logit_loss(t.clone(), t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_loss(t.flip(-1), t, 2.0)) > 0.1


@pytest.fixture(scope="module")
def distilled(teacher_dir, tmp_path_factory):
    from compress.classify import distill

    train, _ = toy(320, seed=1)  # unlabelled: the teacher's logits are the only signal
    cfg = DistillConfig(student=StudentConfig(layers=[0], ffn=0), losses=["logit", "feature"], epochs=4,
                        batch_size=16, max_length=32, lr=2e-3)
    return distill(artifact(teacher_dir), cfg, context(tmp_path_factory.mktemp("distill"), train))


def test_logit_distillation_learns_the_teacher(distilled, teacher_dir, tmp_path):
    from compress.classify import TorchClassifier, derive_student, fidelity, load_hf_classifier

    meta = distilled.meta
    assert meta["num_layers"] == 1 and meta["num_labels"] == 2 and meta["labelled_inputs"] == 0
    assert meta["logit_loss_last"] < 0.5 * meta["logit_loss_first"]
    raw = tmp_path / "raw"
    derive_student(load_hf_classifier(teacher_dir), [0]).save_pretrained(raw)
    for f in meta["tokenizer_files"]:
        shutil.copyfile(distilled.path / f, raw / f)
    held, _ = toy(200, seed=7)
    teacher = TorchClassifier(teacher_dir, 64).embed(held)
    trained = fidelity(TorchClassifier(distilled.path, 64).embed(held), teacher)
    untrained = fidelity(TorchClassifier(raw, 64).embed(held), teacher)
    assert trained["agreement"] > untrained["agreement"]
    assert trained["kl"] < untrained["kl"]
    assert trained["agreement"] > 0.85


def test_hard_labels_and_narrowing(teacher_dir, tmp_path):
    """Labels add cross-entropy (alpha mixes it in); ffn/heads narrow the student,
    which reloads with its shapes and keeps its head."""
    from compress.classify import TorchClassifier, load_hf_classifier
    from compress.prune import PLAN_FILE

    texts, labels = toy(160, seed=2)
    ctx = context(tmp_path, texts)
    ctx.train_labels = dict(zip(texts, labels))
    cfg = DistillConfig(student=StudentConfig(layers=[1, 3], ffn=0.5, heads=0.5), losses=["logit"], alpha=0.5,
                        max_steps=20, batch_size=16, max_length=32, lr=2e-3)
    from compress.distill import distill  # the stage hands task classification over

    art = distill(artifact(teacher_dir), cfg, ctx)
    assert art.meta["labelled_inputs"] == len(set(texts))
    assert (art.path / PLAN_FILE).is_file()
    assert art.meta["structure"] == {"hidden": 32, "heads": [1, 1], "ffn": [32, 32]}
    model = load_hf_classifier(art.path)
    assert model.classifier.out_features == 2
    assert TorchClassifier(art.path, 64).embed(["a cat"]).shape == (1, 2)


def test_a_student_given_as_a_config(teacher_dir, tmp_path):
    """student.config for a classifier: a narrower 2-layer config student learns the
    teacher by logit KD (agreement rises above its own start), reloads as a plain
    checkpoint of its config; the feature loss is refused for it in one line; a
    same-width one starts from the teacher's head."""
    from compress.classify import TorchClassifier, fidelity, load_hf_classifier
    from compress.distill import distill

    texts, _ = toy(320, seed=3)
    narrow = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    with pytest.raises(RecipeError, match="use losses \\[logit\\]"):
        distill(artifact(teacher_dir), DistillConfig(student=StudentConfig(config=narrow, ffn=0)), 
                context(tmp_path / "refused", texts))
    cfg = DistillConfig(student=StudentConfig(config=narrow, ffn=0), losses=["logit"], epochs=3, batch_size=16,
                        max_length=32, lr=3e-3)
    art = distill(artifact(teacher_dir), cfg, context(tmp_path / "narrow", texts))
    meta = art.meta
    assert meta["layers"] == [1, 3] and meta["structure"]["hidden"] == 16
    assert "bert.embeddings.word_embeddings.weight" in meta["student_config"]["from_teacher"]
    assert meta["params"] < 0.6 * meta["teacher_params"]
    assert meta["logit_loss_last"] < 0.75 * meta["logit_loss_first"]
    model = load_hf_classifier(art.path)  # a plain checkpoint of the smaller config, no plan
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 2
    held, _ = toy(200, seed=7)
    teacher = TorchClassifier(teacher_dir, 64).embed(held)
    assert fidelity(TorchClassifier(art.path, 64).embed(held), teacher)["agreement"] > 0.8

    same = DistillConfig(student=StudentConfig(config={"num_hidden_layers": 1}, ffn=0), losses=["logit", "feature"],
                         max_steps=1, batch_size=16, max_length=32)
    art = distill(artifact(teacher_dir), same, context(tmp_path / "same", texts))
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= set(art.meta["student_config"]["from_teacher"])


def test_teacher_outputs_are_cached_and_a_rebuild_does_not_run_the_teacher(teacher_dir, tmp_path, monkeypatch):
    """The first distill stores the teacher's logits (and what feature and attention
    read) in one entry; a fresh distill with the same settings, or another lr and
    temperature, loads the teacher only to derive the student from, runs no
    teacher forward and (same settings) trains the same student. Settings that
    change the teacher's outputs make another entry, holding only what the losses read."""
    import torch
    from safetensors.torch import load_file

    from compress import classify
    from compress import teacher_cache as tc

    real, loads, forwards = classify.load_hf_classifier, [], []

    def load(path):
        model = real(path)
        loads.append(path)
        emb = model.base_model.embeddings
        # the student is a deep copy of the teacher, hook and all: count the teacher's own calls only
        emb.register_forward_hook(lambda module, *_: forwards.append(1) if module is emb else None)
        return model

    monkeypatch.setattr(classify, "load_hf_classifier", load)
    texts, _ = toy(100, seed=4)
    cfg = DistillConfig(student=StudentConfig(layers=[1, 3], ffn=0), losses=["logit", "feature", "attention"],
                        relation_heads=2, max_steps=4, batch_size=16, max_length=32, lr=2e-3)

    def run(name: str, cfg: DistillConfig) -> tuple[Artifact, int, int]:
        ctx = context(tmp_path / name, texts)
        ctx.cache_root = tmp_path / "cache"
        loads.clear()
        forwards.clear()
        art = classify.distill(artifact(teacher_dir), cfg, ctx)
        return art, len(loads), len(forwards)

    first, n_loads, n_forwards = run("first", cfg)
    out = first.meta["teacher_outputs"]
    # loaded to derive the student, then again to fill the entry: 100 inputs in teacher batches of 32
    assert (n_loads, n_forwards, first.meta["teacher_forwards"]) == (2, 4, 4)
    assert out["cached"] is False and out["bytes"] > 0
    stored = tc.open_entry(tmp_path / "cache" / tc.DIRNAME / out["key"])
    assert isinstance(stored.logits, np.memmap) and stored.logits.dtype == np.float32
    assert stored.logits.shape == (100, 2) and stored.pooled.shape == (100, 32)
    assert len(stored.states) == 2 and len(stored.relations) == 2
    want = classify.TorchClassifier(teacher_dir, 32).embed(texts[:6])  # each input's logits, as the teacher gives them
    np.testing.assert_allclose(stored.logits[:6], want, atol=1e-4)

    again, n_loads, n_forwards = run("again", cfg)
    assert (n_loads, n_forwards, again.meta["teacher_forwards"]) == (1, 0, 0)
    assert again.meta["teacher_outputs"] == {**out, "cached": True}
    a, b = load_file(str(first.path / "model.safetensors")), load_file(str(again.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    hotter, n_loads, n_forwards = run("hotter", cfg.model_copy(update={"temperature": 4.0, "lr": 1e-3, "alpha": 0.3}))
    assert (n_loads, n_forwards) == (1, 0) and hotter.meta["teacher_outputs"]["key"] == out["key"]

    keys = {out["key"]}
    for change in ({"relation_heads": 4}, {"max_length": 16}, {"losses": ["logit"]}):
        other, n_loads, n_forwards = run(str(len(keys)), cfg.model_copy(update=change))
        assert (n_loads, n_forwards, other.meta["teacher_forwards"]) == (2, 4, 4), change
        assert other.meta["teacher_outputs"]["cached"] is False
        keys.add(other.meta["teacher_outputs"]["key"])
    assert len(keys) == 4
    logits_only = tc.open_entry(tmp_path / "cache" / tc.DIRNAME / other.meta["teacher_outputs"]["key"])
    assert logits_only.pooled is None and logits_only.states == logits_only.relations == []
    np.testing.assert_array_equal(logits_only.logits, stored.logits)  # the same teacher batches: the same logits
    assert other.meta["teacher_outputs"]["bytes"] < 0.1 * out["bytes"]


def test_export_gives_logits_matching_torch(distilled, tmp_path):
    import onnx
    import onnxruntime as ort

    from compress.classify import TorchClassifier
    from compress.export import export
    from compress.quantize import run_onnx
    from compress.recipe import ExportConfig

    texts, _ = toy(20, seed=3)
    art = export(distilled, ExportConfig(), context(tmp_path, texts))
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert art.meta["outputs"] == {"logits": ["batch", 2]}
    sess = ort.InferenceSession(str(art.model_file), providers=["CPUExecutionProvider"])
    from compress.encoders import load_tokenizer

    enc = load_tokenizer(art.path)(texts, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    assert got.shape == (20, 2)
    want = TorchClassifier(distilled.path, 64)._run(ids, mask)
    assert np.abs(got - want).max() < 1e-4
    assert np.array_equal(run_onnx(art.model_file, ids, mask), got)  # quantize and target read this output


def test_labelled_files(tmp_path):
    from compress import data

    l2i = {"things": 0, "animals": 1}
    (tmp_path / "a.tsv").write_text("text\tlabel\na cat\tanimals\nthe car\t0\n")
    (tmp_path / "a.csv").write_text('"a cat, a dog",1\nthe road,things\n')
    (tmp_path / "a.jsonl").write_text('{"t": "a cow", "y": "animals"}\n{"t": "a city", "y": 0}\n')
    assert data.load_labelled(str(tmp_path / "a.tsv"), None, None, None, l2i, 2, "w") == (["a cat", "the car"], [1, 0])
    assert data.load_labelled(str(tmp_path / "a.csv"), None, None, None, l2i, 2, "w") == (["a cat, a dog", "the road"], [1, 0])
    assert data.load_labelled(str(tmp_path / "a.jsonl"), "t", "y", None, l2i, 2, "w") == (["a cow", "a city"], [1, 0])
    assert data.load_labelled(str(tmp_path / "a.jsonl"), "t", None, None, l2i, 2, "w") == (["a cow", "a city"], None)
    (tmp_path / "bad.tsv").write_text("a cat\tplants\n")
    with pytest.raises(SourceError, match=r"w: .*bad.tsv line 1: label 'plants' is not a class of the teacher"):
        data.load_labelled(str(tmp_path / "bad.tsv"), None, None, None, l2i, 2, "w")
    with pytest.raises(SourceError, match="has no labels"):
        (tmp_path / "u.txt").write_text("a cat\nthe car\n")
        data.load_labelled_eval(str(tmp_path / "u.txt"), None, None, None, l2i, 2, "data.eval[0]")
    rows = data.polarity_rows("test")
    assert 30 < len(rows) < 55 and {l for _, l in rows} == {"neg", "pos"}
    assert not {t for t, _ in rows} & {t for t, _ in data.polarity_rows("train")}


@pytest.mark.parametrize("data, message", [
    ({"eval": [{"source": "e.jsonl", "field": "text"}]}, "data.eval[0]: task classification needs labels; set label_field"),
    ({"eval": [{"source": "e.txt"}]}, "data.eval[0]: task classification needs labels, but e.txt has none"),
    ({}, "data.eval[0]: task classification needs labels, but example:lee-similarity has none"),
])
def test_recipe_errors_for_missing_labels(data, message):
    from compress.recipe import parse

    with pytest.raises(RecipeError) as exc:
        parse({"task": "classification", "teacher": {"source": "example:minilm-polarity"}, "data": data})
    assert str(exc.value).startswith(message)


def test_recipe_errors_for_task_mismatches():
    from compress.recipe import parse

    with pytest.raises(RecipeError, match="logit needs class logits"):
        parse({"stages": [{"distill": {"losses": ["logit"]}}]})
    with pytest.raises(RecipeError, match="prune yet"):
        parse({"task": "classification", "teacher": {"source": "example:minilm-polarity"},
               "data": {"eval": [{"source": "example:polarity-test"}]}, "stages": [{"distill": {}}, {"prune": {}}]})


@pytest.fixture(scope="module")
def project(teacher_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cls-project")
    texts, labels = toy(300, seed=11)
    names = {0: "things", 1: "animals"}
    (d / "train.tsv").write_text("".join(f"{t}\t{names[l]}\n" for t, l in zip(texts, labels)))
    texts, labels = toy(60, seed=12)
    (d / "eval.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(texts, labels)))
    (d / "compress.yaml").write_text(f"""
teacher: {{source: "hf:{teacher_dir}", max_length: 64}}
task: classification
data:
  train: {{source: train.tsv}}
  heldout_fraction: 0.15
  eval: [{{source: eval.jsonl, field: text, label_field: label}}]
stages:
  - distill: {{student: {{layers: [1, 3], ffn: 0}}, losses: [logit, feature], epochs: 1, batch_size: 16, max_length: 32, lr: 2.0e-3}}
  - quantize: {{mode: dynamic}}
targets: {{cpu: {{}}}}
bench: {{runs: 4, rounds: 2, warmup: 1, rss: false}}
""")
    # One torch thread, as above (ONNX Runtime and the bench set their own thread
    # counts); and the compress under test, not whichever one is installed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run([sys.executable, "-m", "compress", "build", "-r", "compress.yaml", "--target", "cpu"], cwd=d,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    return d


def test_build_reports_accuracy_retention(project):
    rep = json.loads((project / "build" / "cpu" / "report.json").read_text())
    assert rep["task"] == "classification"
    assert [s["stage"] for s in rep["stages"]] == ["distill", "export", "quantize", "target cpu"]
    teacher_acc = rep["teacher"]["metrics"]["eval"]
    assert teacher_acc > 0.8 and round(teacher_acc * 60) == pytest.approx(teacher_acc * 60)  # a share of 60 inputs
    for s in rep["stages"]:
        q = s["quality"]
        assert q["retention"]["eval"] == pytest.approx(q["metrics"]["eval"] / teacher_acc)
        assert set(q["fidelity"]) == {"cosine", "agreement", "kl"} and 0 <= q["fidelity"]["agreement"] <= 1
    assert rep["stages"][1]["meta"]["outputs"] == {"logits": ["batch", 2]}
    assert rep["stages"][-1]["meta"]["precision"] == "int8"
    assert rep["summary"]["retention"]["eval"] > 0.8
    distill = rep["stages"][0]["meta"]  # the teacher ran once per teacher batch, into the teacher-output cache
    assert distill["teacher_forwards"] > 0 and distill["teacher_outputs"]["cached"] is False
    entry = project / ".compress" / "cache" / "teacher-outputs" / distill["teacher_outputs"]["key"]
    assert (entry / "logits.npy").is_file() and (entry / "states_1.npy").is_file()  # logit + feature
    assert f"Teacher forward batches: distill {distill['teacher_forwards']}." in \
        (project / "build" / "cpu" / "report.md").read_text()
    # the teacher alternatives run on a classifier too (torch eager loads its base model)
    assert {"student", "teacher-torch-fp32", "teacher-ort-fp32", "teacher-ort-int8"} <= set(rep["bench"]["models"])


def test_build_with_unlabelled_eval_exits_2_before_work(project, tmp_path):
    (tmp_path / "compress.yaml").write_text((project / "compress.yaml").read_text().replace(
        "eval: [{source: eval.jsonl, field: text, label_field: label}]", "eval: [{source: eval.jsonl, field: text}]"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run([sys.executable, "-m", "compress", "build", "-r", "compress.yaml", "--target", "cpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2
    assert "data.eval[0]: task classification needs labels; set label_field" in res.stderr
    assert not (tmp_path / ".compress").exists()


def test_extra_train_adds_unlabelled_inputs_beside_the_labelled_ones(project, monkeypatch):
    from compress import recipe as recipes
    from compress.classify import IGNORE, load_inputs

    monkeypatch.chdir(project)
    extra = [t + " again" for t in toy(50, seed=13)[0]]
    (project / "extra.txt").write_text("\n".join(extra) + "\n")
    base = recipes.load(project / "compress.yaml")
    more = recipes.parse({**base.model_dump(mode="json", exclude_unset=True),
                          "data": {**base.data.model_dump(mode="json", exclude_unset=True),
                                   "extra_train": [{"source": "extra.txt"}]}})
    a, b = load_inputs(base), load_inputs(more)
    added = set(b.train + b.heldout) - set(a.train + a.heldout)
    assert added == set(extra)
    assert all(t not in b.train_labels for t in extra)  # no label: distillation from the logits alone
    assert all(b.train_labels[t] == a.train_labels[t] for t in a.train)
    assert b.digests["train_labels"] != a.digests["train_labels"] and b.digests["train"] != a.digests["train"]
    ctx_labels = [b.train_labels.get(t, IGNORE) for t in b.train]
    assert ctx_labels.count(IGNORE) == len([t for t in b.train if t in added])


def _build(cwd: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run([sys.executable, "-m", "compress", "build", *args, "--target", "cpu", "--no-bench"], cwd=cwd,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"stderr": res.stderr, "report": json.loads((cwd / args[args.index("-o") + 1] / "cpu" / "report.json").read_text())}


def test_nproc_2_distils_a_classifier_like_one_process(project):
    """`--nproc 2` with batch_size 8 against one process with batch_size 16 (the
    same global batch), 2 epochs: every input once per epoch, on one rank; the
    same steps; the same accuracy retention and held-out agreement."""
    recipe = (project / "compress.yaml").read_text()
    assert "epochs: 1, batch_size: 16" in recipe
    (project / "one.yaml").write_text(recipe.replace("epochs: 1, batch_size: 16", "epochs: 2, batch_size: 16"))
    (project / "two.yaml").write_text(recipe.replace("epochs: 1, batch_size: 16", "epochs: 2, batch_size: 8"))
    one = _build(project, "-r", "one.yaml", "-o", "b1", "--cache", "c1")["report"]
    run = _build(project, "--nproc", "2", "-r", "two.yaml", "-o", "b2", "--cache", "c2")
    assert "2 processes" in run["stderr"]
    two = run["report"]
    m1, m2 = one["stages"][0]["meta"], two["stages"][0]["meta"]
    assert m1["data"]["ranks"] == 1 and m2["data"]["ranks"] == 2
    assert m2["data"]["inputs"] == m1["data"]["inputs"] == m2["train_inputs"]
    for data in (m1["data"], m2["data"]):
        assert len(data["epochs"]) == 2
        for epoch in data["epochs"]:  # every input once per epoch (on one of the ranks)
            assert epoch["seen"] == epoch["distinct"] == data["inputs"]
    for epoch in m2["data"]["epochs"]:
        assert abs(epoch["per_rank"][0] - epoch["per_rank"][1]) <= 8
    assert m2["steps"] == m1["steps"]
    # it learned as much as one process did (rank 0's loss is on its half of each batch: noisier)
    assert m2["loss_last"] < 0.6 * m2["loss_first"]
    assert m2["loss_last"] == pytest.approx(m1["loss_last"], rel=0.35)
    for q1, q2 in zip([s["quality"] for s in one["stages"]], [s["quality"] for s in two["stages"]]):
        assert q2["retention"]["eval"] == pytest.approx(q1["retention"]["eval"], abs=0.05)
        assert q2["fidelity"]["agreement"] == pytest.approx(q1["fidelity"]["agreement"], abs=0.05)
        assert q2["fidelity"]["cosine"] == pytest.approx(q1["fidelity"]["cosine"], abs=0.003)
        assert q2["fidelity"]["kl"] == pytest.approx(q1["fidelity"]["kl"], rel=0.5)
    assert two["summary"]["retention"]["eval"] > 0.8
    # the teacher pass was sharded into one entry: both ranks, as many forwards as one process ran, the same logits
    assert m2["teacher_outputs"]["key"] == m1["teacher_outputs"]["key"]  # the batch size is not part of the key
    entry1, entry2 = (project / c / "teacher-outputs" / m1["teacher_outputs"]["key"] for c in ("c1", "c2"))
    meta1, meta2 = (json.loads((e / "meta.json").read_text()) for e in (entry1, entry2))
    assert meta2["ranks"] == 2 and meta2["forwards"] == meta1["forwards"] == m1["teacher_forwards"] > 0
    assert np.array_equal(np.load(entry1 / "logits.npy"), np.load(entry2 / "logits.npy"))
