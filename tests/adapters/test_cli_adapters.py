"""`slmops adapters merge|list` end to end (in process)."""

from __future__ import annotations

import json

from slmops.cli.app import run


def test_adapters_help_lists_commands_with_examples(capsys):
    assert run(["adapters", "--help"]) == 0
    out = capsys.readouterr().out
    assert "merge" in out and "list" in out
    assert run(["adapters", "merge", "--help"]) == 0
    assert "slmops adapters merge --adapter" in capsys.readouterr().out


def test_merge_and_list(workspace, tmp_path, capsys):
    ws, ids = workspace
    w = str(ws.root)
    assert run(["-w", w, "adapters", "list", "--json"]) == 0
    assert {r["id"] for r in json.loads(capsys.readouterr().out)} == {ids["a"], ids["b"], ids["c"]}
    assert run(["-w", w, "adapters", "list", "--base", "tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["id"] for r in rows} == {ids["a"], ids["b"]} and all(r["base"] == ids["base"] for r in rows)
    assert run(["-w", w, "adapters", "list", "--base", "tiny"]) == 0  # the table
    assert "lora-a" in capsys.readouterr().out

    out = tmp_path / "merged"
    rc = run(["-w", w, "-q", "adapters", "merge", "--base", "tiny", "--adapter", ids["a"], "--out", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    assert res["out_dir"] == str(out) and (out / "model.safetensors").is_file()
    assert sorted(ws.manifest(res["artifact_id"]).parents) == sorted([ids["base"], ids["a"]])
    # without --base: the adapter's registered base; without --json: a summary
    assert run(["-w", w, "-q", "adapters", "merge", "--adapter", ids["b"], "--name", "b-merged"]) == 0
    assert "registered: model-" in capsys.readouterr().out
    # a non-empty --out is refused (exit 2) unless --overwrite
    assert run(["-w", w, "-q", "adapters", "merge", "--adapter", ids["a"], "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(["-w", w, "-q", "adapters", "merge", "--adapter", ids["a"], "--out", str(out), "--overwrite"]) == 0


def test_errors_exit_2(workspace, tiny_model_dir, capsys):
    ws, ids = workspace
    w = str(ws.root)
    assert run(["-w", w, "adapters", "list", "--base", "no-such-model"]) == 2
    assert "no artifact, alias or path" in capsys.readouterr().err
    assert run(["-w", w, "adapters", "merge", "--adapter", str(tiny_model_dir), "--out", "x"]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert run(["-w", w, "adapters", "merge"]) == 2  # --adapter is required
