"""A pipeline file is checked whole before anything runs: every problem at once, each with its line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slmops.cli.app import run
from slmops.errors import BadInputError
from slmops.pipeline import KINDS, load_pipeline, run_pipeline
from slmops.workspace import Workspace

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"

BAD = """\
name: bad
vars: {steps: 10}
steps:
  - name: data
    kind: demo-data
    options: {seed: 0, sedd: 1}
  - name: labels
    kind: generat
    inputs: {teacher: demo-teacher}
  - name: train
    kind: distill
    inputs:
      data: ${steps.tune.output}
      teacher: ${steps.nowhere.output}
    options: {student_preset: demo-student, max_steps: "${vars.steps}", bogus_option: 3}
  - name: tune
    kind: finetune
    inputs:
      model: ${steps.train.output}
      data: missing/train.jsonl
    options: {method: lora, lora: {r: 0}}
  - name: data
    kind: demo-data
  - name: eval
    kind: eval
    inputs: {model: "${steps.train.output}", data: no-such-file.jsonl}
    options: {limit: "${vars.nope}"}
"""


def test_every_problem_is_listed_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(BadInputError) as err:
        load_pipeline(path, workspace=ws)
    msg = err.value.message
    lines = msg.splitlines()
    assert "has 10 problems (nothing was run)" in lines[0]
    expected = {
        6: "step 'data': options.sedd: unknown option",
        8: "step 'labels': unknown step kind 'generat'",
        14: "refers to unknown step 'nowhere'",
        15: "step 'train': options.bogus_option: unknown option",
        10: "cycle: train -> tune -> train",
        20: "step 'tune': input 'data': not found",
        21: "step 'tune': options.lora.r: Input should be greater than or equal to 1",
        22: "step 'data': duplicate step name (first at line 4)",
        27: "unknown variable ${vars.nope}",
    }
    for line, text in expected.items():
        assert any(ln.startswith(f"{path}:{line}: ") and text in ln for ln in lines), (line, text, msg)
    assert any(re.match(rf"{re.escape(str(path))}:26: .*input 'data': file not found", ln) for ln in lines)
    # sorted by line
    nums = [int(ln.split(":")[1]) for ln in lines[1:]]
    assert nums == sorted(nums)


def test_cli_exits_2_and_runs_nothing(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    ws_dir = tmp_path / "ws"
    assert run(["-w", str(ws_dir), "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown step kind 'generat'" in err and "cycle: train -> tune -> train" in err
    assert not (ws_dir / "pipelines").exists() and not (ws_dir / "artifacts").exists()


def test_unknown_top_level_key_missing_input_and_bad_gate(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstepz: []\nsteps:\n  - name: g\n    kind: gate\n    options: {checks: 'exact match>=2'}\n"
                    "  - name: pr\n    kind: promote\n    inputs: {artifact: no-such-alias}\n    options: {to: prod}\n")
    with pytest.raises(BadInputError) as err:
        load_pipeline(path, workspace=Workspace(tmp_path / "ws"))
    msg = err.value.message
    assert f"{path}:2: stepz: unknown key" in msg
    assert "step 'g': missing input 'eval'" in msg
    assert "bad gate 'exact match>=2'" in msg
    assert "input 'artifact': not found" in msg and "'no-such-alias' no artifact id or alias" in msg


def test_overrides_are_validated_too(tmp_path):
    with pytest.raises(BadInputError) as err:
        load_pipeline(EXAMPLE, overrides=["distill.max_stepz=3", "nostep.x=1", "vars.prompts=notanumber"])
    msg = err.value.message
    assert "options.max_stepz: unknown option" in msg and "no step named 'nostep'" in msg
    assert "options.limit: Input should be a valid integer" in msg


def test_the_quickstart_example_is_valid_and_covers_the_stages():
    pipe = load_pipeline(EXAMPLE)
    kinds = {s.kind for s in pipe.steps}
    assert {"demo-data", "import", "generate", "distill", "finetune", "export", "eval", "gate", "promote"} <= kinds
    assert pipe.step("distill").deps == ["generate", "teacher"]
    assert {"demo-data", "import", "generate", "distill", "finetune", "export", "eval", "bench", "gate",
            "promote"} == kinds
    assert pipe.downstream("finetune") == {"eval-finetuned", "eval-finetuned-new", "export-onnx", "export-gguf",
                                           "eval-onnx", "eval-onnx-new", "eval-gguf", "eval-gguf-new", "bench",
                                           "gate", "promote"}
    # every variant is evaluated on the base task's test set, under a name of its own in the manifest
    evals = [s for s in pipe.steps if s.kind == "eval"]
    assert {s.inputs["model"].step for s in evals if s.options["data_name"] == "triage-test"} == {
        "teacher", "distill", "finetune", "export-onnx", "export-gguf"}
    assert pipe.step("bench").deps == ["distill", "teacher", "finetune", "export-onnx", "export-gguf"]
    # a variant without the exports: what reads them goes too, optional inputs are dropped
    part = pipe.variant({"export-onnx", "export-gguf"})
    assert "gate" not in part.names and "eval-onnx" not in part.names
    assert set(part.step("bench").inputs) == {"model", "baseline", "finetuned"}
    rewired = pipe.variant({"generate", "distill", "eval-student"}, rewire={"distill": "teacher"})
    assert rewired.step("finetune").inputs["model"].step == "teacher" and "distill" not in rewired.names
    tiny = load_pipeline(EXAMPLE, overrides=["vars.distill_steps=20", "finetune.lora.r=4"])
    assert tiny.step("distill").options["max_steps"] == 20 and tiny.step("finetune").options["lora"]["r"] == 4


def test_dry_run_plans_without_writing(tmp_path):
    ws = Workspace(tmp_path / "ws")
    res = run_pipeline(load_pipeline(EXAMPLE, workspace=ws), ws, dry_run=True)
    assert [s.action for s in res.steps] == ["run"] * len(res.steps)
    assert res.steps[0].reason == "new" and "which run" in res.steps[2].reason
    assert not (tmp_path / "ws" / "pipelines").exists()


def test_every_kind_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "pipeline.md").read_text()
    for kind in KINDS:
        assert f"### `{kind}`" in doc, kind
