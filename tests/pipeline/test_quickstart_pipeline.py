"""The quickstart as a pipeline (examples/quickstart.yaml, tiny sizes): run twice, the second run executes no
step; then one input file changes and exactly the steps that depend on it run again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.cli.app import run
from slmops.pipeline import load_pipeline, run_pipeline
from slmops.workspace import Workspace

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
TINY = ["vars.eval_limit=4", "vars.distill_steps=6", "vars.distill_batch_size=4", "vars.finetune_steps=4",
        "vars.finetune_eval_every=2", "vars.finetune_train=16", "vars.finetune_val=4", "vars.finetune_test=4",
        "vars.parity_limit=2", "vars.prompts=1000", "gate.checks=[exact_match>=0, json_valid>=0]",
        "vars.bench_prompt_tokens=[16]", "vars.bench_max_new_tokens=4", "vars.bench_repeats=1", "vars.bench_warmup=0",
        "vars.bench_memory=false"]


@pytest.mark.slow
def test_quickstart_pipeline_caches_and_reruns_exactly_what_depends_on_a_changed_file(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    from slmops.demo.task import generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": ex.message}) + "\n" for ex in generate(12, seed=7)))
    overrides = [*TINY, f"vars.prompts_file={prompts}"]
    ws = Workspace(tmp_path / "ws")

    first = run_pipeline(load_pipeline(EXAMPLE, overrides=overrides, workspace=ws), ws)
    names = [s.name for s in first.steps]
    assert first.ran == names and len(names) == 20
    promoted = first.steps[-1].output
    assert ws.manifest(promoted).kind == "export" and ws.manifest(promoted).metrics["gates"]["passed"] is True
    assert ws.registry.aliases()[f"{ws.manifest(promoted).name}@production"] == promoted
    adapter = ws.manifest(next(s.output for s in first.steps if s.name == "finetune"))
    student = next(s.output for s in first.steps if s.name == "distill")
    assert adapter.kind == "adapter" and student in adapter.parents
    assert student in ws.registry.lineage(promoted)["ancestors"]

    # the second run executes nothing and says so for every step
    args = ["-w", str(ws.root), "run", str(EXAMPLE)] + [a for o in overrides for a in ("--set", o)]
    capsys.readouterr()
    assert run(args) == 0
    out = capsys.readouterr()
    assert "0 ran, 20 cached" in out.out
    for i, name in enumerate(names, 1):
        assert f"[{i}/20] {name}: cached -> " in out.err

    # one more prompt: the teacher labels it (the other rows are reused), and everything downstream reruns
    with prompts.open("a") as f:
        f.write(json.dumps({"prompt": "Hi, where is my order #12345? It was a wireless mouse."}) + "\n")
    plan = run_pipeline(load_pipeline(EXAMPLE, overrides=overrides, workspace=ws), ws, dry_run=True)
    assert {s.name: s.reason for s in plan.steps}["generate"] == "input prompts changed"
    third = run_pipeline(load_pipeline(EXAMPLE, overrides=overrides, workspace=ws), ws)
    assert set(third.ran) == {"generate", "distill", "eval-student", "eval-student-new", "finetune", "eval-finetuned",
                              "eval-finetuned-new", "export-onnx", "export-gguf", "eval-onnx", "eval-onnx-new",
                              "eval-gguf", "eval-gguf-new", "bench", "gate", "promote"}
    assert set(third.cached) == {"data", "teacher", "eval-teacher", "finetune-data"}
    gen = next(s for s in third.steps if s.name == "generate")
    assert "12 reused, 1 generated" in gen.summary
