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
    """Also when the second run reads the teacher's outputs from the cache (and runs no teacher forward)."""
    src = teacher_artifact(tiny_teacher)
    cfg = DistillConfig(max_steps=6, batch_size=16, max_length=32)
    train = make_texts(120)
    ctx_a, ctx_b = context(tmp_path / "a", train), context(tmp_path / "b", train)
    ctx_a.cache_root = ctx_b.cache_root = tmp_path / "cache"
    a = distill(src, cfg, ctx_a)
    b = distill(src, cfg, ctx_b)
    assert a.digest == b.digest
    assert a.meta["teacher_forwards"] == 4 and b.meta["teacher_forwards"] == 0  # 120 inputs, teacher batches of 32
    assert b.meta["teacher_outputs"]["cached"] and b.meta["teacher_outputs"]["bytes"] > 0


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
    assert art.meta["structure"] == {"hidden": 32, "heads": [1, 1], "ffn": [32, 32]}
    model = load_hf_encoder(art.path)  # reloads with its narrower shapes
    assert [l.intermediate.dense.out_features for l in model.encoder.layer] == [32, 32]
    assert art.meta["loss_last"] < art.meta["loss_first"]
    assert art.meta["params"] < load_hf_encoder(tiny_teacher).num_parameters() * 0.99


def _relation_kl(student_dir, teacher_dir, layer_in_teacher, texts, heads=2):
    """Mean KL(teacher || student) of last-layer attention relations on texts."""
    import torch

    from compress.distill import _pad, relation_loss, relations
    from compress.encoders import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    s_model, t_model = load_hf_encoder(student_dir), load_hf_encoder(teacher_dir)
    ids, mask = _pad(tok(texts)["input_ids"], 0)
    from compress.models import make_sentence_encoder

    with torch.inference_mode():
        _, _, s_states = make_sentence_encoder(s_model).encode(ids, mask)
        _, _, t_states = make_sentence_encoder(t_model).encode(ids, mask)
        s_rel = relations(s_model.encoder.layer[-1], s_states[-2], mask, heads)
        t_rel = relations(t_model.encoder.layer[layer_in_teacher], t_states[layer_in_teacher], mask, heads)
        return float(relation_loss(s_rel, t_rel, mask))


@pytest.fixture(scope="module")
def peaked_teacher(tiny_teacher, tmp_path_factory):
    """The tiny teacher with larger attention weights: at initialisation scale
    every attention distribution is nearly uniform and there is nothing to learn."""
    import shutil

    import torch

    d = tmp_path_factory.mktemp("peaked")
    model = load_hf_encoder(tiny_teacher)
    with torch.no_grad():
        for layer in model.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                lin.weight.mul_(25.0)
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(tiny_teacher / f, d / f)
    return d


@pytest.mark.parametrize("student", [StudentConfig(ffn=0), StudentConfig(ffn=0, heads=0.5)])
def test_attention_relation_distillation(peaked_teacher, tmp_path, student):
    """MiniLM-style relation loss alone: it falls, and the student's last-layer
    relations get closer to the teacher's than the undistilled student's
    (also when the student has fewer heads than the teacher)."""
    tiny_teacher = peaked_teacher
    src = teacher_artifact(tiny_teacher)
    untrained = distill(src, DistillConfig(student=student, losses=["attention"], relation_heads=2, max_steps=1,
                                           lr=1e-9, batch_size=16, max_length=32), context(tmp_path / "u", make_texts(40)))
    trained = distill(src, DistillConfig(student=student, losses=["attention"], relation_heads=2, max_steps=60,
                                         lr=3e-3, batch_size=16, max_length=32), context(tmp_path / "t", make_texts(320)))
    assert trained.meta["loss_last"] < trained.meta["loss_first"]
    held = make_texts(30, seed=11)
    after, before = _relation_kl(trained.path, tiny_teacher, 3, held), _relation_kl(untrained.path, tiny_teacher, 3, held)
    assert before > 0.01 and after < 0.7 * before  # measured: 0.67 -> 0.36 with full heads


def test_relation_heads_must_divide_the_width(tiny_teacher, tmp_path):
    from compress.errors import RecipeError

    cfg = DistillConfig(losses=["feature", "attention"], relation_heads=5, max_steps=1, batch_size=16, max_length=32)
    with pytest.raises(RecipeError, match="relation_heads 5 does not divide the attention width 32"):
        distill(teacher_artifact(tiny_teacher), cfg, context(tmp_path, make_texts(40)))


def _shallow_to_final_cosine(model_dir, texts) -> float:
    """Mean cosine between the mean-pooled state after the first layer and the final embedding."""
    import torch
    import torch.nn.functional as F

    from compress.distill import _pad
    from compress.encoders import load_tokenizer
    from compress.models import make_sentence_encoder

    ids, mask = _pad(load_tokenizer(model_dir)(texts)["input_ids"], 0)
    with torch.inference_mode():
        _, pooled, states = make_sentence_encoder(load_hf_encoder(model_dir)).encode(ids, mask)
    m = mask.unsqueeze(-1).float()
    shallow = (states[1] * m).sum(1) / m.sum(1)
    return float(F.cosine_similarity(shallow, pooled, dim=-1).mean())


def _untrained_fidelity(teacher_dir, held, tmp_path) -> float:
    raw = tmp_path / "raw"
    derive_student(load_hf_encoder(teacher_dir), [1, 3]).save_pretrained(raw)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (raw / f).write_bytes((teacher_dir / f).read_bytes())
    return fidelity(TorchEncoder(raw, 64).embed(held), TorchEncoder(teacher_dir, 64).embed(held))["cosine"]


def test_born_again_self_distillation(peaked_teacher, tmp_path):
    """Generation 2 starts from the trained student and learns from the teacher
    and from a frozen copy of generation 1: its loss falls, and the student ends
    closer to the teacher than the undistilled student."""
    cfg = DistillConfig(student=StudentConfig(ffn=0), losses=["feature", "self"], generations=2, epochs=2,
                        batch_size=16, max_length=32, lr=1e-3)
    art = distill(teacher_artifact(peaked_teacher), cfg, context(tmp_path / "ba", make_texts(320)))
    gens = art.meta["generations"]
    assert len(gens) == 2 and "self_distill" not in gens[0]["losses"] and "self_distill" in gens[1]["losses"]
    assert gens[1]["loss_last"] < gens[1]["loss_first"]
    assert gens[1]["losses"]["pooled"]["last"] < gens[0]["losses"]["pooled"]["first"]
    assert art.meta["steps"] == gens[0]["steps"] + gens[1]["steps"]
    held = make_texts(60, seed=99)
    trained = fidelity(TorchEncoder(art.path, 64).embed(held), TorchEncoder(peaked_teacher, 64).embed(held))["cosine"]
    assert trained > _untrained_fidelity(peaked_teacher, held, tmp_path) + 0.02


def test_deep_to_shallow_self_distillation(peaked_teacher, tmp_path):
    """The shallower layer learns the student's own final embedding: the self
    loss falls, the first layer's pooled state ends closer to the final
    embedding than with feature distillation alone, and the student still
    learns the teacher."""
    base = dict(student=StudentConfig(ffn=0), epochs=2, batch_size=16, max_length=32, lr=1e-3)
    train, held = make_texts(320), make_texts(60, seed=99)
    d2s = distill(teacher_artifact(peaked_teacher),
                  DistillConfig(losses=["feature", "self"], self_mode="deep-to-shallow", self_weight=5.0, **base),
                  context(tmp_path / "d2s", train))
    plain = distill(teacher_artifact(peaked_teacher), DistillConfig(**base), context(tmp_path / "plain", train))
    part = d2s.meta["losses"]["self_distill"]
    assert part["last"] < part["first"]
    assert _shallow_to_final_cosine(d2s.path, held) > _shallow_to_final_cosine(plain.path, held)
    trained = fidelity(TorchEncoder(d2s.path, 64).embed(held), TorchEncoder(peaked_teacher, 64).embed(held))["cosine"]
    assert trained > _untrained_fidelity(peaked_teacher, held, tmp_path) + 0.02


def test_self_needs_a_teacher_loss_and_generations_need_self():
    from compress.errors import RecipeError
    from compress.recipe import parse

    with pytest.raises(RecipeError, match="self needs feature and/or attention"):
        parse({"stages": [{"distill": {"losses": ["self"]}}]})
    with pytest.raises(RecipeError, match="generations are born-again"):
        parse({"stages": [{"distill": {"generations": 3}}]})
    parse({"stages": [{"distill": {"losses": ["feature", "self"], "generations": 3}}]})


# --- a narrower hidden width --------------------------------------------------

def _narrowed_raw(teacher_dir, out, hidden=16):
    """The undistilled narrower student (sliced from the teacher, projection at its initial selection)."""
    from compress.models import narrow_hidden, save_projection

    student = narrow_hidden(derive_student(load_hf_encoder(teacher_dir), [1, 3]), hidden)
    student.save_pretrained(out)
    save_projection(student, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (out / f).write_bytes((teacher_dir / f).read_bytes())
    return out


@pytest.fixture(scope="module")
def hidden_distilled(peaked_teacher, tmp_path_factory):
    src = teacher_artifact(peaked_teacher)
    cfg = DistillConfig(student=StudentConfig(ffn=0, hidden=16), epochs=3, batch_size=16, max_length=32, lr=1e-3)
    return distill(src, cfg, context(tmp_path_factory.mktemp("hidden"), make_texts(320)))


def test_hidden_narrowed_student_distills_towards_the_teacher(hidden_distilled, peaked_teacher, tmp_path):
    """hidden 16 of the teacher's 32 (1 head): the loss falls, embeddings come out
    at the teacher's width, and held-out fidelity beats the undistilled narrowed student."""
    from compress.models import PROJECTION_FILE, projection_of, selection_projection

    art = hidden_distilled
    assert art.meta["structure"] == {"hidden": 16, "heads": [1, 1], "ffn": [64, 64]}
    assert art.meta["loss_last"] < art.meta["loss_first"]
    assert art.meta["losses"]["hidden"]["last"] < art.meta["losses"]["hidden"]["first"]
    assert (art.path / PROJECTION_FILE).is_file()
    model = load_hf_encoder(art.path)
    proj = projection_of(model)
    assert model.config.hidden_size == 16 and proj.out_features == 32
    assert not torch_equal(proj.weight, selection_projection(proj.dims, 32).weight)  # trained with the student
    assert art.meta["params"] == model.num_parameters() + 16 * 32 + 32
    held = make_texts(60, seed=99)
    teacher = TorchEncoder(peaked_teacher, 64).embed(held)
    trained = TorchEncoder(art.path, 64).embed(held)
    untrained = TorchEncoder(_narrowed_raw(peaked_teacher, tmp_path / "raw"), 64).embed(held)
    assert trained.shape == teacher.shape == (60, 32)
    assert fidelity(trained, teacher)["cosine"] > fidelity(untrained, teacher)["cosine"] + 0.02


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_feature_loss_lifts_are_learned(peaked_teacher, monkeypatch):
    """The per-state lifts start as the selection and move with training; without them
    a narrower student's states could not be compared with the teacher's."""
    import torch

    import compress.distill as d
    from compress.distill import lifted, state_lifts
    from compress.encoders import load_tokenizer
    from compress.models import narrow_hidden

    student = narrow_hidden(derive_student(load_hf_encoder(peaked_teacher), [1, 3]), 16)
    lifts = state_lifts(student, 2)
    dims = lifts[0].dims
    x = torch.randn(2, 5, 16)
    assert torch.equal(lifted([x], lifts)[0][..., dims], x)

    seen = {}
    original = d.student_step

    def spy(s_enc, heads, lifts=None):
        seen["lifts"] = lifts
        return original(s_enc, heads, lifts)

    monkeypatch.setattr(d, "student_step", spy)
    cfg = DistillConfig(student=StudentConfig(ffn=0, hidden=16), max_steps=5, batch_size=8, max_length=32, lr=1e-3)
    d.train(student, load_hf_encoder(peaked_teacher), [1, 3], make_texts(40), load_tokenizer(peaked_teacher), cfg,
            lambda total, desc: d._Silent())
    assert seen["lifts"] is not None and len(seen["lifts"]) == 2
    assert not torch.equal(seen["lifts"][0].weight, lifts[0].weight)


def test_hidden_composes_with_heads_and_ffn_narrowing(tiny_teacher, tmp_path):
    from compress.prune import PLAN_FILE, structure

    src = teacher_artifact(tiny_teacher)
    cfg = DistillConfig(student=StudentConfig(hidden=16, ffn=0.5, heads=0.5), max_steps=6, batch_size=16,
                        max_length=32)
    art = distill(src, cfg, context(tmp_path, make_texts(80)))
    assert (art.path / PLAN_FILE).is_file()
    assert art.meta["structure"] == {"hidden": 16, "heads": [1, 1], "ffn": [32, 32]}
    model = load_hf_encoder(art.path)  # plan applied on the narrower config, then its weights
    assert structure(model) == art.meta["structure"]
    assert TorchEncoder(art.path, 64).embed(make_texts(3, seed=5)).shape == (3, 32)


def test_hidden_then_prune_reloads(tiny_teacher, tmp_path):
    from compress.models import projection_of
    from compress.prune import prune, structure
    from compress.recipe import PruneConfig

    src = teacher_artifact(tiny_teacher)
    narrowed = distill(src, DistillConfig(student=StudentConfig(hidden=16, ffn=0.5), max_steps=2, batch_size=16,
                                          max_length=32), context(tmp_path / "d", make_texts(60)))
    ctx = context(tmp_path / "p", make_texts(60))
    ctx.teacher = src
    art = prune(narrowed, PruneConfig(ffn=0.5, recover_steps=4, batch_size=16, max_length=32), ctx)
    model = load_hf_encoder(art.path)
    assert structure(model) == {"hidden": 16, "heads": [1, 1], "ffn": [16, 16]}
    assert projection_of(model) is not None and projection_of(model).out_features == 32
    assert art.meta["recovery"]["steps"] == 4


@pytest.mark.parametrize("task", ["classification", "image-classification"])
def test_hidden_is_embedding_only_at_the_stage(tiny_teacher, tmp_path, task):
    from compress.errors import RecipeError

    src = teacher_artifact(tiny_teacher)
    src = type(src)(path=src.path, kind=src.kind, digest=src.digest, meta={"task": task})
    with pytest.raises(RecipeError, match="implemented for task embedding only"):
        distill(src, DistillConfig(student=StudentConfig(hidden=16), max_steps=1), context(tmp_path, make_texts(10)))


def test_a_narrowed_student_is_not_a_teacher(hidden_distilled, tmp_path):
    from compress.errors import RecipeError

    with pytest.raises(RecipeError, match="is a student with an output projection"):
        distill(teacher_artifact(hidden_distilled.path), DistillConfig(max_steps=1), context(tmp_path, make_texts(10)))


# --- a student given as a config ----------------------------------------------

SMALL = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def config_distilled(tiny_teacher, tmp_path_factory):
    cfg = DistillConfig(student=StudentConfig(config=SMALL), epochs=3, batch_size=16, max_length=32, lr=1e-3)
    return distill(teacher_artifact(tiny_teacher), cfg, context(tmp_path_factory.mktemp("config"), make_texts(320)))


def _config_raw(teacher_dir, out, config):
    """The undistilled config student: random layers, the teacher's embeddings, projection at its initial slice."""
    from compress.models import config_student, save_projection

    student, _ = config_student(load_hf_encoder(teacher_dir), config, max_length=64)
    student.save_pretrained(out)
    save_projection(student, out)
    for f in TOKENIZER_FILES:
        (out / f).write_bytes((teacher_dir / f).read_bytes())
    return out


def test_config_student_distills_towards_the_teacher(config_distilled, tiny_teacher, tmp_path):
    """2 layers of hidden 16 (the teacher: 4 of 32): the loss falls, embeddings come
    out at the teacher's width, and held-out fidelity beats the undistilled config student."""
    from compress.models import PROJECTION_FILE, projection_of, selection_projection
    from compress.prune import PLAN_FILE

    art = config_distilled
    assert art.meta["layers"] == [1, 3] and art.meta["num_layers"] == 2
    assert art.meta["structure"] == {"hidden": 16, "heads": [2, 2], "ffn": [32, 32]}
    assert art.meta["student_config"]["source"] == "recipe"
    assert "embeddings.word_embeddings.weight" in art.meta["student_config"]["from_teacher"]
    assert art.meta["loss_last"] < art.meta["loss_first"]
    assert art.meta["losses"]["hidden"]["last"] < art.meta["losses"]["hidden"]["first"]  # through the lifts
    assert (art.path / PROJECTION_FILE).is_file() and not (art.path / PLAN_FILE).exists()
    model = load_hf_encoder(art.path)
    proj = projection_of(model)
    assert proj.out_features == 32 and not torch_equal(proj.weight, selection_projection(proj.dims, 32).weight)
    assert art.meta["params"] == model.num_parameters() + 16 * 32 + 32
    held = make_texts(60, seed=99)
    teacher = TorchEncoder(tiny_teacher, 64).embed(held)
    trained = TorchEncoder(art.path, 64).embed(held)
    untrained = TorchEncoder(_config_raw(tiny_teacher, tmp_path / "raw", SMALL), 64).embed(held)
    assert trained.shape == teacher.shape == (60, 32)
    # measured: 0.96 against 0.81
    assert fidelity(trained, teacher)["cosine"] > fidelity(untrained, teacher)["cosine"] + 0.05


def test_config_student_reloads(config_distilled, tmp_path):
    """A standard checkpoint of its config (from_pretrained), plus the projection files."""
    from transformers import AutoModel

    from compress.models import make_sentence_encoder

    import torch

    plain = AutoModel.from_pretrained(str(config_distilled.path))
    assert (plain.config.hidden_size, plain.config.num_hidden_layers, plain.config.intermediate_size) == (16, 2, 32)
    a, b = load_hf_encoder(config_distilled.path), load_hf_encoder(config_distilled.path)
    ids = torch.randint(1000, 30000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        x, y = make_sentence_encoder(a)(ids, mask), make_sentence_encoder(b)(ids, mask)
    assert x.shape == (2, 32) and torch.equal(x, y)
    from compress.errors import RecipeError

    with pytest.raises(RecipeError, match="is a student with an output projection"):
        distill(teacher_artifact(config_distilled.path), DistillConfig(max_steps=1),
                context(tmp_path, make_texts(10)))


def test_config_student_lifts_start_at_the_embedding_slice(tiny_teacher):
    from compress.distill import state_lifts
    from compress.models import config_student, projection_of

    student, _ = config_student(load_hf_encoder(tiny_teacher), SMALL, max_length=64)
    lifts = state_lifts(student, 2)
    assert len(lifts) == 2 and all(l.dims == projection_of(student).dims for l in lifts)


def test_same_width_config_student_needs_no_projection(tiny_teacher, tmp_path):
    from compress.models import PROJECTION_FILE, projection_of

    cfg = DistillConfig(student=StudentConfig(config={"num_hidden_layers": 1, "intermediate_size": 32}, layers=[2]),
                        max_steps=60, batch_size=16, max_length=32, lr=1e-3)
    art = distill(teacher_artifact(tiny_teacher), cfg, context(tmp_path, make_texts(160)))
    assert art.meta["layers"] == [2] and art.meta["structure"] == {"hidden": 32, "heads": [2], "ffn": [32]}
    assert art.meta["loss_last"] < art.meta["loss_first"]
    assert not (art.path / PROJECTION_FILE).exists() and projection_of(load_hf_encoder(art.path)) is None
    assert TorchEncoder(art.path, 64).embed(make_texts(3, seed=5)).shape == (3, 32)


def test_config_student_from_a_file(tiny_teacher, tmp_path):
    import json

    (tmp_path / "student.json").write_text(json.dumps({**SMALL, "num_hidden_layers": 3}))
    cfg = DistillConfig(student=StudentConfig(config=str(tmp_path / "student.json")), max_steps=2, batch_size=16,
                        max_length=32)
    art = distill(teacher_artifact(tiny_teacher), cfg, context(tmp_path / "d", make_texts(40)))
    assert art.meta["layers"] == [1, 2, 3] and art.meta["student_config"]["source"] == str(tmp_path / "student.json")
    assert load_hf_encoder(art.path).config.num_hidden_layers == 3


def test_config_student_errors_at_the_stage(tiny_teacher, tmp_path):
    from compress.errors import RecipeError

    src = teacher_artifact(tiny_teacher)
    with pytest.raises(RecipeError, match=r"student\.layers: 3 teacher layers for a student\.config of "
                                          r"num_hidden_layers 2"):
        distill(src, DistillConfig(student=StudentConfig(config=SMALL, layers=[0, 1, 3]), max_steps=1),
                context(tmp_path / "a", make_texts(10)))
    # each field alone is fine; with the teacher's other one they do not fit
    with pytest.raises(RecipeError, match=r"hidden_size 32 is not divisible by num_attention_heads 5"):
        distill(src, DistillConfig(student=StudentConfig(config={"num_attention_heads": 5}), max_steps=1),
                context(tmp_path / "b", make_texts(10)))
    with pytest.raises(RecipeError, match=r"hidden_size 17 is not divisible by num_attention_heads 2"):
        distill(src, DistillConfig(student=StudentConfig(config={"hidden_size": 17}), max_steps=1),
                context(tmp_path / "c", make_texts(10)))
    bad = type(src)(path=src.path, kind=src.kind, digest=src.digest, meta={"task": "image-classification"})
    with pytest.raises(RecipeError, match="config is implemented for tasks embedding and classification, "
                                          "not image-classification"):
        distill(bad, DistillConfig(student=StudentConfig(config=SMALL), max_steps=1),
                context(tmp_path / "d", make_texts(10)))


def test_config_student_then_prune_reloads(tiny_teacher, tmp_path):
    from compress.models import projection_of
    from compress.prune import prune, structure
    from compress.recipe import PruneConfig

    src = teacher_artifact(tiny_teacher)
    student = distill(src, DistillConfig(student=StudentConfig(config=SMALL), max_steps=2, batch_size=16,
                                         max_length=32), context(tmp_path / "d", make_texts(60)))
    ctx = context(tmp_path / "p", make_texts(60))
    ctx.teacher = src
    art = prune(student, PruneConfig(ffn=0.5, heads=0.5, recover_steps=4, batch_size=16, max_length=32), ctx)
    model = load_hf_encoder(art.path)
    assert structure(model) == {"hidden": 16, "heads": [1, 1], "ffn": [16, 16]}
    assert projection_of(model) is not None and projection_of(model).out_features == 32
    assert TorchEncoder(art.path, 64).embed(make_texts(3, seed=5)).shape == (3, 32)
