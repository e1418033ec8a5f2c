"""`slmops eval` end to end: tables and files, manifest metrics and gates for workspace artifacts, exit code
3 for failed gates (also stopping a `set -e` shell script, with a one-line reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.cli.app import run

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture()
def demo_file(tmp_path) -> Path:
    from slmops.demo.task import generate, to_chat_row

    path = tmp_path / "demo.jsonl"
    path.write_text("".join(json.dumps(to_chat_row(ex)) + "\n" for ex in generate(6, seed=7)))
    return path


def test_eval_tiny_model_writes_outputs(tiny_model_dir, demo_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run(["-q", "-w", str(tmp_path / "ws"), "eval", "--model", str(tiny_model_dir), "--data", str(demo_file),
              "--metrics", "exact_match,json_valid", "--metrics", "token_f1", "--max-new-tokens", "8",
              "--resamples", "100", "--out", str(out), "--gate", "exact_match>=0", "--gate", "token_f1<=1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "exact_match" in cap.out and "token_f1" in cap.out and "gate passed: exact_match" in cap.out
    data = json.loads((out / "eval.json").read_text())
    assert data["metrics"] == ["exact_match", "json_valid", "token_f1"] and data["data"] == str(demo_file)
    model = data["models"][0]
    assert {"model", "name", "engine", "format", "precision", "template", "scores", "gates"} <= set(model)
    assert set(model["scores"]["exact_match"]) == {"value", "low", "high", "n"}
    assert [g["passed"] for g in model["gates"]] == [True, True]
    assert (out / "eval.md").exists() and (out / f"examples-{model['name']}.jsonl").exists()


def test_eval_baseline_max_drop_and_yaml_gates(tiny_model_dir, demo_file, tmp_path, capsys):
    gates = tmp_path / "gates.yaml"
    gates.write_text("gates:\n  - {metric: json_valid, min: 0.99}\nmax_drop: {exact_match: 0.0}\n")
    rc = run(["-q", "eval", "-m", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--data", str(demo_file),
              "--max-new-tokens", "8", "--resamples", "0", "--gates", str(gates), "--no-record"])
    err = capsys.readouterr().err
    assert rc == 3
    failed = [line for line in err.splitlines() if "gate failed" in line]
    assert len(failed) == 1 and "json_valid 0.000 < 0.990 (short by 0.990)" in failed[0]
    gates.write_text("gates:\n  - {metric: json_valid, minimum: 0.99}\n")
    assert run(["-q", "eval", "-m", str(tiny_model_dir), "--data", str(demo_file), "--gates", str(gates)]) == 2
    assert f"{gates}:2" in capsys.readouterr().err
    assert run(["-q", "eval", "-m", str(tiny_model_dir), "--data", str(demo_file), "--gate", "exact_match=>1"]) == 2
    assert run(["-q", "eval", "-m", str(tiny_model_dir), "--data", str(demo_file), "--max-drop",
                "exact_match=0.1"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_eval_demo_teacher_artifact_records_metrics_and_gates(demo_file, tmp_path, capsys):
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR
    from slmops.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    art = ws.import_folder(BUNDLED_TEACHER_DIR, "model", name="teacher").id
    assert run(["-w", str(ws.root), "registry", "alias", "prod-candidate", art]) == 0
    rc = run(["-q", "-w", str(ws.root), "eval", "-m", "prod-candidate", "--data", str(demo_file), "--max-new-tokens", "64",
              "--resamples", "200", "--gate", "exact_match>=0.5", "--gate", "field_accuracy>=0.9"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "teacher" in cap.out and "gate passed: exact_match" in cap.out
    metrics = ws.manifest(art).metrics
    entry = metrics["eval"]["demo"]
    assert entry["n"] == 6 and entry["exact_match"] >= 0.5 and len(entry["exact_match_ci"]) == 2
    assert entry["template"].startswith("chat template sha256:")
    assert metrics["gates"]["passed"] is True and metrics["gates"]["data"] == "demo"
    assert [c["expr"] for c in metrics["gates"]["checks"]] == ["exact_match>=0.5", "field_accuracy>=0.9"]
    assert set(metrics["gates"]["checks"][0]) == {"expr", "metric", "value", "threshold", "passed", "reason"}


def test_failing_gate_stops_a_pipeline_script(tiny_model_dir, demo_file, tmp_path):
    """ACCEPTANCE: in a `set -e` script a failing gate stops the script with exit 3 and a one-line reason."""
    script = tmp_path / "pipeline.sh"
    script.write_text(
        "#!/usr/bin/env bash\nset -e\n"
        f"\"{sys.executable}\" -m slmops -q -w \"{tmp_path / 'ws'}\" eval --model \"{tiny_model_dir}\" "
        f"--data \"{demo_file}\" --max-new-tokens 4 --resamples 0 --gate \"exact_match>=1.01\"\n"
        "echo PROMOTED\n")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "PROMOTED" not in proc.stdout
    reasons = [line for line in proc.stderr.splitlines() if "gate failed" in line]
    assert len(reasons) == 1, proc.stderr
    assert "exact_match 0.000 < 1.010 (short by 1.010)" in reasons[0]
