"""Caching, reasons, --from/--only, gates and promotion on a small pipeline of cheap steps (a few seconds)."""

from __future__ import annotations

import json

import pytest

from slmops.cli.app import run
from slmops.errors import BadInputError, GateFailedError
from slmops.pipeline import load_pipeline, run_pipeline, state_dir
from slmops.workspace import Workspace

PIPE = """\
name: small
vars: {min: 0.0}
steps:
  - name: data
    kind: demo-data
    options: {seed: 0, sizes: {train: 8, val: 4, test: 4, prompts: 4, gold: 2}}
  - name: model
    kind: import
    inputs: {path: MODEL}
  - name: eval
    kind: eval
    inputs: {model: "${steps.model.output}", data: evalset.jsonl}
    options: {limit: 3, max_new_tokens: 4, resamples: 10, batch_size: 4}
  - name: eval-data
    kind: eval
    inputs: {model: "${steps.model.output}", data: "${steps.data.output}/test.jsonl"}
    options: {limit: 2, max_new_tokens: 4, resamples: 10}
  - name: gate
    kind: gate
    inputs: {eval: "${steps.eval.output}"}
    options: {checks: ["exact_match>=${vars.min}"]}
  - name: promote
    kind: promote
    inputs: {artifact: "${steps.gate.output}"}
    options: {to: candidate}
"""


@pytest.fixture
def setup(tmp_path, tiny_model_dir, demo_examples):
    from slmops.demo.task import to_chat_row

    (tmp_path / "evalset.jsonl").write_text("".join(json.dumps(to_chat_row(e)) + "\n" for e in demo_examples[:3]))
    path = tmp_path / "small.yaml"
    path.write_text(PIPE.replace("MODEL", str(tiny_model_dir)))
    return path, Workspace(tmp_path / "ws")


def go(path, ws, **kw):
    overrides = kw.pop("overrides", [])
    return run_pipeline(load_pipeline(path, overrides=overrides, workspace=ws), ws, **kw)


def test_cached_rerun_changed_input_cutoff_and_state(setup, tmp_path):
    path, ws = setup
    first = go(path, ws)
    assert first.ran == ["data", "model", "eval", "eval-data", "gate", "promote"]
    model_id = first.steps[1].output
    assert ws.registry.aliases()[f"{ws.manifest(model_id).name}@candidate"] == model_id
    assert ws.manifest(model_id).metrics["gates"]["passed"] is True
    ev = ws.manifest(first.steps[2].output)
    assert set(ws.registry.parents(ev.id)) == {model_id} and ev.metrics["n"] == 3
    assert ev.kind == "eval" and "eval.json" in ev.files

    second = go(path, ws)
    assert second.ran == [] and second.cached == first.ran
    assert [s.output for s in second.steps] == [s.output for s in first.steps]

    # change the user's eval file: exactly `eval` and the gate that reads it rerun; the gate passes the same
    # model on, so promote (its input unchanged) stays cached
    evalset = tmp_path / "evalset.jsonl"
    old = evalset.read_text()
    evalset.write_text(old + old.splitlines(keepends=True)[0])
    plan = go(path, ws, dry_run=True)
    why = {s.name: (s.action, s.reason) for s in plan.steps}
    assert why["eval"] == ("run", "input data changed") and why["gate"][0] == "run"
    assert why["data"] == ("cached", "cached") and why["eval-data"][0] == "cached"
    third = go(path, ws)
    assert third.ran == ["eval", "gate"] and "promote" in third.cached

    # going back to the old file finds the earlier output again
    evalset.write_text(old)
    fourth = go(path, ws)
    assert fourth.ran == [] and fourth.steps[2].output == first.steps[2].output

    state = json.loads((state_dir(ws, "small") / "state.json").read_text())
    assert state["pipeline"] == "small" and state["steps"]["eval"]["status"] == "done"
    assert len(state["steps"]["eval"]["runs"]) == 2
    run_ = state["steps"]["eval"]["runs"][state["steps"]["eval"]["key"]]
    assert run_["output"] == first.steps[2].output and set(run_["parts"]["inputs"]) == {"model", "data"}


def test_from_only_and_option_change(setup):
    path, ws = setup
    with pytest.raises(BadInputError, match="--only eval needs the output of data|--only eval needs the output of model"):
        go(path, ws, only="eval")
    assert not ws.registry.list()
    go(path, ws)
    res = go(path, ws, from_step="eval")
    assert res.ran == ["eval", "gate", "promote"] and res.steps[2].reason == "forced by --from eval"
    res = go(path, ws, only="eval-data")
    assert res.ran == ["eval-data"] and res.names("skipped") == ["eval", "gate", "promote"]
    res = go(path, ws, overrides=["eval-data.max_new_tokens=5"], dry_run=True)
    assert {s.name: s.reason for s in res.steps}["eval-data"] == "options changed"


def test_failing_gate_stops_with_exit_3(setup, capsys):
    path, ws = setup
    go(path, ws)
    with pytest.raises(GateFailedError) as err:
        go(path, ws, overrides=["vars.min=1.5"])
    assert "stopped at step gate" in err.value.message and "\n" not in err.value.message
    state = json.loads((state_dir(ws, "small") / "state.json").read_text())
    assert state["steps"]["gate"]["status"] == "failed"
    model_id = ws.registry.list("model")[0]["id"]
    assert ws.manifest(model_id).metrics["gates"]["passed"] is False
    rc = run(["-w", str(ws.root), "run", str(path), "--set", "vars.min=1.5"])
    assert rc == 3
    err_text = capsys.readouterr().err
    assert "gate failed: exact_match" in err_text


def test_cli_dry_run_and_json(setup, capsys):
    path, ws = setup
    assert run(["-w", str(ws.root), "run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan for pipeline small" in out and "6 to run, 0 cached" in out and "(new)" in out
    assert run(["-w", str(ws.root), "-q", "run", str(path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [s["action"] for s in res["steps"]] == ["ran"] * 6
    assert run(["-w", str(ws.root), "run", str(path)]) == 0
    captured = capsys.readouterr()
    assert "0 ran, 6 cached" in captured.out
    assert "[3/6] eval: cached ->" in captured.err


def test_bundle_step_builds_a_bundle_per_profile_from_a_step_output(tmp_path, tiny_model_dir, demo_examples):
    from slmops.demo.task import to_chat_row

    (tmp_path / "smoke.jsonl").write_text("".join(json.dumps(to_chat_row(e)) + "\n" for e in demo_examples[:2]))
    (tmp_path / "bp.yaml").write_text(
        "name: tiny\nprofiles:\n  cpu-hf:\n    variant: {model: replaced-by-the-pipeline, format: hf}\n"
        "    smoke: {data: smoke.jsonl, gate: exact_match>=0}\n")
    path = tmp_path / "b.yaml"
    path.write_text(f"name: b\nsteps:\n  - name: model\n    kind: import\n    inputs: {{path: {tiny_model_dir}}}\n"
                    "  - name: bundle\n    kind: bundle\n    inputs: {blueprint: bp.yaml, cpu-hf: \"${steps.model.output}\"}\n"
                    "    options: {version: v1}\n")
    ws = Workspace(tmp_path / "ws")
    res = go(path, ws)
    art = ws.manifest(res.steps[1].output)
    assert art.kind == "bundle" and "v1/cpu-hf/bundle.json" in art.files and "v1/cpu-hf/model/config.json" in art.files
    assert art.parents == [res.steps[0].output] and art.metrics["profiles"]["cpu-hf"]["bundle_sha256"]
    assert go(path, ws).cached == ["model", "bundle"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("cpu-hf: ", "gpu-x: "))
    with pytest.raises(BadInputError, match="input 'gpu-x' is no profile of the blueprint"):
        load_pipeline(bad, workspace=ws)
