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


def test_derive_student_llama_family():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=64)).eval()
    student = derive_student(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert student(input_ids=ids).logits.shape == (2, 7, 40)
    out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
    assert out.shape == (2, 11)


def test_derive_student_errors_say_what_to_pick(lm):
    with pytest.raises(RecipeError, match=r"0\.\.1"):
        derive_student(lm["teacher"], [0, 2])
    with pytest.raises(RecipeError, match="distinct"):
        derive_student(lm["teacher"], [1, 1])
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    with pytest.raises(SourceError, match="transformer.h"):
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
