"""LLM-free behaviour checks from the validation checklist: edge-case inputs and length consistency.

No judge model: every check is a rule on the answer.

- **Edge-case inputs** (``check.empty``, ``check.whitespace``, ``check.very_long``, ``check.non_english``,
  ``check.garbage``): the task's system message (if any) with an empty, whitespace-only, very long (about
  the context minus the answer budget), non-English or garbage user message. Each answer passes when it is
  non-empty, ends before ``max_new_tokens`` (finish reason "stop") and, when the task answers in JSON,
  parses as a JSON object. A request the engine rejects fails with the error as its reason.
- **Length consistency** (``check.length_consistency``): up to 8 of the data's prompts again with filler
  text appended (about twice as long); passes when the answer is at most 1.5x as long as the answer to the
  original prompt (plus 16 characters of slack) and still ends before ``max_new_tokens``.

``checks`` is the pass rate over all of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slmops.engines.base import GenerationRequest, GenerationResult
from slmops.evaluate.metrics import json_valid

NON_ENGLISH = [
    "Guten Tag, ich möchte meine Bestellung #48213 stornieren, bitte. Danke!",
    "こんにちは、注文番号 #55120 の配送先住所を変更したいです。",
    "مرحبا، أريد إرجاع المنتج الذي طلبته الأسبوع الماضي.",
]
FILLER = " (Sent from my phone, sorry for any typos. Thanks a lot in advance for your help!)"
LENGTH_PAIRS = 8
LENGTH_RATIO = 1.5
LENGTH_SLACK = 16


@dataclass
class CheckCase:
    check: str
    messages: list[dict[str, str]]
    baseline_answer: str | None = None  # length consistency: the answer to the unpadded prompt
    baseline_finish: str | None = None


def _garbage(seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789!@#$%^&*()_+-=[]{};:'\",.<>/?\\|`~ \t"
    noise = "".join(rng.choice(alphabet) for _ in range(120))
    return [noise, "<script>alert(1)</script> {{ }} ]]> \x00\x7f 🙃🙃🙃 DROP TABLE orders;--"]


def _with_user(system: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    return [*system, {"role": "user", "content": text}]


def _long_text(base: str, fits: Callable[[str], bool], max_repeats: int = 400) -> str:
    """`base` repeated as often as `fits` allows (at least once)."""
    text = base
    for _ in range(max_repeats):
        longer = text + " " + base
        if not fits(longer):
            break
        text = longer
    return text


def build_cases(prompts: list[list[dict[str, str]]], answers: list[GenerationResult | None], *, seed: int = 0,
                fits: Callable[[str], bool] | None = None) -> list[CheckCase]:
    """The check prompts for a task whose prompts are `prompts` (with the model's `answers` to them).
    `fits(user_text)`: whether a user message that long still leaves room for the answer (None: ~1500
    characters)."""
    system = [m for m in (prompts[0] if prompts else []) if m["role"] == "system"][:1]
    base = next((m["content"] for p in prompts for m in reversed(p) if m["role"] == "user" and m["content"].strip()),
                "Hello, I have a question about my order.")
    fits = fits or (lambda text: len(text) <= 1500)
    cases = [CheckCase("empty", _with_user(system, "")), CheckCase("whitespace", _with_user(system, "   \n\t  "))]
    cases.append(CheckCase("very_long", _with_user(system, _long_text(base, fits))))
    cases += [CheckCase("non_english", _with_user(system, t)) for t in NON_ENGLISH]
    cases += [CheckCase("garbage", _with_user(system, t)) for t in _garbage(seed)]
    step = max(1, len(prompts) // LENGTH_PAIRS)
    for i in range(0, len(prompts), step)[:LENGTH_PAIRS]:
        msgs, ans = prompts[i], answers[i] if i < len(answers) else None
        if not msgs or msgs[-1]["role"] != "user" or ans is None:
            continue
        padded = msgs[-1]["content"] + FILLER * max(1, len(msgs[-1]["content"]) // len(FILLER))
        if not fits(padded):
            continue
        cases.append(CheckCase("length_consistency", [*msgs[:-1], {"role": "user", "content": padded}],
                               baseline_answer=ans.text, baseline_finish=ans.finish_reason))
    return cases


def judge(case: CheckCase, result: GenerationResult | Exception, *, json_task: bool) -> dict[str, Any]:
    """One per-example check row: check, prompt, prediction, passed, reason."""
    text_in = case.messages[-1]["content"]
    row: dict[str, Any] = {"kind": "check", "check": case.check, "prompt": text_in[:500], "prompt_chars": len(text_in)}
    if isinstance(result, Exception):
        return {**row, "prediction": None, "passed": False, "reason": f"the engine failed: {result}".splitlines()[0]}
    text = result.text
    problems = []
    if not text.strip():
        problems.append("empty answer")
    if result.finish_reason == "length":
        problems.append(f"no end within max tokens ({result.completion_tokens} tokens)")
    if json_task and text.strip() and not json_valid(text):
        problems.append("not a JSON object")
    if case.check == "length_consistency" and case.baseline_answer is not None:
        limit = LENGTH_RATIO * len(case.baseline_answer) + LENGTH_SLACK
        row["baseline_prediction"] = case.baseline_answer
        if len(text) > limit:
            problems.append(f"answer grew from {len(case.baseline_answer)} to {len(text)} characters "
                            f"with a longer prompt (limit {limit:.0f})")
        problems = [p for p in problems if p != "not a JSON object" or json_valid(case.baseline_answer)]
    return {**row, "prediction": text, "finish_reason": result.finish_reason, "passed": not problems,
            "reason": "; ".join(problems) or "ok"}


def run_checks(generate: Callable[[list[GenerationRequest]], list[GenerationResult | Exception]],
               prompts: list[list[dict[str, str]]], answers: list[GenerationResult | None], *, json_task: bool,
               max_new_tokens: int, seed: int = 0, fits: Callable[[str], bool] | None = None,
               raw: Callable[[list[dict[str, str]]], str] | None = None) -> list[dict[str, Any]]:
    """Build the cases, generate (greedy) through `generate` and judge them. `raw`: turn messages into a raw
    prompt (for a model without a chat template)."""
    cases = build_cases(prompts, answers, seed=seed, fits=fits)

    def request(msgs: list[dict[str, str]]) -> GenerationRequest:
        if raw is not None:
            return GenerationRequest(prompt=raw(msgs) or " ", max_new_tokens=max_new_tokens)
        return GenerationRequest(messages=msgs, max_new_tokens=max_new_tokens)

    results = generate([request(c.messages) for c in cases])
    return [judge(c, r, json_task=json_task) for c, r in zip(cases, results, strict=True)]


__all__ = ["CheckCase", "build_cases", "judge", "run_checks"]
