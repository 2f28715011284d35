"""Encoder families other than BERT: the layout finder, the probe check, and
every part of compress that reaches into a layer (derive, prune, narrow, sparsify,
relations, export) on tiny RoBERTa, ELECTRA, MPNet and DistilBERT models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from compress.errors import RecipeError, SourceError
from tests.conftest import make_texts, run_cli, tiny_recipe, tokenizer_dir

VOCAB = 30522


def tiny(kind: str, task: str = "base"):
    import torch
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=130)
    config = {
        "roberta": lambda: T.RobertaConfig(**common, pad_token_id=1),
        "electra": lambda: T.ElectraConfig(**common, embedding_size=16),
        "mpnet": lambda: T.MPNetConfig(**common),
        "distilbert": lambda: T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                                                 max_position_embeddings=130),
        # v3's settings: relative attention over 2 x 16 position buckets, c2p|p2c, shared keys
        "deberta-v2": lambda: T.DebertaV2Config(**common, relative_attention=True, position_buckets=16,
                                                pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                                                share_att_key=True, max_relative_positions=-1,
                                                position_biased_input=False),
        "albert": lambda: T.AlbertConfig(**common, embedding_size=16),
    }[kind]()
    if task == "classifier":
        config.num_labels = 3
        return T.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()
    return T.AutoModel.from_config(config, attn_implementation="eager").eval()


def probe(vocab=VOCAB, seq=19):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (3, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0
    mask[2, 3:] = 0
    return ids, mask


def own_hidden(model, ids, mask):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


FAMILIES = ["roberta", "electra", "mpnet", "deberta-v2", "distilbert"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_derived_student_runs_exports_and_reloads(kind, tmp_path):
    import torch

    from compress import layouts
    from compress.export import to_onnx
    from compress.models import derive_student, load_hf_encoder, make_sentence_encoder

    teacher = tiny(kind)
    expected = {"distilbert": "distilbert", "mpnet": "mpnet", "deberta-v2": "deberta-v2"}.get(kind, "bert")
    assert layouts.check(teacher, kind).name == expected
    student = derive_student(teacher, [0, 2])
    assert len(layouts.blocks(student)) == 2 and student.config.num_hidden_layers == 2
    assert len(layouts.blocks(teacher)) == 3  # the teacher is untouched
    ids, mask = probe()
    keep = mask.bool()
    # our layer loop is the student's own forward at every real token
    ours = layouts.run(student, ids, mask)
    assert len(ours) == 3
    assert torch.allclose(ours[-1][keep], own_hidden(student, ids, mask)[keep], atol=1e-5)

    student.save_pretrained(tmp_path)
    reloaded = load_hf_encoder(tmp_path)
    enc = make_sentence_encoder(reloaded).eval()
    with torch.inference_mode():
        ref = enc(ids, mask).numpy()
    assert np.allclose(ref, make_sentence_encoder(student).eval()(ids, mask).detach().numpy(), atol=1e-6)

    # exported with a 16-token dummy, run at 19 tokens: the graph has dynamic shapes
    import onnxruntime as ort

    path = tmp_path / "model.onnx"
    to_onnx(enc, path, "sentence_embedding", 17)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("kind", ["distilbert", "roberta"])
def test_prune_and_narrow_follow_the_layout(kind, tmp_path):
    import torch

    from compress import layouts
    from compress import prune as pruning
    from compress.distill import relations
    from compress.models import narrow_hidden
    from compress.recipe import SparsityConfig

    model = tiny(kind)
    plan = pruning.make_plan(model, heads=0.5, ffn=0.25, kind="magnitude")
    pruning.apply_plan(model, plan)
    shape = pruning.structure(model)
    assert shape["heads"] == [2, 2, 2] and shape["ffn"] == [48, 48, 48]
    ids, mask = probe()
    keep = mask.bool()
    # the attention modules' head bookkeeping followed the smaller Q/K/V
    assert torch.allclose(layouts.run(model, ids, mask)[-1][keep], own_hidden(model, ids, mask)[keep], atol=1e-5)
    model.save_pretrained(tmp_path)
    (tmp_path / pruning.PLAN_FILE).write_text(json.dumps(plan))
    again = pruning.load_pruned(tmp_path)
    assert pruning.structure(again) == shape
    assert torch.allclose(own_hidden(again, ids, mask), own_hidden(model, ids, mask), atol=1e-6)

    masked = pruning.sparsify(model, SparsityConfig(pattern="2:4", linears=["ffn_in", "ffn_out"]))
    assert masked and pruning.sparsity_stats(model, SparsityConfig(pattern="2:4", linears=["ffn_in", "ffn_out"]))["zero_share"] == 0.5
    with torch.inference_mode():
        qk, vv = relations(layouts.blocks(model)[-1], layouts.run(model, ids, mask)[-2], mask, 2)
    assert qk.shape == (3, 2, ids.shape[1], ids.shape[1])

    narrow = narrow_hidden(tiny(kind), 16)
    assert narrow.config.hidden_size == 16 and layouts.num_heads(layouts.blocks(narrow)[0]) == 2
    out = layouts.run(narrow, ids, mask)[-1]
    assert out.shape[-1] == 16 and torch.isfinite(out).all()
    assert torch.allclose(out[keep], own_hidden(narrow, ids, mask)[keep], atol=1e-5)


def test_families_compress_cannot_run_are_refused_in_one_line():
    from compress import layouts

    for kind in ("albert",):
        with pytest.raises(SourceError) as err:
            layouts.check(tiny(kind), kind)
        assert "\n" not in str(err.value) and "supported encoder families" in str(err.value)


@pytest.mark.parametrize("kind", ["mpnet", "deberta-v2"])
def test_relative_position_heads_cannot_be_pruned_or_narrowed_but_ffn_can(kind):
    import torch

    from compress import layouts
    from compress import prune as pruning
    from compress.models import narrow_hidden

    model = tiny(kind)
    with pytest.raises(RecipeError, match="relative position terms"):
        narrow_hidden(model, 16)
    with pytest.raises(RecipeError, match="stages.prune.heads"):
        pruning.apply_plan(model, {"heads": {"0": [0, 1]}})
    pruning.apply_plan(model, pruning.make_plan(model, heads=0, ffn=0.5, kind="magnitude"))
    assert pruning.structure(model)["ffn"] == [32, 32, 32]
    ids, mask = probe()
    keep = mask.bool()
    assert torch.allclose(layouts.run(model, ids, mask)[-1][keep], own_hidden(model, ids, mask)[keep], atol=1e-5)


@pytest.mark.parametrize("kind", ["distilbert", "roberta", "mpnet", "deberta-v2"])
def test_classifier_heads_of_other_families(kind, tmp_path):
    import torch

    from compress.classify import derive_student, load_hf_classifier, make_classifier

    model = tiny(kind, "classifier")
    model.save_pretrained(tmp_path)
    teacher = load_hf_classifier(tmp_path)  # checks our head against the model's own logits
    student = derive_student(teacher, [1, 2])
    ids, mask = probe()
    with torch.inference_mode():
        ours = make_classifier(student).eval()(ids, mask)
        theirs = student(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (3, 3) and torch.allclose(ours, theirs, atol=1e-5)


def test_an_unknown_classification_head_is_refused():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from compress.classify import check_head

    model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     num_labels=3)).eval()
    check_head(model, "bert")  # the pooler head it knows
    # a head that is not a plain Linear after BERT's pooler: our wrapper would read the sequence
    model.classifier = torch.nn.Sequential(model.classifier)
    with pytest.raises(SourceError, match="classification head is not one compress knows"):
        check_head(model, "custom")


def test_distilbert_teacher_builds_end_to_end(tmp_path):
    """A DistilBERT teacher through distill (layers + FFN narrowing), export, quantize and the cpu target."""
    import torch

    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    tiny("distilbert").save_pretrained(teacher)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir() / name, teacher / name)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.txt").write_text("\n".join(make_texts(200)) + "\n")
    rows = [{"text1": a, "text2": b, "score": i / 20} for i, (a, b) in
            enumerate(zip(make_texts(20, seed=3), make_texts(20, seed=4)))]
    (project / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = tiny_recipe(teacher, quantize="{mode: dynamic}", distill=(
        "{epochs: 1, batch_size: 16, max_length: 32, student: {layers: [0, 2], ffn: 0.5}}"))
    (project / "compress.yaml").write_text(recipe)
    done = run_cli("build", "-r", "compress.yaml", "-o", "build", "--cache", "cache", "--target", "cpu",
                   "--no-bench", cwd=project)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((project / "build" / "cpu" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["distill", "export", "quantize", "target cpu"]
    meta = {s["stage"]: s["meta"] for s in report["stages"]}
    assert meta["distill"]["structure"]["ffn"] == [32, 32] and meta["distill"]["num_layers"] == 2
    assert meta["distill"]["params"] < meta["distill"]["teacher_params"]
    assert meta["distill"]["steps"] == 12  # 180 train inputs in batches of 16
    assert meta["export"]["validation"]["random"]["max_abs_diff"] < 1e-3
    assert (project / "build" / "cpu" / "model.onnx").is_file()
