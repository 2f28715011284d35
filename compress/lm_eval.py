"""Retention metrics of a causal-LM student against its teacher, on held-out texts.

- next-token agreement: the share of positions where argmax student == argmax
  teacher (the teacher agrees with itself: 1.0, so this is the retention);
  teacher-forced on held-out texts, or on-policy, on continuations the student
  generates from held-out prompts (what a deployed student actually sees);
- perplexity on held-out texts; retention = ppl_teacher / ppl_student.
"""

from __future__ import annotations

import math


def _batched(rows: list[list[int]], batch_size: int):
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    for i in range(0, len(order), batch_size):
        yield [rows[j] for j in order[i:i + batch_size]]


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def next_token_agreement(student, teacher, texts: list[str], tokenizer, max_length: int = 128,
                         batch_size: int = 32) -> float:
    """Teacher-forced: share of predicting positions of `texts` where both pick the same next token."""
    import torch

    from compress.lm_distill import _pad_right, encode, pad_id_of

    same = count = 0
    rows = [e for e in encode(texts, tokenizer, max_length) if len(e) >= 2]
    with torch.inference_mode():
        for batch in _batched(rows, batch_size):
            ids, mask = _pad_right(batch, pad_id_of(tokenizer))
            keep = (mask[:, 1:] == 1)
            s = _logits(student.eval(), ids, mask)[:, :-1].argmax(-1)
            t = _logits(teacher.eval(), ids, mask)[:, :-1].argmax(-1)
            same += int(((s == t) & keep).sum())
            count += int(keep.sum())
    return same / max(count, 1)


def generated_agreement(student, teacher, texts: list[str], tokenizer, prompt_tokens: int = 16,
                        max_new_tokens: int = 32, temperature: float = 0.0, batch_size: int = 32,
                        seed: int = 0) -> float:
    """On-policy: the student continues the first `prompt_tokens` tokens of each
    held-out text (greedy by default); the share of generated positions where
    the teacher's argmax next token equals the student's."""
    import torch

    from compress.lm_distill import encode, pad_id_of, sample_continuations

    prompts = [e[:prompt_tokens] for e in encode(texts, tokenizer, prompt_tokens + 1) if len(e) > prompt_tokens]
    torch.manual_seed(seed)
    same = count = 0
    for i in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[i:i + batch_size])
        seqs, keep = sample_continuations(student, batch, max_new_tokens, temperature,
                                          pad_id=pad_id_of(tokenizer), eos_id=tokenizer.eos_token_id)
        ones = torch.ones_like(seqs)
        start = batch.shape[1]
        with torch.inference_mode():
            s = _logits(student.eval(), seqs, ones)[:, start - 1:-1].argmax(-1)
            t = _logits(teacher.eval(), seqs, ones)[:, start - 1:-1].argmax(-1)
        same += int(((s == t) & keep).sum())
        count += int(keep.sum())
    return same / max(count, 1)


def perplexity(model, texts: list[str], tokenizer, max_length: int = 128, batch_size: int = 32) -> float:
    """exp(mean next-token negative log-likelihood) over the predicted tokens of `texts`."""
    import torch

    from compress.lm_distill import _pad_right, encode, pad_id_of

    nll = count = 0.0
    rows = [e for e in encode(texts, tokenizer, max_length) if len(e) >= 2]
    with torch.inference_mode():
        for batch in _batched(rows, batch_size):
            ids, mask = _pad_right(batch, pad_id_of(tokenizer))
            logp = torch.log_softmax(_logits(model.eval(), ids, mask)[:, :-1].float(), -1)
            tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            keep = mask[:, 1:].bool()
            nll -= float(tok[keep].sum())
            count += int(keep.sum())
    return math.exp(nll / max(count, 1))


def retention(student, teacher, texts: list[str], tokenizer, max_length: int = 128) -> dict[str, float]:
    """Agreement (teacher = 1.0) and perplexity retention ppl_teacher / ppl_student."""
    ppl_s = perplexity(student, texts, tokenizer, max_length)
    ppl_t = perplexity(teacher, texts, tokenizer, max_length)
    return {"agreement": next_token_agreement(student, teacher, texts, tokenizer, max_length),
            "ppl_student": ppl_s, "ppl_teacher": ppl_t, "ppl_retention": ppl_t / ppl_s}
