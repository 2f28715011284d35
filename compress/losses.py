"""Distillation losses on logits: the Hinton soft-label KL, hard-label cross
entropy, and the divergences of on-policy distillation (GKD: generalized JSD,
reverse KL).

Every function takes logits of shape [..., vocab] (a causal LM's [batch, seq,
vocab] or a classifier's [batch, classes]) and an optional mask of shape [...]
that marks the real positions; the result is the mean over real positions.
The `*_topk` variants take the teacher's top-k logits (values and indices, as a
teacher-output cache stores them) and compare both distributions renormalised
over that top-k set, so with k = vocab they equal the full versions.
"""

from __future__ import annotations


def _masked_mean(per_position, mask):
    """Mean of a [...] tensor over the positions where mask is true."""
    if mask is None:
        return per_position.mean()
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp(min=1.0)


def _kl(p_log, q_log):
    """KL(p || q) over the last axis, from log-probabilities.

    Terms where p is 0 contribute 0 (the xlogy convention), so -inf logits in
    p (masked vocabulary entries) do not turn the sum into NaN."""
    import torch

    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def logit_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None):
    """Hinton et al. 2015: KL(teacher_T || student_T) * T^2, averaged over real positions.

    The T^2 factor keeps the gradient scale independent of the temperature."""
    import torch

    s_log = torch.log_softmax(student_logits.float() / temperature, -1)
    t_log = torch.log_softmax(teacher_logits.float() / temperature, -1)
    return _masked_mean(_kl(t_log, s_log), mask) * temperature ** 2


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None):
    """KL(student_T || teacher_T), averaged over real positions: mode-seeking,
    the student is punished for mass where the teacher has little."""
    import torch

    s_log = torch.log_softmax(student_logits.float() / temperature, -1)
    t_log = torch.log_softmax(teacher_logits.float() / temperature, -1)
    return _masked_mean(_kl(s_log, t_log), mask)


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0, mask=None):
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1):

        M = beta * P_teacher + (1 - beta) * P_student
        JSD(beta) = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)

    beta = 0 is forward KL(teacher || student) and beta = 1 reverse KL(student ||
    teacher), as in TRL's GKDTrainer: the formula itself vanishes at both ends
    (M becomes one of the two), while JSD(beta) / beta tends to the forward KL and
    JSD(beta) / (1 - beta) to the reverse KL, so the ends are their natural limits.
    No T^2 factor, as in GKD (which uses T = 1)."""
    import math

    import torch

    if not 0.0 <= beta <= 1.0:
        from compress.errors import RecipeError
        raise RecipeError(f"generalized_jsd: beta must be in [0, 1], got {beta}; "
                          "use 0 for forward KL, 1 for reverse KL, between for JSD(beta)")
    s_log = torch.log_softmax(student_logits.float() / temperature, -1)
    t_log = torch.log_softmax(teacher_logits.float() / temperature, -1)
    if beta == 0.0:
        per = _kl(t_log, s_log)
    elif beta == 1.0:
        per = _kl(s_log, t_log)
    else:
        # log M by logsumexp: mixing probabilities, not log-probabilities
        m_log = torch.logsumexp(torch.stack([t_log + math.log(beta), s_log + math.log1p(-beta)]), dim=0)
        per = beta * _kl(t_log, m_log) + (1.0 - beta) * _kl(s_log, m_log)
    return _masked_mean(per, mask)


def hard_label_ce(logits, labels, mask=None, ignore_index: int = -100):
    """Cross entropy against integer labels [...], averaged over real positions
    (mask true and label != ignore_index)."""
    import torch

    keep = labels != ignore_index
    if mask is not None:
        keep = keep & mask.bool()
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, keep)


def _restrict(student_logits, teacher_topk):
    values, indices = teacher_topk
    if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1]:
        from compress.errors import StageError
        raise StageError(f"teacher top-k values {tuple(values.shape)} and indices {tuple(indices.shape)} must match "
                         f"the student logits {tuple(student_logits.shape)} in every axis but the last; "
                         "rebuild the teacher-output cache for these inputs")
    return student_logits.gather(-1, indices.long()), values


def logit_kl_topk(student_logits, teacher_topk, temperature: float = 1.0, mask=None):
    """logit_kl over the teacher's top-k set: teacher_topk = (values, indices), each [..., k]."""
    s, t = _restrict(student_logits, teacher_topk)
    return logit_kl(s, t, temperature, mask)


def reverse_kl_topk(student_logits, teacher_topk, temperature: float = 1.0, mask=None):
    """reverse_kl over the teacher's top-k set."""
    s, t = _restrict(student_logits, teacher_topk)
    return reverse_kl(s, t, temperature, mask)


def generalized_jsd_topk(student_logits, teacher_topk, beta: float = 0.5, temperature: float = 1.0, mask=None):
    """generalized_jsd over the teacher's top-k set."""
    s, t = _restrict(student_logits, teacher_topk)
    return generalized_jsd(s, t, beta, temperature, mask)
