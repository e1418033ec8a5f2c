"""Generate answers through an Engine and score them; measure single-request latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slmops.engines.base import Engine, GenerationRequest
from slmops.evaluate.metrics import score_answers


@dataclass
class EvalResult:
    scores: dict[str, float]
    examples: list[dict[str, Any]]
    n: int
    wall_s: float
    answers_per_s: float
    latency: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = dict(self.scores)
        out.update({f"latency.{k}": v for k, v in self.latency.items()})
        out["answers_per_s"] = self.answers_per_s
        out["n"] = self.n
        return out


def split_prompt_reference(records: list[dict]) -> tuple[list[list[dict]], list[str]]:
    """Chat records -> (prompt messages without the final assistant turn, reference answers)."""
    prompts, refs = [], []
    for rec in records:
        msgs = rec["messages"]
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError("evaluation records must end with an assistant answer")
        prompts.append(msgs[:-1])
        refs.append(msgs[-1]["content"])
    return prompts, refs


def evaluate_engine(
    engine: Engine,
    records: list[dict],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    adapter: str | None = None,
) -> EvalResult:
    """Greedy answers for every record (batched through the engine), scored against the references.
    `adapter`: a named adapter loaded in the engine (None: the engine's default)."""
    prompts, refs = split_prompt_reference(records)
    preds: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = [GenerationRequest(messages=m, max_new_tokens=max_new_tokens, adapter=adapter)
                 for m in prompts[start:start + batch_size]]
        preds += [r.text for r in engine.generate(batch)]
        if progress:
            progress(len(batch))
    wall = time.perf_counter() - t0
    scores, rows = score_answers(preds, refs)
    for row, msgs in zip(rows, prompts, strict=True):
        row["prompt"] = msgs[-1]["content"]
    return EvalResult(scores=scores, examples=rows, n=len(rows), wall_s=wall, answers_per_s=len(rows) / wall)


def measure_latency(engine: Engine, records: list[dict], n: int = 20, max_new_tokens: int = 96,
                    warmup: int = 2) -> dict[str, float]:
    """Unbatched requests, one at a time: median end-to-end latency, time to first token, decode tok/s."""
    prompts, _ = split_prompt_reference(records[: n + warmup])
    lat, ttft, tps, toks = [], [], [], []
    for i, msgs in enumerate(prompts):
        res = engine.generate([GenerationRequest(messages=msgs, max_new_tokens=max_new_tokens)])[0]
        if i < warmup:
            continue
        lat.append(res.latency_s)
        ttft.append(res.ttft_s)
        toks.append(res.completion_tokens)
        if res.decode_tokens_per_s:
            tps.append(res.decode_tokens_per_s)
    return {
        "median_latency_s": statistics.median(lat),
        "median_ttft_s": statistics.median(ttft),
        "median_decode_tok_s": statistics.median(tps) if tps else 0.0,
        "median_completion_tokens": statistics.median(toks),
        "requests": len(lat),
    }


def compare_latency(engines: dict[str, Engine], records: list[dict], n: int = 20, max_new_tokens: int = 96,
                    warmup: int = 2) -> dict[str, dict[str, float]]:
    """Single-request latency for several engines, interleaved A B A B on the same prompts, so drift on
    a noisy machine hits every engine alike. Returns `measure_latency`-style medians per engine."""
    prompts, _ = split_prompt_reference(records[: n + warmup])
    samples: dict[str, dict[str, list[float]]] = {k: {"lat": [], "ttft": [], "tps": [], "toks": []} for k in engines}
    for i, msgs in enumerate(prompts):
        for name, engine in engines.items():
            res = engine.generate([GenerationRequest(messages=msgs, max_new_tokens=max_new_tokens)])[0]
            if i < warmup:
                continue
            s = samples[name]
            s["lat"].append(res.latency_s)
            s["ttft"].append(res.ttft_s)
            s["toks"].append(res.completion_tokens)
            if res.decode_tokens_per_s:
                s["tps"].append(res.decode_tokens_per_s)
    out = {}
    for name, s in samples.items():
        out[name] = {
            "median_latency_s": statistics.median(s["lat"]),
            "median_ttft_s": statistics.median(s["ttft"]),
            "median_decode_tok_s": statistics.median(s["tps"]) if s["tps"] else 0.0,
            "median_completion_tokens": statistics.median(s["toks"]),
            "requests": len(s["lat"]),
        }
    return out
