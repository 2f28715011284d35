import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

from compress.distill import distill
from compress.encoders import TorchEncoder
from compress.errors import RecipeError
from compress.evaluate import fidelity
from compress.export import export
from compress.models import derive_student, load_hf_encoder, make_sentence_encoder
from compress.prune import (PLAN_FILE, apply_plan, compose, keep_top, layer_linears, least_important_layers, prune,
                            structure)
from compress.recipe import DistillConfig, ExportConfig, PruneConfig, SparsityConfig, StudentConfig, parse
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
    # the defaults remove no layer and make no zeros
    assert "layers" not in json.loads((art.path / PLAN_FILE).read_text()) and "sparsity" not in art.meta

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


@pytest.mark.parametrize("heads,ffn,want", [(0.5, 0.0, {"hidden": 32, "heads": [1, 1], "ffn": [32, 32]}),
                                            (0.0, 0.5, {"hidden": 32, "heads": [2, 2], "ffn": [16, 16]})])
def test_pruning_a_narrowed_student_reloads(tiny_teacher, tmp_path, heads, ffn, want):
    """distill narrows the FFN first; prune's saved plan must describe both steps."""
    from compress.prune import structure

    src = teacher_artifact(tiny_teacher)
    narrowed = distill(src, DistillConfig(student=StudentConfig(ffn=0.5), max_steps=2, batch_size=16, max_length=32),
                       context(tmp_path / "d", make_texts(60)))
    art = prune(narrowed, PruneConfig(heads=heads, ffn=ffn, recover_steps=0, batch_size=16, max_length=32),
                _ctx(tmp_path / "p", src))
    assert structure(load_hf_encoder(art.path)) == want


# --- whole layers -----------------------------------------------------------

def _embed(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.inference_mode():
        return make_sentence_encoder(model.eval())(ids, mask)


def test_least_important_layers_re_measures_after_each_removal():
    # alone, layer 2 costs least; once it is gone, layer 1 costs less than layer 0
    table = {(0, 1, 3): 1.0, (0, 2, 3): 2.0, (1, 2, 3): 3.0, (0, 1, 2): 5.0, (1, 3): 4.0, (0, 3): 1.5, (0, 1): 9.0}
    assert least_important_layers(4, 1, lambda kept: table[tuple(kept)]) == [2]
    assert least_important_layers(4, 2, lambda kept: table[tuple(kept)]) == [1, 2]


def test_compose_follows_removed_layers():
    first = {"heads": {}, "ffn": {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7], "2": [8, 9, 10, 11]}}
    second = {"layers": [0, 2], "heads": {"1": [1]}, "ffn": {"1": [1, 3]}}
    assert compose(first, second) == {"layers": [0, 2], "heads": {"1": [1]},
                                      "ffn": {"0": [0, 1, 2, 3], "1": [9, 11]}}
    assert compose({"layers": [0, 2, 3]}, {"layers": [0, 2]})["layers"] == [0, 3]
    assert compose({"layers": [1, 3]}, {"ffn": {"0": [2]}}) == {"layers": [1, 3], "heads": {}, "ffn": {"0": [2]}}


def test_layer_removal_equals_the_kept_layers_and_reloads(tiny_teacher, tmp_path):
    src = teacher_artifact(tiny_teacher)
    cfg = PruneConfig(layers=[1], heads=0, ffn=0, recover_steps=0, batch_size=16, max_length=32)
    art = prune(src, cfg, _ctx(tmp_path / "p", src))
    assert art.meta["layers"] == [0, 2, 3] and art.meta["num_layers"] == 3
    assert art.meta["pruning"]["layers_removed"] == [1]
    assert json.loads((art.path / PLAN_FILE).read_text())["layers"] == [0, 2, 3]
    reloaded = load_hf_encoder(art.path)
    assert len(reloaded.encoder.layer) == 3 and reloaded.config.num_hidden_layers == 3
    by_hand = derive_student(load_hf_encoder(tiny_teacher), [0, 2, 3])
    assert torch.allclose(_embed(reloaded), _embed(by_hand), atol=1e-6)
    assert not torch.allclose(_embed(reloaded), _embed(load_hf_encoder(tiny_teacher)), atol=1e-3)


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])  # both rank layers by their skip loss
def test_layer_count_removes_the_layer_that_does_nothing(tiny_teacher, tmp_path, monkeypatch, importance):
    """A layer whose output projections are zero passes its input through (fresh LayerNorms
    are the identity on normalised input): skipping it costs nothing, so it is the one removed,
    and recovery maps the remaining student layers to their own teacher layers."""
    import compress.distill

    model = load_hf_encoder(tiny_teacher)
    with torch.no_grad():
        for linear in (model.encoder.layer[2].attention.output.dense, model.encoder.layer[2].output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
    model.save_pretrained(tmp_path / "t")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (tmp_path / "t" / f).write_bytes((tiny_teacher / f).read_bytes())
    src = teacher_artifact(tmp_path / "t")

    seen = {}
    real_train = compress.distill.train

    def spy(student, teacher, layers, *args, **kwargs):
        seen.update(layers=list(layers), student_layers=len(student.encoder.layer))
        return real_train(student, teacher, layers, *args, **kwargs)

    monkeypatch.setattr(compress.distill, "train", spy)
    cfg = PruneConfig(layers=1, heads=0, ffn=0, importance=importance, importance_batches=4, recover_steps=2,
                      batch_size=16, max_length=32)
    art = prune(src, cfg, _ctx(tmp_path / "p", src))
    assert art.meta["pruning"]["layers_removed"] == [2] and art.meta["layers"] == [0, 1, 3]
    assert seen == {"layers": [0, 1, 3], "student_layers": 3}
    assert len(load_hf_encoder(art.path).encoder.layer) == 3


def test_layer_removal_after_narrowing_and_head_pruning_reloads(tiny_teacher, tmp_path):
    src = teacher_artifact(tiny_teacher)
    narrowed = distill(src, DistillConfig(student=StudentConfig(layers=[0, 1, 2, 3], ffn=0.5), max_steps=2,
                                          batch_size=16, max_length=32), context(tmp_path / "d", make_texts(60)))
    art = prune(narrowed, PruneConfig(layers=[0, 3], heads=0.5, ffn=0.5, importance="magnitude", recover_steps=0,
                                      batch_size=16, max_length=32), _ctx(tmp_path / "p", src))
    plan = json.loads((art.path / PLAN_FILE).read_text())
    assert plan["layers"] == [1, 2] and sorted(plan["ffn"]) == ["0", "1"]
    assert all(len(kept) == 16 and max(kept) < 64 for kept in plan["ffn"].values())
    assert structure(load_hf_encoder(art.path)) == {"hidden": 32, "heads": [1, 1], "ffn": [16, 16]}
    assert art.meta["layers"] == [1, 2] and art.meta["pruning"]["ffn"] == [[16, 32], [16, 32]]


def test_removing_every_layer_is_a_recipe_error(tiny_teacher, tmp_path):
    src = teacher_artifact(tiny_teacher)
    with pytest.raises(RecipeError, match="stages.prune.layers 4 would remove all 4"):
        prune(src, PruneConfig(layers=4, recover_steps=0), _ctx(tmp_path / "p", src))


# --- sparsity -----------------------------------------------------------------

def at_most_two_of_four(array: np.ndarray, axis: int) -> bool:
    """Every 4 consecutive elements along `axis` hold at most 2 nonzeros (the tail zero-padded)."""
    nz = np.moveaxis(array != 0, axis, -1)
    nz = np.pad(nz, [(0, 0)] * (nz.ndim - 1) + [(0, (-nz.shape[-1]) % 4)])
    return int(nz.reshape(*nz.shape[:-1], -1, 4).sum(-1).max()) <= 2


def test_unquoted_two_four_in_yaml_is_the_pattern():
    recipe = parse(yaml.safe_load("stages: [{prune: {sparsity: {pattern: 2:4}}}]"))  # YAML reads 2:4 as 124
    assert recipe.stages[0].config.sparsity.pattern == "2:4"
    assert PruneConfig().sparsity.pattern == "none" and PruneConfig().layers is None


def test_two_four_holds_after_recovery_and_in_the_onnx(student, tmp_path):
    teacher, src = student
    cfg = PruneConfig(heads=0.5, ffn=0.5, importance="magnitude", recover_steps=10, lr=1e-3, batch_size=16,
                      max_length=32, sparsity=SparsityConfig(pattern="2:4"))
    art = prune(src, cfg, _ctx(tmp_path / "p", teacher))
    assert art.meta["recovery"]["steps"] == 10
    model = load_hf_encoder(art.path)
    weights = [linear.weight.detach().numpy() for layer in model.encoder.layer
               for linear in layer_linears(layer).values()]
    assert len(weights) == 12
    for w in weights:  # torch [out, in]: groups along `in`
        assert at_most_two_of_four(w, axis=1) and (w == 0).mean() >= 0.5
    meta = art.meta["sparsity"]
    assert meta["pattern"] == "2:4" and meta["zero_share"] >= 0.5
    assert all(share >= 0.5 for row in meta["layers"] for share in row.values())
    assert "TensorRT" in meta["speedup"] and "no speedup" in meta["speedup"]

    fp32 = export(art, ExportConfig(), context(tmp_path / "onnx", make_texts(10)))
    proto = onnx.load(str(fp32.model_file))
    onnx.checker.check_model(proto, full_check=True)
    inits = [numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) == 2]
    for w in weights:  # ONNX MatMul holds the transposed weight [in, out]: groups along the first axis
        found = [a for a in inits if a.shape == w.T.shape and np.array_equal(a, w.T)]
        assert found, f"no initializer holds a {w.shape} Linear weight transposed"
        assert at_most_two_of_four(found[0], axis=0)


def test_unstructured_reaches_the_share_on_the_selected_linears(student, tmp_path):
    teacher, src = student
    cfg = PruneConfig(heads=0, ffn=0, recover_steps=2, lr=1e-3, batch_size=16, max_length=32,
                      sparsity=SparsityConfig(pattern="unstructured", amount=0.3, linears=["ffn_in", "ffn_out"]))
    art = prune(src, cfg, _ctx(tmp_path / "p", teacher))
    for layer in load_hf_encoder(art.path).encoder.layer:
        linears = layer_linears(layer)
        for name in ("ffn_in", "ffn_out"):
            w = linears[name].weight
            assert int((w == 0).sum()) == round(0.3 * w.numel())
        assert all(int((linears[n].weight == 0).sum()) == 0 for n in ("query", "key", "value", "attention_output"))
    assert art.meta["sparsity"]["layers"][0]["ffn_in"] == pytest.approx(0.3, abs=1e-3)
    assert art.meta["sparsity"]["layers"][0]["query"] == 0.0


def _zero_by_hand(w: np.ndarray, pattern: str) -> np.ndarray:
    """The magnitude masks, computed independently of compress.prune."""
    w = w.copy()
    if pattern == "unstructured":
        w.reshape(-1)[np.argsort(np.abs(w).reshape(-1), kind="stable")[:round(0.5 * w.size)]] = 0
        return w
    for row in w:
        for g in range(0, row.size, 4):
            group = row[g:g + 4]
            group[np.argsort(np.abs(group))[:2]] = 0
    return w


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masked_forward_equals_the_dense_model_with_those_weights_zeroed(tiny_teacher, tmp_path, pattern):
    src = teacher_artifact(tiny_teacher)
    cfg = PruneConfig(heads=0, ffn=0, recover_steps=0, batch_size=16, max_length=32,
                      sparsity=SparsityConfig(pattern=pattern, amount=0.5))
    pruned = load_hf_encoder(prune(src, cfg, _ctx(tmp_path / "p", src)).path)
    dense = load_hf_encoder(tiny_teacher)
    by_hand = load_hf_encoder(tiny_teacher)
    with torch.no_grad():
        for layer in by_hand.encoder.layer:
            for linear in layer_linears(layer).values():
                linear.weight.copy_(torch.from_numpy(_zero_by_hand(linear.weight.numpy(), pattern)))
    assert torch.allclose(_embed(pruned), _embed(by_hand), atol=1e-6)
    assert not torch.allclose(_embed(pruned), _embed(dense), atol=1e-3)


def test_report_states_sparsity_per_layer_and_where_it_speeds_up(tiny_teacher):
    from compress import report as rep
    from compress.prune import sparsify, sparsity_stats

    model = load_hf_encoder(tiny_teacher)
    cfg = SparsityConfig(pattern="2:4")
    sparsify(model, cfg)
    quality = {"metrics": {"pairs": 0.5}, "retention": {"pairs": 0.9}, "fidelity": {"cosine": 0.9, "top10_agreement": 0.5}}
    stages = [{"stage": "prune", "kind": "torch", "cached": False, "meta": {"sparsity": sparsity_stats(model, cfg)},
               "quality": quality}]
    report = {"target": "cpu", "task": "embedding", "bench": None, "stages": stages,
              "teacher": {"source": "hf:t", "params": 1, "kind": "torch", "metrics": {"pairs": 0.55}},
              "final": {"params": 1, "model_sha256": "0"},
              "summary": {"int8_flop_share": None, "sparsity": rep._sparsity_summary(stages)},
              "gates": {"retention": None, "fidelity": None, "passed": True, "failed": []}}
    assert report["summary"]["sparsity"]["zero_share"] == 0.5
    md = rep.markdown(report)
    assert "## Sparsity" in md and "Pattern 2:4" in md
    assert "TensorRT on Ampere/Orin" in md and "ONNX Runtime on CPU" in md and "no speedup" in md
    assert "| layer | query | key | value | attention_output | ffn_in | ffn_out |" in md
    assert "| 3 | " + " | ".join(["50.0%"] * 6) + " |" in md  # the last of the 4 layers, all six Linears
