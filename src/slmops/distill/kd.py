"""Logit-level knowledge distillation: the divergence between teacher and student token distributions.

Both distributions are softened by a temperature T (softmax(logits / T)) and compared at the positions
whose next token is an assistant token (``labels != -100``, shifted one place as for the causal LM
cross entropy: the logits at position i predict ``labels[i + 1]``). When the two models have different
logit widths but the same token -> id mapping (padded vocabularies such as 151936 vs 152064), only the
shared first ``min(V_student, V_teacher)`` ids are compared; the padding rows are never real tokens.

Kinds (p = teacher, q = student, both at temperature T):

- ``forward``: KL(p || q) = sum_v p log(p / q). Mass-covering: the student spreads over every token the
  teacher finds likely. The classic Hinton et al. loss and the default.
- ``reverse``: KL(q || p). Mode-seeking: the student concentrates on the teacher's main modes.
- ``jsd``: the Jensen-Shannon divergence 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2; symmetric and
  bounded by log 2.

The training loss mixes it with the hard-label cross entropy as
``(1 - alpha) * CE + alpha * T**2 * KD`` (:func:`mix_losses`); the T**2 factor keeps the gradient scale of
the soft term independent of the temperature.
"""

from __future__ import annotations

import math
from typing import Literal

KDKind = Literal["forward", "reverse", "jsd"]
KD_KINDS: tuple[str, ...] = ("forward", "reverse", "jsd")
IGNORE_INDEX = -100


def _kl(log_a, log_b):
    """sum_v a (log a - log b) per row, with 0 log 0 = 0 (a = exp(log_a))."""
    import torch

    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return terms.sum(-1)


def token_divergence(student_logits, teacher_logits, temperature: float = 1.0, kind: KDKind = "forward"):
    """Per-row divergence between two (N, V) logit matrices softened by `temperature`; returns shape (N,).

    The logits are compared over the shared first ``min(V_student, V_teacher)`` ids and computed in float32.
    """
    import torch
    import torch.nn.functional as F

    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; choose one of {', '.join(KD_KINDS)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :shared].float() / temperature
    t = teacher_logits[..., :shared].float() / temperature
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    if kind == "forward":
        return _kl(log_p, log_q)
    if kind == "reverse":
        return _kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)


def kd_loss(student_logits, teacher_logits, labels, temperature: float = 1.0, kind: KDKind = "forward",
            reduction: Literal["mean", "sum", "none"] = "mean"):
    """The KD divergence over assistant tokens.

    `student_logits` (B, L, Vs) and `teacher_logits` (B, L, Vt) come from the same input ids; `labels`
    (B, L) holds -100 outside the assistant turns. Positions are shifted as for the causal LM loss: the
    logits at i are compared where ``labels[:, i + 1] != -100``. `reduction`: ``mean`` over the counted
    tokens (0 when there are none, still differentiable), ``sum``, or ``none`` (one value per counted
    token). The T**2 factor is not applied here (see :func:`mix_losses`).
    """
    if student_logits.shape[:2] != teacher_logits.shape[:2] or student_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"shape mismatch: student logits {tuple(student_logits.shape)}, teacher logits "
            f"{tuple(teacher_logits.shape)}, labels {tuple(labels.shape)}"
        )
    mask = labels[:, 1:] != IGNORE_INDEX
    per_token = token_divergence(student_logits[:, :-1][mask], teacher_logits[:, :-1][mask], temperature, kind)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; choose mean, sum or none")
    n = per_token.numel()
    return total / n if n else student_logits.sum() * 0.0


def mix_losses(ce, kd, alpha: float, temperature: float):
    """``(1 - alpha) * ce + alpha * temperature**2 * kd``: alpha 0 is plain SFT, alpha 1 pure KD."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * ce + alpha * (temperature ** 2) * kd
