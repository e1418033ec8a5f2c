"""Small statistics for benchmarks: percentiles, median and spread, and the interleaved run order."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0..100) with linear interpolation between the closest ranks (numpy's
    default); None for no values."""
    vals = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
    if not vals:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    pos = (len(vals) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def spread(values: Sequence[float]) -> list[float] | None:
    """[p25, p75] (the interquartile range's ends), None for no values."""
    lo, hi = percentile(values, 25), percentile(values, 75)
    return None if lo is None or hi is None else [lo, hi]


def summarize(values: Sequence[float]) -> dict[str, float | list[float] | int | None]:
    """{"median", "spread": [p25, p75], "n"}."""
    return {"median": median(values), "spread": spread(values), "n": len([v for v in values if v is not None])}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Median of a[i] / b[i] over pairs measured back to back (same round, same prompt length).

    With interleaved runs this is the estimator that cancels drift best: a slow spell hits both members
    of a pair, so their ratio stays put even when both medians move."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal lengths, got {len(a)} and {len(b)}")
    return median([x / y for x, y in zip(a, b, strict=True) if x is not None and y is not None and y != 0])


@dataclass(frozen=True)
class Step:
    """One request of the interleaved run: `round` counts warm-up rounds first, then repeats."""

    warmup: bool
    round: int
    repeat: int | None  # 0-based repeat index; None for a warm-up
    prompt_tokens: int
    model: int  # index into the model list


def interleaved_schedule(n_models: int, prompt_tokens: Sequence[int], repeats: int, warmup: int) -> list[Step]:
    """The order every request of a benchmark runs in, in one process.

    Each round runs every prompt length for every model; within a prompt length the models alternate
    A B C, and the order reverses every other round (A B, B A, A B, ...), so slow drift on a noisy machine
    and any "runs second" effect hit every model alike. `warmup` rounds come first and are not measured.
    """
    if n_models < 1 or repeats < 1 or warmup < 0:
        raise ValueError("need at least one model and one repeat, and warmup >= 0")
    steps = []
    for rnd in range(warmup + repeats):
        order = list(range(n_models)) if rnd % 2 == 0 else list(reversed(range(n_models)))
        for n in prompt_tokens:
            for m in order:
                steps.append(Step(warmup=rnd < warmup, round=rnd, repeat=None if rnd < warmup else rnd - warmup,
                                  prompt_tokens=n, model=m))
    return steps
