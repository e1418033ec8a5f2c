"""Fixtures for rollout tests: a smoke file the tiny model passes, blueprints, bundles, a local index."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from ..support.server import free_port  # noqa: F401  (used by the rollout tests through this module)

SRC = str(Path(__file__).resolve().parents[2] / "src")
PROFILES = ("cpu-avx2-8gb", "cpu-arm-4gb")
SMOKE_TOKENS = 6
PROMPTS = ["Where is my order 1234?", "I want a refund", "hello"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_answers(tiny_model_dir) -> list[str]:
    """What the tiny model answers greedily to PROMPTS (through the same path as the agent's smoke test)."""
    from slmops.engines import open_engine
    from slmops.evaluate.runner import evaluate_engine

    records = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]} for p in PROMPTS]
    engine = open_engine(tiny_model_dir)
    try:
        res = evaluate_engine(engine, records, max_new_tokens=SMOKE_TOKENS)
    finally:
        engine.close()
    return [row["prediction"] for row in res.examples]


def smoke_rows(answers: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(PROMPTS, answers, strict=True)]


def write_blueprint(folder: Path, model: Path, answers: list[str], gate: str = "exact_match>=0.8") -> Path:
    """A blueprint with both PROFILES on the tiny model and a smoke file with `answers` as references."""
    write_jsonl(folder / "smoke.jsonl", smoke_rows(answers))
    profiles = "".join(
        f"  {p}:\n    variant: {{model: {model}, format: hf, precision: fp32, max_context: 256}}\n"
        f"    smoke: {{data: smoke.jsonl, gate: \"{gate}\", max_new_tokens: {SMOKE_TOKENS}}}\n" for p in PROFILES)
    path = folder / "blueprint.yaml"
    path.write_text(f"name: tiny\nprofiles:\n{profiles}", encoding="utf-8")
    return path


def kill_servers(*homes: Path) -> None:
    """Stop the detached `slmops serve` children that agents left running (pid in HOME/serve.pid)."""
    for home in homes:
        try:
            pid = json.loads((Path(home) / "serve.pid").read_text())["pid"]
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
