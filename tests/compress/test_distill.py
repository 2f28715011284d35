import numpy as np
import pytest

from compress.distill import distill
from compress.encoders import TorchEncoder
from compress.evaluate import fidelity
from compress.models import derive_student, every_other_layer, load_hf_encoder
from compress.recipe import DistillConfig, StudentConfig
from tests.conftest import make_texts
from tests.stage_helpers import context, teacher_artifact


def test_every_other_layer_keeps_the_last():
    assert every_other_layer(6) == [1, 3, 5]
    assert every_other_layer(4) == [1, 3]
    assert every_other_layer(1) == [0]


def test_derive_student_copies_chosen_layers(tiny_teacher):
    teacher = load_hf_encoder(tiny_teacher)
    student = derive_student(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    assert len(student.encoder.layer) == 2
    w_t = teacher.encoder.layer[3].attention.self.query.weight
    w_s = student.encoder.layer[1].attention.self.query.weight
    assert np.array_equal(w_t.detach().numpy(), w_s.detach().numpy())
    assert w_t.data_ptr() != w_s.data_ptr()  # a copy, not shared


@pytest.fixture(scope="module")
def distilled(tiny_teacher, tmp_path_factory):
    src = teacher_artifact(tiny_teacher)
    cfg = DistillConfig(student=StudentConfig(ffn=0), epochs=3, batch_size=16, max_length=32, lr=1e-3)
    train = make_texts(320)
    art = distill(src, cfg, context(tmp_path_factory.mktemp("distill"), train))
    return src, cfg, train, art


def test_distill_shrinks_and_learns(distilled, tiny_teacher):
    src, cfg, train, art = distilled
    assert art.kind == "torch"
    assert art.meta["num_layers"] == 2 and art.meta["layers"] == [1, 3]
    assert art.meta["params"] < art.meta["teacher_params"]
    assert art.meta["loss_last"] < art.meta["loss_first"]
    assert (art.path / "tokenizer.json").is_file() and (art.path / "model.safetensors").is_file()
    assert load_hf_encoder(art.path).config.num_hidden_layers == 2


def test_distilled_student_is_closer_to_teacher_than_undistilled(distilled, tiny_teacher, tmp_path):
    src, cfg, train, art = distilled
    held = make_texts(60, seed=99)
    teacher = TorchEncoder(tiny_teacher, 64).embed(held)
    trained = TorchEncoder(art.path, 64).embed(held)
    raw_dir = tmp_path / "raw"
    derive_student(load_hf_encoder(tiny_teacher), [1, 3]).save_pretrained(raw_dir)  # same shapes: ffn=0 above
    for f in art.meta["tokenizer_files"]:
        (raw_dir / f).write_bytes((art.path / f).read_bytes())
    untrained = TorchEncoder(raw_dir, 64).embed(held)
    assert fidelity(trained, teacher)["cosine"] > fidelity(untrained, teacher)["cosine"]


def test_distill_is_deterministic(tiny_teacher, tmp_path):
    src = teacher_artifact(tiny_teacher)
    cfg = DistillConfig(max_steps=6, batch_size=16, max_length=32)
    train = make_texts(120)
    a = distill(src, cfg, context(tmp_path / "a", train))
    b = distill(src, cfg, context(tmp_path / "b", train))
    assert a.digest == b.digest


def test_distill_rejects_bad_layers(tiny_teacher, tmp_path):
    from compress.errors import RecipeError

    src = teacher_artifact(tiny_teacher)
    cfg = DistillConfig(student=StudentConfig(layers=[0, 7]), max_steps=1)
    with pytest.raises(RecipeError, match="0..3"):
        distill(src, cfg, context(tmp_path / "x", make_texts(20)))


def test_student_narrowed_before_training(tiny_teacher, tmp_path):
    from compress.prune import PLAN_FILE

    src = teacher_artifact(tiny_teacher)
    cfg = DistillConfig(student=StudentConfig(ffn=0.5, heads=0.5), max_steps=30, batch_size=16, max_length=32, lr=1e-3)
    art = distill(src, cfg, context(tmp_path, make_texts(200)))
    assert (art.path / PLAN_FILE).is_file()
    assert art.meta["structure"] == {"heads": [1, 1], "ffn": [32, 32]}
    model = load_hf_encoder(art.path)  # reloads with its narrower shapes
    assert [l.intermediate.dense.out_features for l in model.encoder.layer] == [32, 32]
    assert art.meta["loss_last"] < art.meta["loss_first"]
    assert art.meta["params"] < load_hf_encoder(tiny_teacher).num_parameters() * 0.99
