"""`slmops export onnx` end to end (in process): parity table, --json, gates exit 3 without touching the
output, bad input exit 2, --help with examples."""

from __future__ import annotations

import json

import pytest

from slmops.cli.app import run

from .conftest import write_jsonl

pytest.importorskip("onnxruntime_genai")  # the export extra: pip install 'slmops[export]'


def test_export_help_teaches_with_examples(capsys):
    assert run(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "onnx" in out and "foundry" in out
    for cmd in ("onnx", "foundry", "onnx-adapter"):
        assert run(["export", cmd, "--help"]) == 0
        assert f"slmops export {cmd} --" in capsys.readouterr().out


def test_onnx_with_parity_then_a_failing_gate_exits_3_and_keeps_the_export(teacher_dir, eval_records, tmp_path, capsys):
    ws = str(tmp_path / "ws")
    data = write_jsonl(tmp_path / "eval.jsonl", eval_records[:4])
    out = tmp_path / "exp"
    rc = run(["-w", ws, "-q", "export", "onnx", "--model", str(teacher_dir), "--precision", "fp32", "--out", str(out),
              "--eval-file", str(data), "--max-new-tokens", "64", "--json"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    assert res["out_dir"] == str(out) and res["parity"]["exact_match_retention"] == 1.0
    assert res["parity"]["n_records"] == 4 and res["parity"]["mean_kl"] < 1e-6
    assert res["artifact_id"].startswith("export-")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # retention can never exceed 100%: the gate fails, exit 3, the table is printed, OUT stays as it was
    rc = run(["-w", ws, "-q", "export", "onnx", "--model", str(teacher_dir), "--precision", "int8", "--out", str(out),
              "--eval-file", str(data), "--max-new-tokens", "64", "--min-task-retention", "1.01", "--force"])
    captured = capsys.readouterr()
    assert rc == 3, captured.err
    assert "quality gate failed" in captured.err and "below the required 101.0%" in captured.err
    assert "| exact match (4 records) |" in captured.out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert json.loads((out / "export.json").read_text())["precision"] == "fp32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert run(["-w", ws, "models", "list", "--json"]) == 0
    assert sum(r["kind"] == "export" for r in json.loads(capsys.readouterr().out)) == 1


def test_bad_input_exits_2_before_work(teacher_dir, tmp_path, capsys):
    rc = run(["-w", str(tmp_path / "ws"), "export", "onnx", "--model", str(teacher_dir), "--precision", "fp16",
              "--out", str(tmp_path / "o")])
    assert rc == 2 and "fp16 is not available for the cpu" in capsys.readouterr().err
    rc = run(["-w", str(tmp_path / "ws"), "export", "onnx", "--model", str(teacher_dir), "--out", str(tmp_path / "o"),
              "--min-task-retention", "0.9"])
    assert rc == 2 and "--eval-file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
