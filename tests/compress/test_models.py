"""compress.models: a student with a narrower hidden width, sliced from the
tiny teacher (hidden 32, 2 heads of 16), and its output projection."""

import json

import numpy as np
import pytest
import torch

from compress.errors import RecipeError
from compress.models import (PROJECTION_FILE, PROJECTION_META, count_params, derive_student, load_hf_encoder,
                             make_sentence_encoder, narrow_hidden, projection_of, save_projection)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    model = load_hf_encoder(tiny_teacher)
    # A randomly initialised BERT has every LayerNorm gamma at 1; give the
    # residual dimensions and heads distinct importances, as trained ones have.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.mul_(torch.rand(module.weight.shape, generator=gen) * 2)
        model.encoder.layer[3].attention.self.query.weight[16:].mul_(3.0)  # head 1 of layer 3 is the larger
    return model


def test_narrower_student_shapes_and_slices(teacher):
    student = narrow_hidden(derive_student(teacher, [1, 3]), 16)
    cfg = student.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (16, 1, 2)
    layer = student.encoder.layer[1]
    assert layer.attention.self.query.weight.shape == (16, 16)
    assert layer.attention.output.dense.weight.shape == (16, 16)
    assert layer.intermediate.dense.weight.shape == (64, 16)
    assert layer.output.dense.weight.shape == (16, 64)
    assert student.embeddings.word_embeddings.weight.shape == (30522, 16)

    dims = projection_of(student).dims
    assert len(dims) == 16 and dims == sorted(set(dims))
    r = torch.tensor(dims)
    t_layer = teacher.encoder.layer[3]
    # the head with the larger weights is kept: teacher rows 16..31, columns at the kept dims
    assert torch.equal(layer.attention.self.query.weight, t_layer.attention.self.query.weight[16:][:, r])
    assert torch.equal(layer.attention.output.dense.weight, t_layer.attention.output.dense.weight[r][:, 16:])
    assert torch.equal(layer.output.LayerNorm.weight, t_layer.output.LayerNorm.weight[r])
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight[:, r])
    # the dims kept are the most important by the summed LayerNorm |gamma| + embedding column norms
    from compress.models import residual_scores

    scores = residual_scores(derive_student(teacher, [1, 3]))
    assert scores[r].min() >= scores[[i for i in range(32) if i not in dims]].max()


def test_projection_puts_kept_dims_back_in_place(teacher):
    student = narrow_hidden(derive_student(teacher, [1, 3]), 16)
    proj = projection_of(student)
    dims = proj.dims
    x = torch.randn(3, 16)
    y = proj(x)
    assert y.shape == (3, 32)
    assert torch.equal(y[:, dims], x)
    assert torch.count_nonzero(y[:, [i for i in range(32) if i not in dims]]) == 0
    # so the student's embedding is its own pooled output, embedded in the teacher's dimensions
    enc = make_sentence_encoder(student).eval()
    ids = torch.randint(1000, 30000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        _, pooled, states = enc.encode(ids, mask)
    assert torch.allclose(pooled[:, dims], states[-1].mean(1), atol=1e-6)
    assert count_params(student) == sum(p.numel() for p in student.parameters()) + 16 * 32 + 32


def test_narrower_student_reloads_with_from_pretrained(teacher, tmp_path):
    from transformers import AutoModel

    student = narrow_hidden(derive_student(teacher, [1, 3]), 16)
    with torch.no_grad():
        projection_of(student).weight.add_(0.01)  # trained: no longer the selection
    student.save_pretrained(tmp_path)
    save_projection(student, tmp_path)
    assert (tmp_path / PROJECTION_FILE).is_file()
    assert json.loads((tmp_path / PROJECTION_META).read_text())["out_features"] == 32
    plain = AutoModel.from_pretrained(str(tmp_path))  # a standard BERT checkpoint
    assert plain.config.hidden_size == 16 and plain.config.num_attention_heads == 1
    loaded = load_hf_encoder(tmp_path)
    assert torch.equal(projection_of(loaded).weight, projection_of(student).weight)
    ids = torch.randint(1000, 30000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        a = make_sentence_encoder(student).eval()(ids, mask)
        b = make_sentence_encoder(loaded)(ids, mask)
    assert b.shape == (2, 32) and np.abs((a - b).numpy()).max() < 1e-6


@pytest.mark.parametrize("hidden,message", [(32, "below its hidden size 32"), (40, "below its hidden size 32"),
                                            (12, "multiple of the teacher's head size 16")])
def test_bad_hidden_is_one_line(teacher, hidden, message):
    with pytest.raises(RecipeError, match=message) as exc:
        narrow_hidden(derive_student(teacher, [1, 3]), hidden)
    assert "\n" not in str(exc.value) and "student.hidden" in str(exc.value)
