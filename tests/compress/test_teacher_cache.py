"""The teacher-output cache: reuse without a teacher forward, equality with
fresh teacher outputs, incomplete entries, keys, and the top-k logits store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress import teacher_cache as tc
from compress.distill import distill, train
from compress.encoders import load_tokenizer
from compress.models import derive_student, load_hf_encoder, make_sentence_encoder
from compress.prune import prune
from compress.recipe import DistillConfig, PruneConfig, StudentConfig
from tests.conftest import make_texts
from tests.stage_helpers import context, teacher_artifact

LAYERS = [1, 3]
CFG = DistillConfig(max_steps=2, batch_size=16, max_length=32, lr=1e-3)


class Forwards:
    """Counts teacher forward passes (calls of its embeddings module)."""

    def __init__(self, model):
        self.n = 0
        model.embeddings.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1


def _quiet(total, desc):
    from compress.pipeline import Progress
    return Progress(False, total, desc)


def _train(teacher, tiny_teacher, texts, root, cfg=CFG):
    torch.manual_seed(0)
    student = derive_student(load_hf_encoder(tiny_teacher), LAYERS)
    source = tc.TeacherSource(root, teacher_artifact(tiny_teacher).digest)
    stats = train(student, teacher, LAYERS, texts, load_tokenizer(tiny_teacher), cfg, _quiet, source=source)
    return student, stats


def _outputs(teacher, tiny_teacher, texts, root, cfg=CFG):
    """The teacher pass alone, as train() runs it."""
    from compress.distill import teacher_outputs

    encoded = load_tokenizer(tiny_teacher)(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    source = tc.TeacherSource(root, teacher_artifact(tiny_teacher).digest)
    return teacher_outputs(teacher, LAYERS, encoded, 0, cfg, source, _quiet, "test")


def _entries(root):
    return sorted(p.name for p in (root / tc.DIRNAME).iterdir() if len(p.name) == 32)


def test_second_run_reads_the_cache_and_needs_no_teacher(tiny_teacher, tmp_path):
    texts = make_texts(48)
    teacher = load_hf_encoder(tiny_teacher)
    calls = Forwards(teacher)
    first, s1 = _train(teacher, tiny_teacher, texts, tmp_path)
    assert s1["teacher_forwards"] == calls.n == 2  # 48 inputs, teacher batches of 32
    assert s1["teacher_outputs"]["cached"] is False and s1["teacher_outputs"]["bytes"] > 0

    second, s2 = _train(teacher, tiny_teacher, texts, tmp_path)
    assert calls.n == 2 and s2["teacher_forwards"] == 0 and s2["teacher_outputs"]["cached"] is True

    third, s3 = _train(None, tiny_teacher, texts, tmp_path)  # no teacher model at all
    assert s3["teacher_forwards"] == 0 and s3["steps"] == CFG.max_steps

    in_memory, s4 = _train(teacher, tiny_teacher, texts, None)  # no cache root: this run only
    assert s4["teacher_outputs"]["key"] is None and s4["teacher_forwards"] == 2
    for a, b, c in zip(first.parameters(), third.parameters(), in_memory.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)  # the same targets, so the same student


def test_no_teacher_and_no_entry_is_a_clear_error(tiny_teacher, tmp_path):
    from compress.errors import CacheError

    with pytest.raises(CacheError, match="not cached .* no teacher model was given"):
        _train(None, tiny_teacher, make_texts(20), tmp_path)
    assert not any((tmp_path / tc.DIRNAME).glob("[0-9a-f]*"))  # nothing half-written published


def test_stored_outputs_equal_fresh_teacher_outputs(tiny_teacher, tmp_path):
    from compress.distill import relations

    texts = make_texts(40, seed=3)
    teacher = load_hf_encoder(tiny_teacher)
    cfg = DistillConfig(max_steps=1, batch_size=16, max_length=32, losses=["feature", "attention"], relation_heads=2)
    _outputs(teacher, tiny_teacher, texts, tmp_path, cfg)
    [key] = _entries(tmp_path)
    stored = tc.open_entry(tmp_path / tc.DIRNAME / key)
    assert isinstance(stored.states[0].data, np.memmap) and stored.pooled.dtype == np.float16

    tok = load_tokenizer(tiny_teacher)
    enc = make_sentence_encoder(teacher).eval()
    for i in (0, 17, 39):  # each input alone, unpadded
        ids = torch.tensor([tok(texts[i], truncation=True, max_length=32)["input_ids"]])
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            _, pooled, states = enc.encode(ids, mask)
            rel = relations(teacher.encoder.layer[LAYERS[-1]], states[LAYERS[-1]], mask, 2)
        np.testing.assert_allclose(stored.pooled[i].astype(np.float32), pooled[0].numpy(), rtol=2e-3, atol=2e-3)
        for packed, layer in zip(stored.states, LAYERS):
            np.testing.assert_allclose(packed.row(i).astype(np.float32), states[layer + 1][0].numpy(), rtol=2e-3, atol=2e-3)
        for packed, fresh in zip(stored.relations, rel):
            np.testing.assert_allclose(packed.row(i).astype(np.float32), fresh[0].numpy().reshape(-1), rtol=2e-3, atol=2e-2)

    # a padded batch of the store: rows where the input is, zeros / -1e4 where it is padding
    p, s, r = stored.batch([0, 17], 20)
    n0 = len(stored.states[0].row(0))
    assert s[0].shape == (2, 20, 32) and r[0].shape == (2, 2, 20, 20)
    assert torch.all(s[0][0, n0:] == 0) and torch.all(r[0][0, :, :, n0:] == tc.PAD_LOG)


def test_incomplete_entry_is_ignored_and_recomputed(tiny_teacher, tmp_path):
    texts = make_texts(30)
    teacher = load_hf_encoder(tiny_teacher)
    key = _outputs(teacher, tiny_teacher, texts, tmp_path).key
    entry = tmp_path / tc.DIRNAME / key
    # as a write killed before its marker would leave it (and a stale temporary beside it)
    (entry / "meta.json").unlink()
    np.save(entry / "pooled.npy", np.zeros((1, 1), np.float16))
    stale = tmp_path / tc.DIRNAME / "tmp" / f"{key}.999.1"
    stale.mkdir(parents=True)
    (stale / "states_0.npy").write_bytes(b"partial")

    again = _outputs(teacher, tiny_teacher, texts, tmp_path)
    assert again.forwards > 0 and not again.cached
    assert (entry / "meta.json").is_file() and not stale.exists()
    assert np.load(entry / "pooled.npy").shape == (30, 32)
    third = _outputs(teacher, tiny_teacher, texts, tmp_path)
    assert third.forwards == 0 and third.cached


def test_changed_settings_or_inputs_make_a_new_entry(tiny_teacher, tmp_path):
    teacher = load_hf_encoder(tiny_teacher)
    texts = make_texts(30)
    keys = set()
    for cfg, data in [(CFG, texts),
                      (CFG.model_copy(update={"max_length": 8}), texts),  # truncation changes the inputs
                      (CFG, make_texts(30, seed=5)),
                      (CFG.model_copy(update={"losses": ["feature", "attention"], "relation_heads": 2}), texts)]:
        outputs = _outputs(teacher, tiny_teacher, data, tmp_path, cfg)
        assert not outputs.cached and outputs.forwards > 0
        keys.add(outputs.key)
    assert len(keys) == 4 and len(_entries(tmp_path)) == 4
    # the training batch size is not part of the key: outputs are stored per input
    assert _outputs(teacher, tiny_teacher, texts, tmp_path, CFG.model_copy(update={"batch_size": 5})).cached


def test_prune_recovery_reuses_distill_outputs_without_loading_the_teacher(tiny_teacher, tmp_path, monkeypatch):
    import compress.models as models

    src = teacher_artifact(tiny_teacher)
    texts = make_texts(80)
    ctx = context(tmp_path / "d", texts)
    ctx.cache_root = tmp_path / "cache"
    student = distill(src, DistillConfig(student=StudentConfig(ffn=0), max_steps=2, batch_size=16, max_length=32), ctx)
    assert student.meta["teacher_forwards"] > 0

    loaded = []
    real = models.load_hf_encoder
    monkeypatch.setattr(models, "load_hf_encoder", lambda path: loaded.append(str(path)) or real(path))
    ctx = context(tmp_path / "p", texts)
    ctx.cache_root, ctx.teacher = tmp_path / "cache", src
    pruned = prune(student, PruneConfig(importance="magnitude", recover_steps=2, batch_size=16, max_length=32), ctx)
    assert pruned.meta["recovery"]["teacher_forwards"] == 0
    assert pruned.meta["recovery"]["teacher_outputs"]["key"] == student.meta["teacher_outputs"]["key"]
    assert str(tiny_teacher) not in loaded and loaded == [str(student.path)]


# -- top-k logits ----------------------------------------------------------------

def test_topk_store_roundtrip_and_bound(tmp_path):
    rng = np.random.default_rng(0)
    vocab, k = 50, 4
    rows = [rng.normal(size=(n, vocab)).astype(np.float32) for n in (3, 7, 1)]
    tc.save_topk(tmp_path, rows, k)
    stored = tc.load_topk(tmp_path)
    assert stored.k == k and isinstance(stored.values.data, np.memmap)
    assert stored.values.data.shape == (11, k) and stored.indices.data.dtype == np.int32
    for i, logits in enumerate(rows):
        values, indices = stored.row(i)
        best = np.argsort(-logits, axis=-1)[:, :k]
        np.testing.assert_array_equal(indices, best)
        np.testing.assert_array_equal(values, np.take_along_axis(logits, best, -1).astype(np.float16))
    # disk is bounded by k, not the vocabulary: 2 + 4 bytes per kept logit (+ .npy headers)
    data_bytes = (tmp_path / "logits.values.npy").stat().st_size + (tmp_path / "logits.indices.npy").stat().st_size
    assert 11 * k * 6 <= data_bytes < 11 * k * 6 + 512

    from compress.errors import RecipeError
    with pytest.raises(RecipeError, match="outside 1..50"):
        tc.topk_rows(rows[0], vocab + 1)


def test_ids_digest_separates_rows():
    assert tc.ids_digest([[1, 2], [3]]) != tc.ids_digest([[1], [2, 3]])
    assert tc.ids_digest([[1, 2], [3]]) == tc.ids_digest([[1, 2], [3]])
