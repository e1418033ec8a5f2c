"""Acceptance: `slmops bench` on the demo teacher vs a demo-student-shaped model reports the decode
speed-up the distillation benchmark found (benchmarks/results/distill.json, `decode_speedup_torch`).

Speed does not depend on weight values, so the student here has random weights in the `demo-student`
shape with the teacher's tokenizer (exactly how benchmarks/distill.py creates its students before
training); end-of-text is ignored (the default) so both decode the same number of tokens.

The band, [1.8, 4.5] around the benchmark's ~2.8x: decode steps of models this small are dominated by
fixed per-layer costs (kernel dispatch, Python), which is why the speed-up is ~2.8x and not the ~6x of the
parameter ratio, and it moves with the load on a shared 2-core machine by a few tens of percent even with
interleaving and medians. 1.8 still means "clearly the student is much faster, in the benchmark's regime";
4.5 catches a harness that inflates differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.cli.app import run

DISTILL_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "distill.json"
LOW, HIGH = 1.8, 4.5


@pytest.fixture(scope="module")
def random_student(tmp_path_factory) -> Path:
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR
    from slmops.models.create import write_model_folder
    from slmops.models.load import load_tokenizer
    from slmops.models.presets import create_model

    tok = load_tokenizer(str(BUNDLED_TEACHER_DIR))
    model = create_model("demo-student", vocab_size=len(tok), seed=0)
    out = tmp_path_factory.mktemp("student") / "demo-student"
    out.mkdir()
    write_model_folder(model, tok, out)
    return out


@pytest.mark.slow
def test_teacher_vs_student_speedup_matches_distill_benchmark(random_student, tmp_path, capsys):
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR

    found = json.loads(DISTILL_RESULTS.read_text())["decode_speedup_torch"]
    assert LOW < found < HIGH  # the band is around what the distillation benchmark measured

    out = tmp_path / "bench"
    rc = run(["-q", "-w", str(tmp_path / "ws"), "bench", "--model", str(BUNDLED_TEACHER_DIR),
              "--model", str(random_student), "--prompt-tokens", "64", "--max-new-tokens", "48",
              "--repeats", "8", "--warmup", "2", "--no-memory", "--out", str(out)])
    assert rc == 0
    payload = json.loads((out / "bench.json").read_text())
    teacher, student = payload["rows"]
    assert student["parameters"] <= teacher["parameters"] / 4
    ratio = payload["ratios"]["teacher/demo-student"]["decode_tok_s"]  # teacher / student
    speedup = 1 / ratio
    print(f"student decode speed-up {speedup:.2f}x (distill benchmark: {found:.2f}x)")
    assert LOW <= speedup <= HIGH, (speedup, found)
    assert student["by_prompt_tokens"]["64"]["completion_tokens"] == 48  # ran to max_new_tokens
    assert teacher["by_prompt_tokens"]["64"]["completion_tokens"] == 48
