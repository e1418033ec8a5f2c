"""The CLI end to end (in process): exit codes, models create/list/show/lineage/rm, registry verify/rebuild."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slmops.cli.app import run
from slmops.demo.task import write_demo_data


@pytest.fixture()
def ws(tmp_path):
    return str(tmp_path / "ws")


def test_help_is_light_and_lists_commands():
    code = (
        "import sys\n"
        "from slmops.cli.app import run\n"
        "rc = run(['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'pyarrow') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    for cmd in ("quickstart", "data", "models", "registry", "demo"):
        assert cmd in out


def test_version_and_bad_usage_exit_codes(capsys):
    assert run(["--version"]) == 0
    assert "slmops" in capsys.readouterr().out
    assert run(["no-such-command"]) == 2
    assert run(["models", "show"]) == 2  # missing argument


def test_models_create_list_show_lineage_rm(ws, tmp_path, capsys):
    paths = write_demo_data(tmp_path / "data", seed=3)
    rc = run(["-w", ws, "models", "create", "--preset", "tiny-llama", "--train-tokenizer", paths["train"],
              "--vocab-size", "300", "--name", "tiny"])
    assert rc == 0, capsys.readouterr()
    assert "created model-" in capsys.readouterr().out
    assert run(["-w", ws, "models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["kind"] == "model" and rows[0]["name"] == "tiny"
    art = rows[0]["id"]
    assert run(["-w", ws, "models", "show", art, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["config"]["preset"] == "tiny-llama" and manifest["metrics"]["parameters"] > 0
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    assert run(["-w", ws, "registry", "alias", "candidate", art]) == 0
    assert run(["-w", ws, "models", "lineage", "candidate"]) == 0
    assert run(["-w", ws, "models", "show", "no-such-model"]) == 2
    assert "no artifact, alias or path" in capsys.readouterr().err
    assert run(["-w", ws, "models", "rm", art, "--yes"]) == 0
    capsys.readouterr()
    assert run(["-w", ws, "models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_models_create_needs_one_source(ws, capsys):
    assert run(["-w", ws, "models", "create", "--preset", "tiny-llama"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert run(["-w", ws, "models", "create", "--preset", "nope", "--tokenizer", "x"]) == 2


def test_registry_verify_finds_changed_byte_and_rebuild(ws, tmp_path, capsys):
    from slmops.workspace import Workspace

    w = Workspace(ws)
    with w.create_artifact("dataset", "d") as a:
        (a.path / "train.jsonl").write_text('{"prompt": "hi"}\n')
        art = a.id
    assert run(["-w", ws, "registry", "verify"]) == 0
    f = w.resolve(art) / "train.jsonl"
    f.write_text('{"prompt": "ho"}\n')
    assert run(["-w", ws, "registry", "verify"]) == 1
    err = capsys.readouterr()
    assert "train.jsonl" in err.out and art in err.err
    assert run(["-w", ws, "registry", "rebuild"]) == 0
    assert "indexed 1 artifacts" in capsys.readouterr().out


def test_demo_data_command(tmp_path, capsys):
    assert run(["demo", "data", "--out", str(tmp_path / "d"), "--seed", "1"]) == 0
    for name in ("train", "val", "test", "prompts", "gold"):
        assert (tmp_path / "d" / f"{name}.jsonl").stat().st_size > 0


def test_demo_finetune_data_command(tmp_path, capsys):
    assert run(["demo", "finetune-data", "--out", str(tmp_path / "f"), "--task", "subscriptions", "--train", "40"]) == 0
    rows = (tmp_path / "f" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 40 and (tmp_path / "f" / "test_base.jsonl").stat().st_size > 0
    assert "pause_subscription" in capsys.readouterr().out
    assert run(["demo", "finetune-data", "--out", str(tmp_path / "g"), "--task", "nope"]) == 2
