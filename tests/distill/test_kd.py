"""The KD loss against values computed by hand on a tiny case, and the loss mixing."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from slmops.distill.kd import kd_loss, mix_losses, token_divergence  # noqa: E402

# one sequence, 3 positions, vocab 4; labels -100 at position 0 only, so after the causal shift the logits at
# positions 0 and 1 are compared (position 2 predicts past the end)
STUDENT = [[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]
TEACHER = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [9.0, 0.0, 0.0, 0.0]]
LABELS = [-100, 1, 2]
T = 2.0


def softmax(xs: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def tensors():
    return torch.tensor([STUDENT]), torch.tensor([TEACHER]), torch.tensor([LABELS])


def test_forward_kl_matches_hand_value():
    # position 0: q = softmax([.5, 0, 0, 0]), p uniform: KL = ln .25 - .25 * sum(ln q)
    z0 = math.exp(0.5) + 3
    pos0 = math.log(0.25) - 0.25 * (0.5 - 4 * math.log(z0))
    # position 1: p and q are the same shape at different ids: KL = (e - 1) / (e + 3)
    pos1 = (math.e - 1) / (math.e + 3)
    expected = (pos0 + pos1) / 2
    assert expected == pytest.approx(0.162894, abs=1e-6)  # (0.025302 + 0.300485) / 2, worked out on paper
    s, t, lab = tensors()
    assert kd_loss(s, t, lab, temperature=T).item() == pytest.approx(expected, abs=1e-6)
    assert kd_loss(s, t, lab, temperature=T, reduction="sum").item() == pytest.approx(2 * expected, abs=1e-6)
    per_token = kd_loss(s, t, lab, temperature=T, reduction="none")
    assert per_token.tolist() == pytest.approx([pos0, pos1], abs=1e-6)


def test_reverse_and_jsd_match_hand_values():
    s, t, lab = tensors()
    rev, jsd = [], []
    for pos in (0, 1):
        p, q = softmax(TEACHER[pos], T), softmax(STUDENT[pos], T)
        m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
        rev.append(kl(q, p))
        jsd.append(0.5 * kl(p, m) + 0.5 * kl(q, m))
    assert kd_loss(s, t, lab, T, kind="reverse").item() == pytest.approx(sum(rev) / 2, abs=1e-6)
    assert kd_loss(s, t, lab, T, kind="jsd").item() == pytest.approx(sum(jsd) / 2, abs=1e-6)
    assert 0 < sum(jsd) / 2 < math.log(2)


def test_identical_distributions_give_zero_and_gradient_flows():
    s = torch.tensor([STUDENT], requires_grad=True)
    _, _, lab = tensors()
    assert kd_loss(s, s.detach().clone(), lab, T).item() == pytest.approx(0.0, abs=1e-7)
    loss = kd_loss(s, torch.tensor([TEACHER]), lab, T)
    loss.backward()
    assert s.grad[0, :2].abs().sum() > 0
    assert s.grad[0, 2].abs().sum() == 0  # the last position is never compared


def test_padded_vocab_compares_the_shared_ids():
    # the teacher has two padding logits beyond the shared vocab: they are ignored, not renormalised into it
    s, t, lab = tensors()
    padded = torch.cat([t, torch.full((1, 3, 2), 50.0)], dim=-1)
    assert kd_loss(s, padded, lab, T).item() == pytest.approx(kd_loss(s, t, lab, T).item(), abs=1e-6)


def test_no_assistant_tokens_is_zero_and_mixing():
    s, t, _ = tensors()
    assert kd_loss(s, t, torch.tensor([[-100, -100, -100]]), T).item() == 0.0
    ce, kd = torch.tensor(3.0), torch.tensor(0.5)
    assert mix_losses(ce, kd, 0.0, T).item() == 3.0
    assert mix_losses(ce, kd, 1.0, T).item() == pytest.approx(0.5 * T * T)
    assert mix_losses(ce, kd, 0.25, T).item() == pytest.approx(0.75 * 3.0 + 0.25 * 4 * 0.5)
    with pytest.raises(ValueError, match="unknown KD loss kind"):
        token_divergence(s[0], t[0], 1.0, kind="tvd")
