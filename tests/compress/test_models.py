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


# --- a student given as a config ----------------------------------------------

SMALL = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}


def test_config_student_shapes_and_teacher_embeddings(teacher):
    from compress.models import config_student, residual_scores, selection_projection

    student, copied = config_student(teacher, SMALL, max_length=64)
    cfg = student.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size) \
        == ("bert", 16, 2, 2, 32)
    assert student.encoder.layer[1].attention.self.query.weight.shape == (16, 16)
    assert student.encoder.layer[0].intermediate.dense.weight.shape == (32, 16)
    # the embeddings are the teacher's at the residual dimensions narrow_hidden would keep
    dims = sorted(sorted(range(32), key=lambda i: -float(residual_scores(teacher)[i]))[:16])
    r = torch.tensor(dims)
    assert copied == ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                      "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                      "embeddings.LayerNorm.bias"]
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight[:, r])
    assert torch.equal(student.embeddings.LayerNorm.weight, teacher.embeddings.LayerNorm.weight[r])
    # the output projection starts as the transpose of that slice
    proj = projection_of(student)
    assert proj.dims == dims and proj.out_features == 32
    assert torch.equal(proj.weight, selection_projection(dims, 32).weight)
    # the layers are Hugging Face's random init, reproducible by seed
    again, _ = config_student(teacher, SMALL, max_length=64)
    other, _ = config_student(teacher, SMALL, max_length=64, seed=1)
    w = student.encoder.layer[0].attention.self.query.weight
    assert torch.equal(w, again.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(w, other.encoder.layer[0].attention.self.query.weight)


def test_config_student_of_the_teachers_width_has_no_projection(teacher):
    from compress.models import config_student

    student, _ = config_student(teacher, {"num_hidden_layers": 1, "intermediate_size": 16,
                                          "max_position_embeddings": 64}, max_length=64)
    assert projection_of(student) is None and student.config.hidden_size == 32
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    # position rows both tables have are the teacher's
    assert student.embeddings.position_embeddings.weight.shape == (64, 32)
    assert torch.equal(student.embeddings.position_embeddings.weight, teacher.embeddings.position_embeddings.weight[:64])
    enc = make_sentence_encoder(student).eval()
    with torch.inference_mode():
        assert enc(torch.randint(1000, 30000, (2, 9)), torch.ones(2, 9, dtype=torch.long)).shape == (2, 32)


def test_config_student_from_a_config_json(teacher, tmp_path):
    from transformers import BertConfig

    from compress.models import config_student

    BertConfig(vocab_size=30522, max_position_embeddings=128, **SMALL).to_json_file(tmp_path / "config.json")
    a, _ = config_student(teacher, str(tmp_path / "config.json"), max_length=64)
    b, _ = config_student(teacher, str(tmp_path), max_length=64)  # a directory: its config.json
    c, _ = config_student(teacher, SMALL, max_length=64)
    for x in (a, b):
        assert x.config.hidden_size == 16 and x.config.num_hidden_layers == 2
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("config,message", [
    ({"model_type": "gpt2"}, r"student\.config\.model_type: 'gpt2' differs from the teacher's 'bert'"),
    ({"num_layers": 2}, r"student\.config: unknown field 'num_layers' for a bert config"),
    ({"hidden_size": 15}, r"student\.config: hidden_size 15 is not divisible by num_attention_heads 2"),
    ({"hidden_size": 64}, r"student\.config\.hidden_size: 64 is wider than the teacher's 32"),
    ({"vocab_size": 1000}, r"student\.config\.vocab_size: 1000, but the student reads the teacher's tokenizer"),
    ({"max_position_embeddings": 32}, r"student\.config\.max_position_embeddings: 32 is below the 64 tokens"),
    ("does/not/exist.json", r"student\.config: does/not/exist\.json does not exist"),
])
def test_bad_student_config_is_one_line(teacher, config, message):
    from compress.models import config_student

    with pytest.raises(RecipeError, match=message) as exc:
        config_student(teacher, config, max_length=64)
    assert "\n" not in str(exc.value)


def test_bad_config_json_is_one_line(teacher, tmp_path):
    from transformers import DistilBertConfig

    from compress.models import config_student

    DistilBertConfig(dim=16, n_heads=2).to_json_file(tmp_path / "config.json")
    with pytest.raises(RecipeError, match="model_type: 'distilbert' differs from the teacher's 'bert'"):
        config_student(teacher, str(tmp_path / "config.json"), max_length=64)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RecipeError, match="cannot read .*config.json as JSON"):
        config_student(teacher, str(tmp_path), max_length=64)


def test_config_layers():
    from compress.models import config_layers, evenly_spaced_layers

    assert evenly_spaced_layers(4, 2) == [1, 3]
    assert evenly_spaced_layers(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced_layers(6, 4) == [1, 2, 4, 5]
    assert evenly_spaced_layers(4, 1) == [3]
    assert config_layers(None, 2, 4) == [1, 3] and config_layers([0, 2], 2, 4) == [0, 2]
    with pytest.raises(RecipeError, match=r"student\.layers: 3 teacher layers for a student\.config of "
                                          r"num_hidden_layers 2; give one per student layer, e\.g\. \[1, 3\]"):
        config_layers([0, 1, 3], 2, 4)
    with pytest.raises(RecipeError, match=r"7 is not a teacher layer index in 0\.\.3"):
        config_layers([0, 7], 2, 4)
