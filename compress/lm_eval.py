"""Retention metrics of a causal-LM student against its teacher, on held-out texts.

- next-token agreement: the share of positions where argmax student == argmax
  teacher (the teacher agrees with itself: 1.0, so this is the retention);
  teacher-forced on held-out texts, or on-policy, on continuations the student
  generates from held-out prompts (what a deployed student actually sees);
- perplexity on held-out texts; retention = ppl_teacher / ppl_student.

The build scores every artifact (torch student, exported ONNX, quantized ONNX,
target build) with the same `evaluate`, through a runner that gives logits
(`open_lm`), so each stage's retention is measured as its runtime runs it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from compress.errors import SourceError

TOPK = 16  # fidelity: the tokens of each held-out position's distribution that are kept
LOWER_IS_BETTER = "/perplexity"  # metric names ending so: retention = teacher / artifact
LOGITS_BUDGET = 1 << 24  # logits (floats) one eval batch may hold: batch x sequence x vocabulary


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


# -- the build's eval: any artifact, through a logits runner -------------------

class LmRunner:
    """texts -> next-token logits of a causal LM, batched by length with right
    padding (a causal model's real positions never attend to the padding)."""

    def __init__(self, tokenizer, max_length: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = vocab_size

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def batches(self, rows: list[list[int]]):
        """(row indices, ids, mask) in length order, each batch within LOGITS_BUDGET."""
        from compress.lm_distill import pad_id_of

        pad = pad_id_of(self.tokenizer)
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < 32 and \
                    (end - start + 1) * len(rows[order[end]]) * self.vocab_size <= LOGITS_BUDGET:
                end += 1
            idx = order[start:end]
            width = max(len(rows[i]) for i in idx)
            ids = np.full((len(idx), width), pad, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for j, i in enumerate(idx):
                ids[j, :len(rows[i])] = rows[i]
                mask[j, :len(rows[i])] = 1
            yield idx, ids, mask
            start = end

    def embed(self, texts) -> np.ndarray:
        """Logits at every real position of `texts`, stacked [positions, vocab]
        (export validation compares these between torch and ONNX)."""
        from compress.lm_distill import encode

        rows = encode(list(texts), self.tokenizer, self.max_length)
        out = []
        for idx, ids, mask in self.batches(rows):
            logits = self._run(ids, mask)
            out += [logits[j, :len(rows[i])] for j, i in enumerate(idx)]
        return np.concatenate(out).astype(np.float32)


class TorchLm(LmRunner):
    def __init__(self, path: Path, max_length: int, model=None):
        import torch

        from compress.encoders import load_tokenizer
        from compress.lm_distill import load_causal_lm

        self.model = model if model is not None else load_causal_lm(path)
        super().__init__(load_tokenizer(path), max_length, self.model.config.vocab_size)
        self._torch = torch

    def _run(self, input_ids, attention_mask):
        torch = self._torch
        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                              use_cache=False).logits.float().numpy()


class OnnxLm(LmRunner):
    def __init__(self, model: Path, tokenizer_dir: Path, max_length: int, threads: int = 2,
                 session_options: dict | None = None):
        from compress.encoders import eval_session, load_tokenizer

        self.session = eval_session(model, threads, session_options)
        self.inputs = [i.name for i in self.session.get_inputs()]
        vocab = self.session.get_outputs()[0].shape[-1]
        super().__init__(load_tokenizer(tokenizer_dir), max_length, vocab if isinstance(vocab, int) else 50257)

    def _run(self, input_ids, attention_mask):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.session.run(["logits"], {k: feed[k] for k in self.inputs})[0]


def open_lm(art, max_length: int, threads: int = 2) -> LmRunner:
    if art.kind == "torch":
        return TorchLm(art.path, max_length)
    if art.kind == "onnx":
        return OnnxLm(art.model_file, art.path, max_length, threads, art.meta.get("session_options"))
    raise ValueError(f"no causal-LM runner for artifact kind {art.kind}")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def score(runner: LmRunner, texts, topk: int = 0) -> dict:
    """Over every predicted token of `texts` (position t predicts token t+1), in a
    fixed order: the summed negative log-likelihood, the count, the argmax token
    per position and, with topk, each position's top tokens and their probabilities."""
    from compress.lm_distill import encode

    rows = [r for r in encode(list(texts), runner.tokenizer, runner.max_length) if len(r) >= 2]
    if not rows:
        raise SourceError(f"causal-lm eval: none of {len(texts)} texts has 2 tokens or more; a next token is "
                          "predicted only after a first one: give longer texts")
    nll, count, argmax, top_ids, top_probs = 0.0, 0, [], [], []
    for idx, ids, mask in runner.batches(rows):
        logp = _log_softmax(runner._run(ids, mask)[:, :-1].astype(np.float64))
        keep = mask[:, 1:].astype(bool)
        target = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        nll -= float(target[keep].sum())
        count += int(keep.sum())
        real = logp[keep]  # [positions, vocab], row by row in batch order
        argmax.append(real.argmax(-1).astype(np.int32))
        if topk:
            k = min(topk, real.shape[-1])
            ids_k = np.argsort(-real, axis=-1, kind="stable")[:, :k]
            top_ids.append(ids_k.astype(np.int32))
            top_probs.append(np.exp(np.take_along_axis(real, ids_k, -1)).astype(np.float32))
    out = {"nll": nll, "count": count, "argmax": np.concatenate(argmax)}
    if topk:
        out.update(topk_ids=np.concatenate(top_ids), topk_probs=np.concatenate(top_probs))
    return out


def evaluate(runner: LmRunner, eval_sets: list, heldout: list[str], reference: dict | None = None):
    """(metrics, outputs) of one artifact: `<set>/agreement` (share of predicted
    positions whose argmax token is the reference's: the teacher's outputs, or
    this artifact's own, so the teacher scores 1.0) and `<set>/perplexity`, for
    the held-out split and each eval set of texts. outputs holds each set's
    argmax tokens and the held-out top-TOPK distributions (for fidelity)."""
    metrics, outputs = {}, {}
    for name, texts in [("heldout", heldout), *((s.name, s.texts) for s in eval_sets)]:
        scored = score(runner, texts, TOPK if name == "heldout" else 0)
        ref = scored["argmax"] if reference is None else reference[f"{name}/argmax"]
        assert ref.shape == scored["argmax"].shape, "student and teacher scored different positions"
        metrics[f"{name}/agreement"] = float((scored["argmax"] == ref).mean())
        metrics[f"{name}{LOWER_IS_BETTER}"] = math.exp(scored["nll"] / scored["count"])
        outputs[f"{name}/argmax"] = scored["argmax"]
        if name == "heldout":
            outputs["heldout/topk_ids"], outputs["heldout/topk_probs"] = scored["topk_ids"], scored["topk_probs"]
    return metrics, outputs


def fidelity(student: dict, teacher: dict, chunk: int = 4096) -> dict[str, float]:
    """On the held-out positions: agreement = share where the argmax next tokens
    agree; cosine = mean cosine between the two next-token distributions, each
    kept to its top TOPK tokens (the key gates.fidelity and quantize mode auto read)."""
    agreement = float((student["heldout/argmax"] == teacher["heldout/argmax"]).mean())
    s_ids, s_p = student["heldout/topk_ids"], student["heldout/topk_probs"].astype(np.float64)
    t_ids, t_p = teacher["heldout/topk_ids"], teacher["heldout/topk_probs"].astype(np.float64)
    cos = []
    for i in range(0, len(s_ids), chunk):
        same = s_ids[i:i + chunk, :, None] == t_ids[i:i + chunk, None, :]
        dot = (same * s_p[i:i + chunk, :, None] * t_p[i:i + chunk, None, :]).sum((1, 2))
        norm = np.linalg.norm(s_p[i:i + chunk], axis=1) * np.linalg.norm(t_p[i:i + chunk], axis=1)
        cos.append(dot / np.maximum(norm, 1e-12))
    return {"cosine": float(np.concatenate(cos).mean()), "agreement": agreement}
