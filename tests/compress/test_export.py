import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compress.errors import StageError
from compress.export import export, random_inputs
from compress.models import load_hf_encoder, make_sentence_encoder
from compress.recipe import ExportConfig
from tests.conftest import make_texts
from tests.stage_helpers import context, teacher_artifact


@pytest.fixture(scope="module")
def exported(tiny_teacher, tmp_path_factory):
    src = teacher_artifact(tiny_teacher)
    return src, export(src, ExportConfig(), context(tmp_path_factory.mktemp("export"), make_texts(40)))


def test_export_is_valid_onnx_with_dynamic_axes(exported):
    src, art = exported
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert art.meta["precision"] == "fp32" and art.meta["parent"] == src.digest
    assert (art.path / "tokenizer.json").is_file()


@pytest.mark.parametrize("batch,seq", [(1, 7), (5, 61)])
def test_export_matches_torch_at_other_shapes(exported, tiny_teacher, batch, seq):
    _, art = exported
    ids, mask = random_inputs(30522, batch=batch, seq=seq, seed=3)
    sess = ort.InferenceSession(str(art.model_file), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    module = make_sentence_encoder(load_hf_encoder(tiny_teacher)).eval()
    with torch.inference_mode():
        want = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert got.shape == (batch, 32)
    assert np.abs(got - want).max() < 1e-4


def test_padding_does_not_change_the_embedding(exported):
    _, art = exported
    sess = ort.InferenceSession(str(art.model_file), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 2000, 2001, 2002, 102]], dtype=np.int64)
    short = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    padded_ids = np.concatenate([ids, np.zeros((1, 9), np.int64)], 1)
    mask = (padded_ids != 0).astype(np.int64)
    padded = sess.run(None, {"input_ids": padded_ids, "attention_mask": mask})[0]
    assert np.abs(short - padded).max() < 1e-5


def test_failed_validation_names_the_numbers(tiny_teacher, tmp_path):
    src = teacher_artifact(tiny_teacher)
    with pytest.raises(StageError, match=r"max \|diff\| \S+ \(allowed 1e-12\), mean cosine"):
        export(src, ExportConfig(max_abs_diff=1e-12), context(tmp_path, make_texts(10)))


def test_narrower_student_exports_teacher_width_embeddings(tiny_teacher, tmp_path):
    """A hidden-16 student's output projection is part of the graph: the ONNX
    embedding has the teacher's 32 dims and matches torch (export.validate)."""
    from tests.stage_helpers import narrowed_student

    student = narrowed_student(tiny_teacher, tmp_path / "s", make_texts(60))
    art = export(student, ExportConfig(), context(tmp_path / "e", make_texts(40)))
    assert art.meta["outputs"]["sentence_embedding"] == ["batch", 32]
    assert art.meta["hidden_size"] == 16 and art.meta["num_heads"] == 1
    assert art.meta["validation"]["random"]["max_abs_diff"] < 1e-4
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    from onnx import numpy_helper

    from compress.models import projection_of

    torch_model = load_hf_encoder(student.path)
    proj = projection_of(torch_model).weight.detach().numpy()  # [32, 16]
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert sum(w.shape in (proj.shape, proj.T.shape) and np.allclose(w.reshape(-1), (proj if w.shape == proj.shape
               else proj.T).reshape(-1)) for w in weights) == 1  # the projection is in the graph
    ids, mask = random_inputs(30522, batch=3, seq=11, seed=4)
    got = ort.InferenceSession(str(art.model_file), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.inference_mode():
        want = make_sentence_encoder(torch_model).eval()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert got.shape == (3, 32) and np.abs(got - want).max() < 1e-4


def test_config_student_exports_teacher_width_embeddings(tiny_teacher, tmp_path):
    """A student given as a config (2 layers of hidden 16, 2 heads, FFN 32): its
    ONNX embedding has the teacher's 32 dims and matches torch."""
    from compress.distill import distill
    from compress.recipe import DistillConfig, StudentConfig

    cfg = DistillConfig(student=StudentConfig(config={"num_hidden_layers": 2, "hidden_size": 16,
                                                      "num_attention_heads": 2, "intermediate_size": 32}),
                        max_steps=4, batch_size=16, max_length=32)
    student = distill(teacher_artifact(tiny_teacher), cfg, context(tmp_path / "s", make_texts(60)))
    art = export(student, ExportConfig(), context(tmp_path / "e", make_texts(40)))
    assert art.meta["outputs"]["sentence_embedding"] == ["batch", 32]
    assert art.meta["hidden_size"] == 16 and art.meta["num_heads"] == 2
    model = onnx.load(str(art.model_file))
    onnx.checker.check_model(model, full_check=True)
    from onnx import numpy_helper

    from compress.models import projection_of

    torch_model = load_hf_encoder(student.path)
    proj = projection_of(torch_model).weight.detach().numpy()  # [32, 16]
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert sum(w.shape in (proj.shape, proj.T.shape) and np.allclose(w.reshape(-1), (proj if w.shape == proj.shape
               else proj.T).reshape(-1)) for w in weights) == 1  # the projection is in the graph
    ids, mask = random_inputs(30522, batch=3, seq=11, seed=4)
    got = ort.InferenceSession(str(art.model_file), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.inference_mode():
        want = make_sentence_encoder(torch_model).eval()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert got.shape == (3, 32) and np.abs(got - want).max() < 1e-4


def test_compare_counts_two_zero_rows_as_agreeing():
    import numpy as np

    from compress.export import compare

    a = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], np.float32)
    assert compare(a, a.copy()) == {"max_abs_diff": 0.0, "mean_cosine": pytest.approx(1.0),
                                    "min_cosine": pytest.approx(1.0)}
    # a zero row against a non-zero one does not agree
    b = np.array([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]], np.float32)
    assert compare(a, b)["min_cosine"] == 0.0
