"""`slmops quickstart`: data, bundled teacher, evaluation, distillation and report, offline; reruns reuse
the data and teacher artifacts."""

from __future__ import annotations

import json

from slmops.cli.app import run
from slmops.workspace import Workspace


def test_quickstart_writes_report_and_registers_lineage(tmp_path, capsys):
    workdir = tmp_path / "qs"
    assert run(["quickstart", "--workdir", str(workdir), "--limit", "24", "--distill-steps", "0",
                "--finetune-steps", "0", "--no-export"]) == 0
    out = capsys.readouterr().out
    assert "exact match" in out and "report.md" in out
    report = (workdir / "report.md").read_text()
    assert "| exact_match |" in report and "| json_valid |" in report and "median decode tokens/s" in report
    ws = Workspace(workdir / ".slmops")
    kinds = sorted(r["kind"] for r in ws.registry.list())
    assert kinds == ["dataset", "eval", "model"]
    teacher = ws.resolve("demo-teacher")
    manifest = json.loads((teacher / "slmops.json").read_text())
    assert manifest["config"]["settings"]["steps"] > 0 and manifest["config"]["wall_time_s"] > 0
    assert 0.0 <= manifest["metrics"]["exact_match"] <= 1.0
    ev = ws.registry.list("eval")[0]["id"]
    assert set(ws.registry.parents(ev)) == {manifest["id"], ws.registry.list("dataset")[0]["id"]}
    assert ws.registry.metrics(ev)["n"] == 24
    # a second run reuses the dataset and teacher and adds one eval
    assert run(["quickstart", "--workdir", str(workdir), "--limit", "24", "--distill-steps", "0",
                "--finetune-steps", "0", "--no-export"]) == 0
    kinds = sorted(r["kind"] for r in ws.registry.list())
    assert kinds == ["dataset", "eval", "eval", "model"]
    assert run(["-w", str(workdir / ".slmops"), "registry", "verify"]) == 0


def test_quickstart_distills_a_smaller_student_and_fine_tunes_it(tmp_path, capsys):
    workdir = tmp_path / "qs"
    rc = run(["quickstart", "--workdir", str(workdir), "--limit", "12", "--distill-steps", "10", "--prompts", "48",
              "--finetune-steps", "6"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "retention" in out
    report = (workdir / "report.md").read_text()
    assert "## Distillation: teacher vs student" in report and "| student |" in report
    ws = Workspace(workdir / ".slmops")
    teacher = ws.manifest("demo-teacher")
    students = [r for r in ws.registry.list("model") if r["id"] != teacher.id]
    assert len(students) == 1
    # the LoRA stage: an adapter on the student, trained on the registered `gifts` data, scored before/after
    assert "## Fine-tuning: a LoRA adapter for new intents" in report and "| new intents (12 examples) |" in report
    [adapter] = ws.registry.list("adapter")
    gifts = next(r["id"] for r in ws.registry.list("dataset") if r["name"] == "demo-gifts")
    assert set(ws.registry.parents(adapter["id"])) == {students[0]["id"], gifts}
    assert "exact_match_new_task" in ws.registry.metrics(adapter["id"])
    assert "LoRA adapter" in out
    # the export stage: ONNX int4 and (with llama-cpp-python) GGUF q4_k_m of the merged model, with parity
    assert "## Export: ONNX int4 and GGUF q4_k_m" in report and "### ONNX int4" in report
    exports = ws.registry.list("export")
    assert exports and all(adapter["id"] in ws.registry.parents(e["id"]) for e in exports)
    assert "smaller than fp16" in out
    metrics = ws.registry.metrics(students[0]["id"])
    assert metrics["param_ratio"] <= 0.25  # the demo student is at most a quarter of the teacher
    assert teacher.id in ws.registry.lineage(students[0]["id"])["ancestors"]
