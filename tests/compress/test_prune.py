import numpy as np
import onnx
import pytest
import torch

from compress.distill import distill
from compress.encoders import TorchEncoder
from compress.evaluate import fidelity
from compress.export import export
from compress.models import load_hf_encoder, make_sentence_encoder
from compress.prune import PLAN_FILE, apply_plan, keep_top, prune
from compress.recipe import DistillConfig, ExportConfig, PruneConfig, StudentConfig
from tests.conftest import make_texts
from tests.stage_helpers import context, teacher_artifact


@pytest.fixture(scope="module")
def student(tiny_teacher, tmp_path_factory):
    src = teacher_artifact(tiny_teacher)
    ctx = context(tmp_path_factory.mktemp("student"), make_texts(200))
    cfg = DistillConfig(student=StudentConfig(ffn=0), max_steps=20, batch_size=16, max_length=32, lr=1e-3)
    return src, distill(src, cfg, ctx)


def _ctx(path, teacher):
    ctx = context(path, make_texts(200))
    ctx.teacher = teacher
    return ctx


def test_keep_top_keeps_best_and_at_least_one():
    assert keep_top(torch.tensor([0.1, 0.9, 0.5, 0.2]), 0.5) == [1, 2]
    assert keep_top(torch.tensor([0.3, 0.1]), 0.9) == [0]


def test_apply_plan_matches_masking(tiny_teacher):
    """Removing a head and neurons gives the same function as zeroing them."""
    model = load_hf_encoder(tiny_teacher)
    masked = load_hf_encoder(tiny_teacher)
    size = model.encoder.layer[0].attention.self.attention_head_size
    with torch.no_grad():
        # zero head 1 of layer 0 (its output-projection columns) and neurons 5..63 of layer 1
        masked.encoder.layer[0].attention.output.dense.weight[:, size:2 * size] = 0
        masked.encoder.layer[1].output.dense.weight[:, 5:] = 0
    apply_plan(model, {"heads": {"0": [0]}, "ffn": {"1": list(range(5))}})
    assert model.encoder.layer[0].attention.self.query.out_features == size
    assert model.encoder.layer[0].attention.output.dense.in_features == size
    assert model.encoder.layer[1].intermediate.dense.out_features == 5
    ids = torch.randint(1000, 30000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        a = make_sentence_encoder(model)(ids, mask)
        b = make_sentence_encoder(masked)(ids, mask)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_prune_removes_parameters_and_reloads(student, tmp_path, importance):
    teacher, src = student
    cfg = PruneConfig(heads=0.5, ffn=0.5, importance=importance, recover_steps=10, batch_size=16, max_length=32)
    art = prune(src, cfg, _ctx(tmp_path / "p", teacher))
    assert (art.path / PLAN_FILE).is_file()
    assert art.meta["params"] < art.meta["params_before_prune"]
    model = load_hf_encoder(art.path)
    for layer in model.encoder.layer:
        assert layer.attention.self.query.out_features == 16  # 1 of 2 heads of size 16
        assert layer.intermediate.dense.out_features == 32    # 32 of 64 neurons
    assert art.meta["pruning"]["heads"] == [[1, 2], [1, 2]]

    # the exported ONNX really has the smaller matrices, and matches torch
    fp32 = export(art, ExportConfig(), context(tmp_path / "onnx", make_texts(10)))
    onnx.checker.check_model(onnx.load(str(fp32.model_file)), full_check=True)
    shapes = sorted(tuple(t.dims) for t in onnx.load(str(fp32.model_file)).graph.initializer if len(t.dims) == 2)
    assert (32, 16) in shapes and (32, 32) in shapes and (32, 64) not in shapes


def test_recovery_brings_the_pruned_student_closer_to_the_teacher(student, tmp_path):
    teacher, src = student
    held = make_texts(60, seed=7)
    t_emb = TorchEncoder(teacher.path, 64).embed(held)
    no_recovery = prune(src, PruneConfig(heads=0.5, ffn=0.5, recover_steps=0, batch_size=16, max_length=32),
                        _ctx(tmp_path / "a", teacher))
    recovered = prune(src, PruneConfig(heads=0.5, ffn=0.5, recover_steps=40, lr=1e-3, batch_size=16, max_length=32),
                      _ctx(tmp_path / "b", teacher))
    f0 = fidelity(TorchEncoder(no_recovery.path, 64).embed(held), t_emb)["cosine"]
    f1 = fidelity(TorchEncoder(recovered.path, 64).embed(held), t_emb)["cosine"]
    assert f1 > f0


@pytest.mark.parametrize("heads,ffn,want", [(0.5, 0.0, {"heads": [1, 1], "ffn": [32, 32]}),
                                            (0.0, 0.5, {"heads": [2, 2], "ffn": [16, 16]})])
def test_pruning_a_narrowed_student_reloads(tiny_teacher, tmp_path, heads, ffn, want):
    """distill narrows the FFN first; prune's saved plan must describe both steps."""
    from compress.prune import structure

    src = teacher_artifact(tiny_teacher)
    narrowed = distill(src, DistillConfig(student=StudentConfig(ffn=0.5), max_steps=2, batch_size=16, max_length=32),
                       context(tmp_path / "d", make_texts(60)))
    art = prune(narrowed, PruneConfig(heads=heads, ffn=ffn, recover_steps=0, batch_size=16, max_length=32),
                _ctx(tmp_path / "p", src))
    assert structure(load_hf_encoder(art.path)) == want
