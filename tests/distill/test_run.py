"""`slmops distill run`: both stages and the side-by-side comparison, end to end on tiny models."""

from __future__ import annotations

import json

import pytest

from slmops.cli.app import run
from slmops.demo.task import DemoSizes, write_demo_data
from slmops.demo.teacher import BUNDLED_TEACHER_DIR
from slmops.workspace import Workspace


@pytest.fixture()
def demo_files(tmp_path):
    return write_demo_data(tmp_path / "data", seed=2, sizes=DemoSizes(train=8, val=4, test=6, prompts=24, gold=4))


def test_distill_run_both_stages_and_report(tmp_path, demo_files, capsys):
    ws = tmp_path / "ws"
    w = Workspace(ws)
    teacher = w.import_folder(BUNDLED_TEACHER_DIR, "model", "demo-teacher").id
    rc = run(["-q", "-w", str(ws), "distill", "run", "--teacher", teacher, "--prompts", demo_files["prompts"],
              "--test", demo_files["test"], "--out", str(tmp_path / "run"), "--json",
              "--max-steps", "3", "--batch-size", "4", "--student-preset", "tiny-llama"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"teacher", "student"}
    t, s = rows["teacher"], rows["student"]
    assert t["param_ratio"] == 1.0 and t["retention"] == 1.0 and t["decode_speedup"] == 1.0
    assert t["exact_match"] == 1.0 and t["json_valid"] == 1.0  # the bundled teacher on the demo task
    assert s["param_ratio"] < 0.1  # tiny-llama with the teacher's tokenizer
    assert s["parameters"] > 0 and s["peak_rss_mb"] > 0 and s["decode_tok_s"] > 0 and s["n"] == 6
    assert "| student |" in (tmp_path / "run" / "report.md").read_text()
    # lineage: teacher -> synthetic dataset -> student; the student's metrics carry the comparison
    students = [r for r in w.registry.list("model") if r["id"] != teacher]
    assert len(students) == 1
    lineage = w.registry.lineage(students[0]["id"])["ancestors"]
    datasets = [r["id"] for r in w.registry.list("dataset")]
    assert teacher in lineage and datasets and datasets[0] in lineage
    assert "param_ratio" in w.registry.metrics(students[0]["id"])


def test_distill_run_url_teacher_refuses_kd(tmp_path, demo_files, capsys):
    rc = run(["-w", str(tmp_path / "ws"), "distill", "run", "--teacher", "http://127.0.0.1:9/v1",
              "--prompts", demo_files["prompts"], "--out", str(tmp_path / "r"), "--kd-alpha", "0.5"])
    assert rc == 2
    assert "local teacher" in capsys.readouterr().err
