"""Causal-LM distillation on a tiny GPT-2 teacher trained here on sentences
from a small grammar (number agreement between subject and verb), with a
word-level tokenizer, so every model has a vocabulary of 35 tokens."""

import copy
import random

import numpy as np
import pytest
import torch

from compress.errors import RecipeError, SourceError
from compress.lm_distill import derive_student, export_causal_lm, sample_continuations, train
from compress.lm_eval import generated_agreement, next_token_agreement, perplexity, retention
from compress.recipe import LmDistillConfig

SG_N = "cat dog bird fish king girl".split()
PL_N = "cats dogs birds fishes kings girls".split()
ADJ = "big small red old quiet bright".split()
SG_V = "sees likes chases finds".split()
PL_V = "see like chase find".split()
ADV = "today again slowly".split()


def noun_phrase(rng):
    plural = rng.random() < 0.5
    adj = [rng.choice(ADJ)] if rng.random() < 0.5 else []
    return ["the", *adj, rng.choice(PL_N if plural else SG_N)], plural


def sentence(rng):
    subject, plural = noun_phrase(rng)
    obj, _ = noun_phrase(rng)
    words = subject + [rng.choice(PL_V if plural else SG_V)] + obj
    if rng.random() < 0.3:
        words.append(rng.choice(ADV))
    return words + ["."]


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(w for _ in range(rng.randint(2, 4)) for w in sentence(rng)) for _ in range(n)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    words = sorted(set(SG_N + PL_N + ADJ + SG_V + PL_V + ADV + ["the", "."]))
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # a BOS in front, so the first word is predicted too and prompts start alike
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def gpt2(tokenizer, layers: int, width: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=width, n_layer=layers, n_head=4,
                     n_inner=2 * width, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def lm():
    """A 2-block GPT-2 (width 32) trained 120 steps on the grammar: it learns the
    agreement (held-out perplexity about 4.3)."""
    from compress.lm_distill import _pad_right, encode

    # the models are tiny: a second thread costs more in handoffs than it gains
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    train_texts, held = corpus(600, seed=0), corpus(128, seed=1)
    teacher = gpt2(tokenizer, layers=2)
    rows = encode(train_texts, tokenizer, 128)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    rng = random.Random(0)
    teacher.train()
    for _ in range(120):
        ids, mask = _pad_right(rng.sample(rows, 32), tokenizer.pad_token_id)
        loss = teacher(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    yield {"teacher": teacher.eval(), "tokenizer": tokenizer, "train": train_texts, "held": held}
    torch.set_num_threads(threads)


# Texts of 2-4 sentences (about 23 tokens), continuations of 48 tokens: a generating
# student runs into states (long texts, its own slips) that no train text shows,
# which is where on-policy distillation should pay off.
BASE = dict(batch_size=32, lr=3e-3, warmup=0.0, prompt_tokens=8, max_new_tokens=48)
WARM_STEPS, STEPS = 20, 60


@pytest.fixture(scope="module")
def runs(lm):
    """One initial student (teacher block 1 only, briefly logit-distilled, as GKD
    starts from a fine-tuned student), then the same number of steps of
    off-policy logit distillation and of on-policy GKD (lambda 1) from it."""
    teacher, tok, texts = lm["teacher"], lm["tokenizer"], lm["train"]
    raw = derive_student(teacher, [1])
    start = copy.deepcopy(raw)
    warm = train(start, teacher, texts, tok, LmDistillConfig(**BASE, losses=["logit"], max_steps=WARM_STEPS))
    off = copy.deepcopy(start)
    off_stats = train(off, teacher, texts, tok, LmDistillConfig(**BASE, losses=["logit"], max_steps=STEPS))
    on = copy.deepcopy(start)
    on_stats = train(on, teacher, texts, tok, LmDistillConfig(**BASE, losses=["on_policy"], lmbda=1.0, beta=0.9,
                                                              max_steps=STEPS))
    return {"raw": raw, "start": start, "warm": warm, "off": off, "off_stats": off_stats, "on": on,
            "on_stats": on_stats}


def test_derive_student_gpt2_copies_chosen_blocks(lm):
    teacher = lm["teacher"]
    student = derive_student(teacher, [1, 0])  # reordered: block 0 of the teacher becomes block 1
    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    w_t = teacher.transformer.h[0].attn.c_attn.weight
    w_s = student.transformer.h[1].attn.c_attn.weight
    assert torch.equal(w_t, w_s) and w_t.data_ptr() != w_s.data_ptr()  # a copy, not shared
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()  # still tied
    # layer indices are those of the new depth, so generation with a KV cache works
    prompt = torch.tensor([[2, 33, 8]])
    out = student.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                           do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_derive_student_errors_say_what_to_pick(lm):
    with pytest.raises(RecipeError, match=r"0\.\.1"):
        derive_student(lm["teacher"], [0, 2])
    with pytest.raises(RecipeError, match="distinct"):
        derive_student(lm["teacher"], [1, 1])
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(SourceError, match="BertModel is not a causal LM; task causal-lm distils decoder-only"):
        derive_student(bert, [0])


def test_logit_distillation_lowers_its_loss_and_copies_the_teacher(lm, runs):
    teacher, tok, held = lm["teacher"], lm["tokenizer"], lm["held"]
    stats = runs["off_stats"]
    assert stats["steps"] == STEPS and stats["on_policy_steps"] == 0
    assert runs["warm"]["loss_last"] < runs["warm"]["loss_first"]
    assert stats["loss_last"] < stats["loss_first"]
    raw = next_token_agreement(runs["raw"], teacher, held, tok)
    distilled = retention(runs["off"], teacher, held, tok)
    print(f"\nlogit: agreement raw {raw:.3f} -> distilled {distilled['agreement']:.3f}; "
          f"ppl teacher {distilled['ppl_teacher']:.2f}, raw {perplexity(runs['raw'], held, tok):.2f}, "
          f"distilled {distilled['ppl_student']:.2f} (retention {distilled['ppl_retention']:.3f})")
    assert distilled["agreement"] > raw + 0.2
    assert distilled["ppl_retention"] > 0.9
    assert retention(teacher, teacher, held, tok)["agreement"] == 1.0


def test_on_policy_beats_off_policy_on_student_generations(lm, runs):
    teacher, tok, held = lm["teacher"], lm["tokenizer"], lm["held"]
    assert runs["on_stats"]["on_policy_steps"] == STEPS
    # [EOS] never occurs in the texts, so continuations run to full length
    assert runs["on_stats"]["generated_tokens"] > 0.9 * STEPS * 32 * 48
    kw = dict(prompt_tokens=8, max_new_tokens=48)
    rows = {}
    for name in ("start", "off", "on"):
        student = runs[name]
        rows[name] = (generated_agreement(student, teacher, held, tok, **kw),
                      generated_agreement(student, teacher, held, tok, temperature=1.0, **kw),
                      next_token_agreement(student, teacher, held, tok))
    print("\nagreement with the teacher: student-generated greedy / sampled T=1 / teacher-forced")
    for name, (greedy, sampled, forced) in rows.items():
        print(f"  {name:5s} {greedy:.3f} / {sampled:.3f} / {forced:.3f}")
    assert rows["on"][0] > rows["off"][0]
    assert rows["on"][1] > rows["off"][1]
    assert rows["on"][0] > rows["start"][0]


def test_continuations_stop_counting_after_eos(lm):
    teacher, tok = lm["teacher"], lm["tokenizer"]
    period = tok.convert_tokens_to_ids(".")
    prompts = torch.tensor([row[:4] for row in tok(lm["held"][:8])["input_ids"]])
    torch.manual_seed(0)
    # "." as end of sequence: every continuation ends within a sentence
    seqs, keep = sample_continuations(teacher, prompts, 20, pad_id=tok.pad_token_id, eos_id=period)
    new = seqs[:, 4:]
    for row, k in zip(new.tolist(), keep.tolist()):
        first = row.index(period)
        assert k[:first + 1] == [True] * (first + 1)  # the EOS itself counts
        assert not any(k[first + 1:])
    assert (~keep).any()  # some rows ended before others


def test_lmbda_decides_the_share_of_on_policy_batches(lm):
    teacher, tok, texts = lm["teacher"], lm["tokenizer"], lm["train"][:64]
    base = dict(BASE, batch_size=8, max_new_tokens=4, losses=["on_policy"], max_steps=6)
    off = train(derive_student(teacher, [1]), teacher, texts, tok, LmDistillConfig(**base, lmbda=0.0))
    assert off["on_policy_steps"] == 0 and off["generated_tokens"] == 0
    half = train(derive_student(teacher, [1]), teacher, texts, tok, LmDistillConfig(**base, lmbda=0.5))
    assert 0 < half["on_policy_steps"] < 6


def test_on_policy_needs_prompts_shorter_than_texts(lm):
    cfg = LmDistillConfig(losses=["on_policy"], prompt_tokens=500, max_steps=1)
    with pytest.raises(RecipeError, match="lower prompt_tokens"):
        train(derive_student(lm["teacher"], [1]), lm["teacher"], lm["train"][:8], lm["tokenizer"], cfg)


def test_export_causal_lm_matches_torch(lm, tmp_path):
    import onnxruntime as ort

    model = lm["teacher"]
    path = export_causal_lm(model, tmp_path / "lm.onnx", opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    # another batch and sequence length than the export's dummy, with ragged padding
    rs = np.random.RandomState(0)
    ids = rs.randint(4, len(lm["tokenizer"]), size=(3, 21)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert got.shape == (3, 21, len(lm["tokenizer"]))
    real = mask.astype(bool)
    assert np.abs(got[real] - ref[real]).max() < 1e-4


def test_config_fields_are_described_and_checked():
    schema = LmDistillConfig.model_json_schema()
    for field, prop in schema["properties"].items():
        assert prop.get("description"), f"LmDistillConfig.{field} has no description"
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        LmDistillConfig(losses=["feature"])
    with pytest.raises(ValidationError):
        LmDistillConfig(beta=1.5)


def test_hard_labels_add_cross_entropy_to_the_logit_loss(lm):
    teacher, tok, texts = lm["teacher"], lm["tokenizer"], lm["train"][:32]
    base = dict(BASE, batch_size=8, losses=["logit"], max_steps=2, lr=1e-9)
    soft = train(derive_student(teacher, [1]), teacher, texts, tok, LmDistillConfig(**base))
    both = train(derive_student(teacher, [1]), teacher, texts, tok, LmDistillConfig(**base, hard_label_weight=1.0))
    # at the first step the students are identical: the difference is the CE, about ln(ppl) of the raw student
    assert both["history"][0] - soft["history"][0] > 1.0


# -- the teacher-output cache (top-k logits) ----------------------------------------

def loader_of(model, calls: list):
    """A teacher loader that counts its calls, as TeacherSource.load."""
    def load():
        calls.append(1)
        return model
    return load


def test_logit_teacher_outputs_are_written_once_and_reused_without_the_teacher(lm, tmp_path):
    from compress.lm_distill import encode
    from compress.teacher_cache import DIRNAME, TeacherSource

    teacher, tok, texts = lm["teacher"], lm["tokenizer"], lm["train"][:48]
    base = dict(BASE, batch_size=8, losses=["logit"], teacher_topk=8)

    def config(**changes):
        return LmDistillConfig(**{**base, **changes})

    calls = []
    source = TeacherSource(tmp_path, "teacher-digest", load=loader_of(teacher, calls))
    first = train(derive_student(teacher, [1]), None, texts, tok, config(max_steps=6), source=source)
    out = first["teacher_outputs"]
    assert calls == [1] and first["teacher_loaded"]
    assert out["cached"] is False and out["k"] == 8
    assert first["teacher_forwards"] == 2  # 48 texts in groups of teacher_cache.TEACHER_BATCH (32)
    entries = [p.name for p in (tmp_path / DIRNAME).iterdir() if p.name not in ("tmp", "locks")]
    assert entries == [out["key"]]

    # another lr and length: the same entry, no teacher forward, the teacher not even loaded
    calls.clear()
    second = train(derive_student(teacher, [1]), None, texts, tok, config(lr=1e-3, max_steps=9), source=source)
    assert calls == [] and not second["teacher_loaded"] and second["teacher_forwards"] == 0
    assert second["teacher_outputs"]["cached"] is True and second["teacher_outputs"]["key"] == out["key"]
    assert second["loss_last"] < second["loss_first"]

    # disk is bounded by k: fp16 value + int32 id per kept logit, plus offsets and small headers
    positions = sum(len(e) for e in encode(texts, tok, 128))  # the default max_length
    assert positions * 8 * 6 <= out["bytes"] <= positions * 8 * 6 + 2 * 8 * (len(texts) + 1) + 4096

    # k and max_length are part of the key
    third = train(derive_student(teacher, [1]), None, texts, tok, config(max_steps=1, teacher_topk=4, max_length=16),
                  source=source)
    assert third["teacher_outputs"]["key"] != out["key"] and not third["teacher_outputs"]["cached"]
    assert third["teacher_outputs"]["bytes"] < out["bytes"]


def test_a_missing_entry_without_teacher_or_loader_says_what_to_pass(lm, tmp_path):
    from compress.errors import CacheError
    from compress.teacher_cache import TeacherSource

    cfg = LmDistillConfig(**BASE, losses=["logit"], max_steps=1)
    with pytest.raises(CacheError, match="pass the teacher"):
        train(derive_student(lm["teacher"], [1]), None, lm["train"][:8], lm["tokenizer"], cfg,
              source=TeacherSource(tmp_path, "t"))


def test_topk_with_the_whole_vocabulary_gives_the_full_losses(lm):
    from compress.lm_distill import _pad_right, encode
    from compress.losses import generalized_jsd, generalized_jsd_topk, logit_kl, logit_kl_topk
    from compress.teacher_cache import compute_topk

    teacher, tok = lm["teacher"], lm["tokenizer"]
    student = derive_student(teacher, [1])
    rows = encode(lm["train"][:40], tok, 128)
    vocab = len(tok)

    def run(batch):
        ids, mask = _pad_right(batch, tok.pad_token_id)
        with torch.no_grad():
            return teacher(input_ids=ids, attention_mask=mask).logits

    full = compute_topk(None, rows, vocab, run, None, "test")
    assert full.forwards == 2
    batch = [3, 17, 25, 39]  # rows of different lengths: right padding
    ids, mask = _pad_right([rows[i] for i in batch], tok.pad_token_id)
    assert (mask == 0).any()
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask).logits
        t = teacher(input_ids=ids, attention_mask=mask).logits
    cached = full.batch(batch, ids.shape[1])
    for temperature in (1.0, 2.0):
        want = logit_kl(s, t, temperature, mask).item()
        got = logit_kl_topk(s, cached, temperature, mask).item()
        assert want > 0.05 and got == pytest.approx(want, rel=1e-2)
    want = generalized_jsd(s, t, 0.9, 1.0, mask).item()
    assert generalized_jsd_topk(s, cached, 0.9, 1.0, mask).item() == pytest.approx(want, rel=1e-2)
    # a small k sees less of the distribution
    small = compute_topk(None, rows, 2, run, None, "test").batch(batch, ids.shape[1])
    assert logit_kl_topk(s, small, 1.0, mask).item() != pytest.approx(want, rel=1e-2)


def test_on_policy_batches_load_the_teacher_once_with_the_cache_on(lm, tmp_path):
    from compress.teacher_cache import TeacherSource

    teacher, tok, texts = lm["teacher"], lm["tokenizer"], lm["train"][:64]
    cfg = LmDistillConfig(**dict(BASE, batch_size=8, max_new_tokens=4, max_steps=6), losses=["logit", "on_policy"],
                          lmbda=0.5)
    calls = []
    source = TeacherSource(tmp_path, "teacher-digest", load=loader_of(teacher, calls))
    first = train(derive_student(teacher, [1]), None, texts, tok, cfg, source=source)
    assert calls == [1] and 0 < first["on_policy_steps"] < 6
    assert first["teacher_forwards"] == 2 + first["on_policy_steps"]
    calls.clear()
    second = train(derive_student(teacher, [1]), None, texts, tok, cfg, source=source)
    # the entry serves the train texts; only the student's samples need the live teacher, loaded once
    assert calls == [1] and second["teacher_outputs"]["cached"]
    assert second["teacher_forwards"] == second["on_policy_steps"] > 0
    assert second["history"] == pytest.approx(first["history"])


# -- any decoder family ----------------------------------------------------------------
# Tiny configs (3 blocks, width 32) of Hugging Face decoder families, with the
# path of their block list. The first five get the student's whole contract
# below; the others show the block list is found where each family keeps it.
FAMILIES = {
    "llama": ("model.layers", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2)),
    # sliding-window attention in blocks 1 and 2 (config.layer_types): the student's
    # cache and mask must know which of its own blocks slide
    "qwen2": ("model.layers", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)),
    "gpt_neox": ("gpt_neox.layers", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4)),
    "opt": ("model.decoder.layers", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                                         word_embed_proj_dim=32)),
    # local attention in block 2 (config.attention_layers, which GPT-Neo expands from attention_types on load)
    "gpt_neo": ("transformer.h", dict(hidden_size=32, num_layers=3, num_heads=4, window_size=4,
                                      attention_types=[[["global", "global", "local"], 1]])),
    "gpt2": ("transformer.h", dict(n_embd=32, n_layer=3, n_head=4)),
    "mistral": ("model.layers", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2)),
    "qwen3": ("model.layers", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8)),
    "phi": ("model.layers", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)),
    "gemma2": ("model.layers", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, sliding_window=4)),
    "bloom": ("transformer.h", dict(hidden_size=32, n_layer=3, n_head=4)),
    "falcon": ("transformer.h", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4)),
}
DERIVED = ["llama", "qwen2", "gpt_neox", "opt", "gpt_neo"]
KEPT = [2, 0]  # every kept block moves, and their order is reversed
# what a block knows of its kind, which must follow it to its new place
KIND_ATTRIBUTES = ("attention_type", "sliding_window", "is_sliding", "window_size")


def tiny_decoder(family: str, tokenizer, **changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), max_position_embeddings=64,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **{**FAMILIES[family][1], **changes})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def blocks_of(model):
    from compress.lm_distill import _get, blocks_path

    return list(_get(model, blocks_path(model)))


def padded_batch(vocab: int):
    """Random tokens, another batch and length than the export's dummy, ragged right padding."""
    rs = np.random.RandomState(0)
    ids = rs.randint(4, vocab, size=(3, 21)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_the_block_list_is_found_in_each_family(family):
    from compress.lm_distill import blocks_path

    model = tiny_decoder(family, word_tokenizer())
    assert blocks_path(model) == FAMILIES[family][0]


@pytest.fixture(scope="module", params=DERIVED)
def family(request):
    tok = word_tokenizer()
    teacher = tiny_decoder(request.param, tok)
    return {"name": request.param, "teacher": teacher, "student": derive_student(teacher, KEPT), "tokenizer": tok}


def test_a_student_of_each_family_keeps_its_blocks_at_their_new_index(family):
    from compress.lm_distill import per_layer_fields

    teacher, student = family["teacher"], family["student"]
    assert student.config.num_hidden_layers == len(blocks_of(student)) == 2
    lists = per_layer_fields(teacher.config, 3)
    assert lists == {"qwen2": ["layer_types"], "gpt_neo": ["attention_layers"]}.get(family["name"], [])
    for key in lists:
        assert getattr(student.config, key) == [getattr(teacher.config, key)[i] for i in KEPT]
        assert getattr(student.config, key) != getattr(teacher.config, key)[:2]  # sliced, not cut short
    if family["name"] == "gpt_neo":  # what transformers 4 expands attention_layers from on load agrees
        assert student.config.expand_attention_types_params(student.config.attention_types) == \
            student.config.attention_layers
    for new, old in enumerate(KEPT):
        s_block, t_block = blocks_of(student)[new], blocks_of(teacher)[old]
        for (name, s), (_, t) in zip(s_block.named_parameters(), t_block.named_parameters()):
            assert torch.equal(s, t) and s.data_ptr() != t.data_ptr(), name
        # the index the KV cache is addressed by is the block's new one
        indices = {getattr(m, a) for m in s_block.modules() for a in ("layer_idx", "layer_id") if hasattr(m, a)}
        assert indices == {new}
        kinds = [(a, getattr(m, a)) for m in s_block.modules() for a in KIND_ATTRIBUTES if hasattr(m, a)]
        assert kinds == [(a, getattr(m, a)) for m in t_block.modules() for a in KIND_ATTRIBUTES if hasattr(m, a)]


def test_a_student_of_each_family_generates_the_same_with_and_without_kv_cache(family):
    student = family["student"]
    # prompt + continuation (15 tokens) pass the sliding and local windows (4)
    prompt = torch.randint(4, len(family["tokenizer"]), (2, 5), generator=torch.Generator().manual_seed(1))
    runs = [student.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                             do_sample=False, use_cache=cache, pad_token_id=0, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True) for cache in (True, False)]
    cached, uncached = runs
    assert cached.sequences.shape == (2, 15)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.past_key_values is not None and uncached.past_key_values is None
    assert torch.allclose(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-5)


def test_a_student_of_each_family_reloads_with_from_pretrained(family, tmp_path):
    from compress.lm_distill import load_causal_lm, per_layer_fields

    student = family["student"]
    student.save_pretrained(tmp_path)
    reloaded = load_causal_lm(tmp_path)
    for key in ["num_hidden_layers", *per_layer_fields(student.config, 2)]:
        assert getattr(reloaded.config, key) == getattr(student.config, key)
    ids, mask = (torch.from_numpy(a) for a in padded_batch(len(family["tokenizer"])))
    with torch.no_grad():
        want = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = reloaded(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, want)


def test_a_student_of_each_family_exports_to_onnx(family, tmp_path):
    import onnxruntime as ort

    student = family["student"]
    path = export_causal_lm(student, tmp_path / "lm.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = padded_batch(len(family["tokenizer"]))
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        want = student(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       use_cache=False).logits.numpy()
    assert got.shape == want.shape == (3, 21, len(family["tokenizer"]))
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() < 1e-4


def unsupported(case: str):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = word_tokenizer()
    if case == "encoder-decoder":
        return T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_ff=64, num_layers=2, num_heads=4,
                                                   d_kv=8))
    model = tiny_decoder("llama", tok)
    if case == "no block list":
        model.config.num_hidden_layers = 5
    if case == "two block lists":
        model.model.shadow = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
    return model


@pytest.mark.parametrize("case, message", [
    ("encoder-decoder", "T5ForConditionalGeneration is an encoder-decoder; task causal-lm distils decoder-only"),
    ("no block list", "LlamaForCausalLM: cannot tell which nn.ModuleList holds its 5 decoder blocks, found none; "),
    ("two block lists", "LlamaForCausalLM: cannot tell which nn.ModuleList holds its 3 decoder blocks, found 2 such "
                        "lists (model.layers, model.shadow); "),
])
def test_a_model_without_one_block_list_says_what_is_supported(case, message):
    with pytest.raises(SourceError) as exc:
        derive_student(unsupported(case), [0])
    text = str(exc.value)
    assert text.startswith(message) and "\n" not in text
    assert text.endswith("nn.ModuleList of config.num_hidden_layers modules (tested: GPT-2, Llama, Qwen2, GPT-NeoX, OPT)")


def test_lists_of_block_count_inside_the_blocks_are_not_taken_for_them():
    from compress.lm_distill import blocks_path

    model = tiny_decoder("llama", word_tokenizer())
    for block in model.model.layers:  # three experts in each of three blocks
        block.mlp.experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
    assert blocks_path(model) == "model.layers"


def test_a_per_layer_list_that_would_not_reload_is_an_error():
    from transformers import PretrainedConfig

    from compress.lm_distill import student_config

    class Derived(PretrainedConfig):
        """Expands its per-layer kinds from a repeated pattern on load, as GPT-Neo's
        config does in transformers 4 (compress rewrites GPT-Neo's pattern, not this one's)."""
        model_type = "derived"

        def __init__(self, num_hidden_layers=3, pattern=("local", "full"), **kwargs):
            super().__init__(**kwargs)
            self.num_hidden_layers = num_hidden_layers
            self.pattern = list(pattern)
            self.layer_kinds = [pattern[i % len(pattern)] for i in range(num_hidden_layers)]

    config = student_config(Derived(), [0, 1])  # a prefix reloads as it was
    assert (config.num_hidden_layers, config.layer_kinds) == (2, ["local", "full"])
    with pytest.raises(SourceError, match=r"^derived: the student's config\.layer_kinds \['local', 'local'\] reloads "
                                          r"as \['local', 'full'\], so a student of layers \[2, 0\] would "
                                          r"not survive from_pretrained; task causal-lm distils"):
        student_config(Derived(), KEPT)


def test_blocks_that_differ_by_index_beyond_the_config_lists_are_an_error():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    # block 1 is dense, blocks 0 and 2 mixtures of experts (mlp_only_layers lists indices, not one entry per block)
    teacher = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                                 moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                                 num_experts=3, num_experts_per_tok=2, num_hidden_layers=3,
                                                 num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[1]))
    with pytest.raises(SourceError, match=r"^Qwen2MoeForCausalLM: the student's model\.layers\.1\.mlp\.gate_proj"
                                          r"\.weight \(64, 32\) would come from the teacher's model\.layers\.0\.mlp"
                                          r"\.gate_proj\.weight, which does not exist; this family's blocks differ"):
        derive_student(teacher, KEPT)
    assert derive_student(teacher, [0, 1]).config.num_hidden_layers == 2  # each block kept at its kind's place


def test_a_family_the_exporter_cannot_trace_is_one_line(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    from compress.errors import StageError

    # a mixture of experts: the blocks derive (the experts are tensors, not a module list), the routing does not export
    teacher = MixtralForCausalLM(MixtralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                               num_experts_per_tok=2, max_position_embeddings=64)).eval()
    student = derive_student(teacher, KEPT)
    with pytest.raises(StageError) as exc:
        export_causal_lm(student, tmp_path / "lm.onnx")
    text = str(exc.value)
    assert text.startswith("export: MixtralForCausalLM does not export to ONNX opset 17: ") and "\n" not in text
    assert text.endswith("or a teacher of a tested family (GPT-2, Llama, Qwen2, GPT-NeoX, OPT)")
