import math

import pytest
import torch
import torch.nn.functional as F

from compress.errors import RecipeError, StageError
from compress.losses import (generalized_jsd, generalized_jsd_topk, hard_label_ce, logit_kl, logit_kl_topk,
                             reverse_kl, reverse_kl_topk)


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


P, Q = [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]


def test_kl_is_zero_for_equal_distributions():
    x = torch.randn(2, 5, 7)
    assert logit_kl(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert reverse_kl(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    for beta in (0.0, 0.3, 0.5, 1.0):
        assert generalized_jsd(x, x.clone(), beta).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kl_known_value_and_direction():
    student, teacher = logits_of(Q), logits_of(P)
    assert logit_kl(student, teacher).item() == pytest.approx(kl(P, Q), rel=1e-5)  # KL(teacher || student)
    assert reverse_kl(student, teacher).item() == pytest.approx(kl(Q, P), rel=1e-5)
    assert kl(P, Q) != pytest.approx(kl(Q, P))  # hand-made so that the direction matters


def test_logit_kl_temperature_softens_and_scales_by_t_squared():
    student, teacher = logits_of(Q), logits_of(P)
    t = 2.0
    p_t = torch.softmax(teacher / t, -1).tolist()
    q_t = torch.softmax(student / t, -1).tolist()
    assert logit_kl(student, teacher, temperature=t).item() == pytest.approx(kl(p_t, q_t) * t * t, rel=1e-5)


def test_mask_averages_over_real_positions_only():
    student = torch.stack([logits_of(Q), logits_of(P), torch.tensor([9.0, -9.0, 0.0], dtype=torch.float64)])
    teacher = torch.stack([logits_of(P), logits_of(P), logits_of(P)])
    mask = torch.tensor([1, 1, 0])
    # the third row is far off but masked: the mean is over the two real rows
    assert logit_kl(student, teacher, mask=mask).item() == pytest.approx(kl(P, Q) / 2, rel=1e-5)
    assert logit_kl(student, teacher).item() > logit_kl(student, teacher, mask=mask).item()


def test_generalized_jsd_ends_are_forward_and_reverse_kl():
    s, t = torch.randn(3, 4, 11), torch.randn(3, 4, 11)
    assert generalized_jsd(s, t, beta=0.0).item() == pytest.approx(logit_kl(s, t).item(), rel=1e-5)
    assert generalized_jsd(s, t, beta=1.0).item() == pytest.approx(reverse_kl(s, t).item(), rel=1e-5)


def test_generalized_jsd_tends_to_its_ends():
    # JSD(beta) / beta -> forward KL and JSD(beta) / (1 - beta) -> reverse KL: the
    # special-cased ends continue the formula
    s, t = logits_of(Q), logits_of(P)
    eps = 1e-3
    assert generalized_jsd(s, t, eps).item() / eps == pytest.approx(kl(P, Q), rel=1e-2)
    assert generalized_jsd(s, t, 1 - eps).item() / eps == pytest.approx(kl(Q, P), rel=1e-2)


def test_generalized_jsd_half_is_the_symmetric_js_divergence():
    s, t = logits_of(Q), logits_of(P)
    m = [(a + b) / 2 for a, b in zip(P, Q)]
    expected = 0.5 * kl(P, m) + 0.5 * kl(Q, m)
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(expected, rel=1e-5)
    assert generalized_jsd(t, s, 0.5).item() == pytest.approx(expected, rel=1e-5)
    assert expected <= math.log(2)


def test_generalized_jsd_rejects_beta_outside_unit_interval():
    x = torch.randn(2, 3)
    with pytest.raises(RecipeError, match="beta must be in"):
        generalized_jsd(x, x, beta=1.5)


def test_losses_pass_gradients_to_the_student_only():
    s = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5, requires_grad=True)
    generalized_jsd(s, t.detach(), 0.5).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_hard_label_ce_matches_torch_cross_entropy():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[1, 2, 3, -100], [0, 5, -100, -100]])
    expected = F.cross_entropy(logits.reshape(-1, 6), labels.reshape(-1), ignore_index=-100)
    assert hard_label_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    kept = F.cross_entropy(logits[mask.bool()], labels[mask.bool()], ignore_index=-100)
    assert hard_label_ce(logits, labels, mask).item() == pytest.approx(kept.item(), rel=1e-5)


def test_topk_with_k_equal_vocab_equals_full():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    values, indices = t.topk(9, dim=-1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert logit_kl_topk(s, (values, indices), 2.0, mask).item() == pytest.approx(
        logit_kl(s, t, 2.0, mask).item(), rel=1e-5)
    assert reverse_kl_topk(s, (values, indices)).item() == pytest.approx(reverse_kl(s, t).item(), rel=1e-5)
    for beta in (0.0, 0.5, 0.9, 1.0):
        assert generalized_jsd_topk(s, (values, indices), beta).item() == pytest.approx(
            generalized_jsd(s, t, beta).item(), rel=1e-5)


def test_topk_renormalises_both_over_the_teacher_set():
    s = logits_of([0.1, 0.2, 0.3, 0.4])
    t = logits_of([0.5, 0.3, 0.15, 0.05])
    values, indices = t.topk(2)  # tokens 0 and 1
    p = [0.5 / 0.8, 0.3 / 0.8]
    q = [0.1 / 0.3, 0.2 / 0.3]
    assert logit_kl_topk(s, (values, indices)).item() == pytest.approx(kl(p, q), rel=1e-5)
    assert logit_kl_topk(s, (values, indices)).item() != pytest.approx(logit_kl(s, t).item(), rel=1e-2)


def test_topk_shape_mismatch_says_how_to_fix():
    s = torch.randn(2, 3, 9)
    values, indices = torch.randn(2, 4, 3), torch.zeros(2, 4, 3, dtype=torch.long)
    with pytest.raises(StageError, match="rebuild the teacher-output cache"):
        logit_kl_topk(s, (values, indices))
