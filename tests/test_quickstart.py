"""`slmops quickstart`: the quickstart pipeline (slmops/demo/quickstart.yaml) on the demo, offline, with one report
(report.md summary + tables, report.html) over the teacher, student, fine-tuned, ONNX int4 and GGUF variants;
a second run executes no step."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from slmops.cli.app import run
from slmops.workspace import Workspace

# the bench over the variants, as short as it gets (the real run measures 2 prompt lengths x 3 repeats + memory)
QUICK_BENCH = ["--set", "vars.bench_memory=false", "--set", "vars.bench_repeats=1", "--set", "vars.bench_warmup=0",
               "--set", "vars.bench_prompt_tokens=[16]", "--set", "vars.bench_max_new_tokens=4"]


def test_the_example_pipeline_is_the_packaged_one():
    example = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
    from slmops.quickstart import PIPELINE_FILE

    assert example.is_symlink() and os.readlink(example) == "../src/slmops/demo/quickstart.yaml"
    assert example.resolve() == PIPELINE_FILE.resolve()


def test_the_options_select_a_variant_of_the_pipeline(tmp_path):
    from slmops.quickstart import quickstart_pipeline

    ws = Workspace(tmp_path / "ws")
    full, sets, skipped = quickstart_pipeline(ws, gguf=True)
    assert len(full.names) == 20 and not skipped and "vars.distill_steps=1200" in sets
    pipe, sets, skipped = quickstart_pipeline(ws, limit=5, distill_steps=0, finetune_steps=0, export=False, gguf=True)
    assert pipe.names == ["data", "teacher", "eval-teacher", "bench"]
    assert {"vars.eval_limit=5", "vars.parity_limit=5"} <= set(sets)
    assert skipped["export-onnx"] == "--no-export" and skipped["finetune-data"] == "nothing reads it"
    # no student: the teacher is fine-tuned and exported; no llama-cpp: no GGUF
    pipe, _, skipped = quickstart_pipeline(ws, distill_steps=0, gguf=False)
    assert pipe.step("finetune").inputs["model"].step == "teacher" and "generate" not in pipe.names
    assert "export-gguf" in skipped and "eval-gguf-new" in skipped
    assert set(pipe.step("bench").inputs) == {"model", "baseline", "finetuned", "onnx"}
    # no LoRA: the student is exported as it is
    pipe, _, _ = quickstart_pipeline(ws, finetune_steps=0, gguf=True)
    assert "finetune" not in pipe.names and "adapter" not in pipe.step("export-onnx").inputs
    assert "gate" in pipe.names and "eval-onnx-new" in pipe.names


@pytest.mark.slow
def test_quickstart_writes_report_and_registers_lineage(tmp_path, capsys):
    workdir = tmp_path / "qs"
    args = ["quickstart", "--workdir", str(workdir), "--limit", "24", "--distill-steps", "0", "--finetune-steps", "0",
            "--no-export", *QUICK_BENCH]
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "exact match" in out and "report.md" in out and "report.html" in out and "4 ran, 0 cached" in out
    report = (workdir / "report.md").read_text()
    assert report.startswith("# slmops quickstart") and "## Pipeline" in report and "--no-export" in report
    assert "### Quality on data `triage-test`" in report and "| exact_match |" in report
    assert "## Variants" in report and "decode tok/s" in report
    assert (workdir / "report.html").is_file()
    ws = Workspace(workdir / ".slmops")
    kinds = sorted(r["kind"] for r in ws.registry.list())
    assert kinds == ["bench", "dataset", "eval", "model"]
    teacher = ws.resolve("demo-teacher")
    manifest = json.loads((teacher / "slmops.json").read_text())
    assert manifest["config"]["settings"]["steps"] > 0 and manifest["config"]["wall_time_s"] > 0
    scores = manifest["metrics"]["eval"]["triage-test"]
    assert 0.0 <= scores["exact_match"] <= 1.0 and len(scores["exact_match_ci"]) == 2 and scores["n"] == 24
    assert manifest["metrics"]["bench"]["decode_tok_s"] > 0
    ev = ws.registry.list("eval")[0]["id"]
    assert set(ws.registry.parents(ev)) == {manifest["id"], ws.registry.list("dataset")[0]["id"]}
    assert ws.registry.metrics(ev)["n"] == 24
    # a second run executes no step (every one cached) and only rewrites the report
    (workdir / "report.md").unlink()
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "0 ran, 4 cached" in out and "every step cached" in out
    assert sorted(r["kind"] for r in ws.registry.list()) == kinds
    assert "every step cached" in (workdir / "report.md").read_text()
    assert run(["-w", str(workdir / ".slmops"), "registry", "verify"]) == 0


@pytest.mark.slow
def test_quickstart_distills_fine_tunes_exports_and_reports_five_variants(tmp_path, capsys):
    workdir = tmp_path / "qs"
    rc = run(["quickstart", "--workdir", str(workdir), "--limit", "12", "--distill-steps", "10", "--prompts", "48",
              "--finetune-steps", "6", *QUICK_BENCH, "--set", "gate.checks=[exact_match>=0]"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "retention" in out and "LoRA adapter" in out and "smaller than fp16" in out and "promoted" in out
    report = (workdir / "report.md").read_text()
    assert "## Distillation: teacher vs student" in report and "| student |" in report
    ws = Workspace(workdir / ".slmops")
    teacher = ws.manifest("demo-teacher")
    students = [r for r in ws.registry.list("model") if r["id"] != teacher.id]
    assert len(students) == 1
    student = ws.manifest(students[0]["id"])
    assert student.metrics["parameters"] <= 0.25 * teacher.metrics["parameters"]  # at most a quarter
    assert teacher.id in ws.registry.lineage(student.id)["ancestors"]
    # the LoRA stage: an adapter on the student, trained on the registered `gifts` data, scored before/after
    assert "## Fine-tuning: a LoRA adapter for new intents" in report
    assert "| new intents (12 examples of gifts-test) |" in report
    [adapter] = ws.registry.list("adapter")
    gifts = next(r["id"] for r in ws.registry.list("dataset") if r["name"] == "demo-gifts")
    assert set(ws.registry.parents(adapter["id"])) == {student.id, gifts}
    assert {"triage-test", "gifts-test"} <= set(ws.manifest(adapter["id"]).metrics["eval"])
    assert "gifts-test" in student.metrics["eval"]  # the "before"
    # the export stage: ONNX int4 and (with llama-cpp-python) GGUF q4_k_m of the merged model, with parity,
    # each evaluated on both tasks; the ONNX model passed its gate and was promoted
    assert "## Export: ONNX int4 and GGUF q4_k_m" in report and "| ONNX int4 |" in report
    gguf = importlib.util.find_spec("llama_cpp") is not None
    exports = ws.registry.list("export")
    assert len(exports) == (2 if gguf else 1)
    assert all(adapter["id"] in ws.registry.parents(e["id"]) for e in exports)
    for e in exports:
        m = ws.manifest(e["id"]).metrics
        assert {"triage-test", "gifts-test"} <= set(m["eval"]) and m["bench"]["decode_tok_s"] > 0
    onnx = next(e["id"] for e in exports if e["name"] == "quickstart-export-onnx")
    assert ws.manifest(onnx).metrics["gates"]["passed"] is True
    assert ws.registry.aliases()["quickstart-export-onnx@production"] == onnx
    # one report over the five variants: lineage, scatters, bars, every metric with its interval, gates
    html = (workdir / "report.html").read_text()
    names = ["demo-teacher", student.name, ws.manifest(adapter["id"]).name, "quickstart-export-onnx"]
    names += ["quickstart-export-gguf"] if gguf else []
    assert all(n in html for n in names), [n for n in names if n not in html]
    assert f"{len(names)} variants" in report and "## Quality gates" in report and "PASS" in report
    for plot in ("lineage", "quality_latency", "quality_size", "throughput"):
        assert (workdir / "report_files" / f"{plot}.png").is_file()
    assert run(["-w", str(workdir / ".slmops"), "registry", "verify"]) == 0
