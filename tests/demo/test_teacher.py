"""The teacher training script works, and the bundled teacher meets its bar on the test split."""

from __future__ import annotations

import json

import pytest

from slmops.demo.task import write_demo_data
from slmops.demo.teacher import BUNDLED_TEACHER_DIR, TeacherSettings, train_teacher
from slmops.engines import GenerationRequest, open_engine


def test_train_teacher_short_run_learns_and_saves(tmp_path):
    settings = TeacherSettings(steps=40, batch_size=16, train_examples=600, preset="tiny-llama", warmup_steps=5,
                               lr=3e-3, vocab_size=400)
    record = train_teacher(tmp_path / "t", settings)
    curve = record["loss_curve_every_100"]
    assert record["finite"] and record["parameters"] > 0 and record["wall_time_s"] > 0
    assert record["settings"]["steps"] == 40 and record["tokens_seen"] > 0
    assert curve[0] > record["final_loss"]  # the loss fell
    engine = open_engine(tmp_path / "t")
    res = engine.generate([GenerationRequest(messages=[{"role": "user", "content": "Cancel order ORD-1"}],
                                             max_new_tokens=8)])[0]
    assert res.completion_tokens >= 1
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert "rope_theta" in cfg  # written for older converters


def test_bundled_teacher_is_small_and_recorded():
    files = {p.name: p.stat().st_size for p in BUNDLED_TEACHER_DIR.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "training.json" in files
    assert sum(files.values()) <= 15 * 1024 * 1024
    record = json.loads((BUNDLED_TEACHER_DIR / "training.json").read_text())
    assert record["settings"]["seed"] == 0 and record["wall_time_s"] > 0


@pytest.mark.slow
def test_bundled_teacher_meets_the_bar(tmp_path):
    """At least 95% exact match and 99% valid JSON on the seed-0 test split, greedy."""
    from slmops.data import load_dataset_file
    from slmops.evaluate import evaluate_engine

    paths = write_demo_data(tmp_path, seed=0)
    test = load_dataset_file(paths["test"]).records
    result = evaluate_engine(open_engine(BUNDLED_TEACHER_DIR), test)
    assert result.n == 300
    assert result.scores["exact_match"] >= 0.95, result.scores
    assert result.scores["json_valid"] >= 0.99, result.scores
