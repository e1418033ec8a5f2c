"""Registry operations: gated promotion, forced overrides, rollback, history, append-only events, and the CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from slmops.cli.app import run
from slmops.errors import BadInputError, GateFailedError, NotFoundError
from slmops.registry import history, list_aliases, promote, rollback
from slmops.workspace import Workspace

PASSED = {"passed": True, "data": "test", "checks": [
    {"expr": "exact_match>=0.9", "metric": "exact_match", "value": 0.95, "threshold": 0.9, "passed": True,
     "reason": ""}]}
FAILED = {"passed": False, "data": "test", "checks": [
    {"expr": "exact_match>=0.9", "metric": "exact_match", "value": 0.85, "threshold": 0.9, "passed": False,
     "reason": "exact_match 0.850 < 0.900 (short by 0.050)"}]}


def _model(ws: Workspace, name: str = "student", gates: dict | None = None, content: str = "w") -> str:
    metrics = {"gates": gates} if gates is not None else {}
    with ws.create_artifact("model", name, metrics=metrics) as w:
        (w.path / "weights.bin").write_text(content)
        art = w.id
    return art


@pytest.fixture()
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMOPS_USER", "alice")
    return Workspace(tmp_path / "ws")


def test_promote_needs_passed_gates(ws):
    never = _model(ws, gates=None, content="a")
    failed = _model(ws, gates=FAILED, content="b")
    good = _model(ws, gates=PASSED, content="c")
    with pytest.raises(GateFailedError, match="no quality gates recorded") as exc:
        promote(ws, never, "production")
    assert "slmops eval" in exc.value.hint and "--gate" in exc.value.hint
    with pytest.raises(GateFailedError, match=r"gate failed on test: exact_match 0.850 < 0.900"):
        promote(ws, failed, "production")
    assert ws.registry.aliases() == {} and ws.registry.events() == []
    res = promote(ws, good, "production", reason="eval ok")
    assert res.changed and res.ref == "student@production" and res.previous is None and not res.forced
    assert ws.resolve("student@production") == ws.resolve(good)
    assert ws.manifest("student@production").id == good
    # the same again changes and logs nothing
    again = promote(ws, good, "production")
    assert not again.changed and len(ws.registry.events()) == 1


def test_force_requires_reason_and_is_logged(ws):
    failed = _model(ws, gates=FAILED)
    with pytest.raises(BadInputError, match="--force needs --reason"):
        promote(ws, failed, "production", force=True)
    with pytest.raises(BadInputError, match="--force needs --reason"):
        promote(ws, failed, "production", force=True, reason="   ")
    res = promote(ws, failed, "production", force=True, reason="hotfix for incident 42")
    assert res.forced and res.changed
    (ev,) = history(ws, "student")
    assert ev.action == "promote" and ev.forced and ev.reason == "hotfix for incident 42" and ev.who == "alice"
    assert ev.to == failed and ev.from_ is None and ev.alias == "production"
    assert "exact_match 0.850" in ev.detail["gates"] and ev.detail["gates_passed"] is False


def test_bad_alias_and_unknown_artifact(ws):
    good = _model(ws, gates=PASSED)
    for bad in ("", "a@b", "has space", "../x"):
        with pytest.raises(BadInputError, match="bad alias name"):
            promote(ws, good, bad)
    with pytest.raises(NotFoundError):
        promote(ws, "no-such-model", "production")


def test_rollback_restores_previous_holders_walking_back(ws):
    v1, v2, v3 = (_model(ws, gates=PASSED, content=c) for c in ("1", "2", "3"))
    for art in (v1, v2, v3):
        promote(ws, art, "production")
    assert ws.manifest("student@production").id == v3
    assert tuple(rollback(ws, "student")) == (v2, v3, "student@production")
    assert ws.manifest("student@production").id == v2
    restored, replaced, _ = rollback(ws, "student", "production", reason="v2 also bad")
    assert (restored, replaced) == (v1, v2)
    with pytest.raises(BadInputError, match="no previous holder"):
        rollback(ws, "student")
    assert ws.manifest("student@production").id == v1
    # a new promotion after rollbacks, then rollback goes to the holder before it
    promote(ws, v3, "production")
    assert rollback(ws, "student@production").restored_id == v1
    with pytest.raises(NotFoundError, match="never been set"):
        rollback(ws, "student", "staging")
    # aliases of other names are independent
    other = _model(ws, "other", gates=PASSED)
    promote(ws, other, "production")
    assert {a.ref: a.id for a in list_aliases(ws)} == {"student@production": v1, "other@production": other}
    assert [a.ref for a in list_aliases(ws, "other")] == ["other@production"]


def test_rollback_skips_removed_artifacts(ws):
    v1, v2, v3 = (_model(ws, gates=PASSED, content=c) for c in ("1", "2", "3"))
    for art in (v1, v2, v3):
        promote(ws, art, "production")
    ws.remove(v2)
    assert rollback(ws, "student").restored_id == v1
    ws.remove(v3)  # not holding the alias: nothing to drop
    actions = [e.action for e in history(ws, "student")]
    assert actions == ["promote", "promote", "promote", "rollback"]


def test_history_lists_who_when_why(ws, monkeypatch):
    v1, v2 = _model(ws, gates=PASSED, content="1"), _model(ws, gates=PASSED, content="2")
    promote(ws, v1, "staging", reason="first")
    promote(ws, v1, "production", reason="ship it")
    monkeypatch.setenv("SLMOPS_USER", "bob")
    promote(ws, v2, "production", reason="better")
    rollback(ws, "student", reason="latency regression")
    events = history(ws, "student")
    assert [(e.action, e.alias, e.from_, e.to, e.reason, e.who) for e in events] == [
        ("promote", "staging", None, v1, "first", "alice"),
        ("promote", "production", None, v1, "ship it", "alice"),
        ("promote", "production", v1, v2, "better", "bob"),
        ("rollback", "production", v2, v1, "latency regression", "bob"),
    ]
    assert all(e.at and e.seq for e in events)
    assert history(ws, "nobody") == []


def test_events_are_append_only(ws):
    v1, v2 = _model(ws, gates=PASSED, content="1"), _model(ws, gates=PASSED, content="2")
    promote(ws, v1, "production")
    before = ws.registry.events()
    promote(ws, v2, "production")
    rollback(ws, "student")
    after = ws.registry.events()
    assert len(after) == len(before) + 2 and after[: len(before)] == before
    db = sqlite3.connect(ws.root / "registry.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE events SET who='mallory'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM events")
    db.close()
    assert ws.registry.events() == after


def test_promote_refuses_changed_files(ws):
    good = _model(ws, gates=PASSED)
    (ws.resolve(good) / "weights.bin").write_text("tampered")
    from slmops.errors import IntegrityError

    with pytest.raises(IntegrityError, match="weights.bin"):
        promote(ws, good, "production")


def test_cli_promote_rollback_history_aliases(ws, capsys):
    w = str(ws.root)
    never = _model(ws, gates=None, content="0")
    failed = _model(ws, gates=FAILED, content="1")
    good = _model(ws, gates=PASSED, content="2")
    assert run(["-w", w, "registry", "promote", never, "--to", "production"]) == 3
    err = capsys.readouterr().err
    assert "no quality gates recorded" in err and "slmops eval" in err
    assert run(["-w", w, "registry", "promote", failed, "--to", "production"]) == 3
    assert "exact_match 0.850 < 0.900" in capsys.readouterr().err
    assert run(["-w", w, "registry", "promote", failed, "--to", "production", "--force"]) == 2
    assert "--reason" in capsys.readouterr().err
    assert run(["-w", w, "registry", "promote", failed, "--to", "production", "--to", "bad@alias"]) == 2
    assert run(["-w", w, "registry", "promote", failed, "--to", "production", "--force", "--reason", "hotfix"]) == 0
    assert "FORCED" in capsys.readouterr().out
    assert run(["-w", w, "registry", "promote", good, "--to", "production", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["changed"] and res["previous"] == failed and res["ref"] == "student@production"
    assert run(["-w", w, "registry", "rollback", "student"]) == 0
    assert f"student@production -> {failed} (was {good})" in capsys.readouterr().out
    assert run(["-w", w, "registry", "rollback", "student"]) == 2
    assert "no previous holder" in capsys.readouterr().err
    assert run(["-w", w, "registry", "rollback", "student", "--alias", "staging"]) == 2
    capsys.readouterr()
    assert run(["-w", w, "registry", "history", "student", "--json"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [e["action"] for e in events] == ["promote", "promote", "rollback"]
    assert events[0]["forced"] and events[0]["reason"] == "hotfix" and events[0]["who"] == "alice"
    assert run(["-w", w, "registry", "history", "student"]) == 0
    out = capsys.readouterr().out
    assert "hotfix" in out and "rollback" in out and "alice" in out
    assert run(["-w", w, "registry", "history", good]) == 0  # by id: its name is used
    assert "rollback" in capsys.readouterr().out
    assert run(["-w", w, "registry", "history", "nobody"]) == 2
    capsys.readouterr()
    assert run(["-w", w, "registry", "aliases", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"ref": "student@production", "name": "student", "alias": "production", "id": failed, "kind": "model",
         "updated": json.loads(json.dumps(list_aliases(ws)[0].updated))}]
    assert run(["-w", w, "registry", "aliases"]) == 0
    assert "student@production" in capsys.readouterr().out
    # the gated aliases cannot be moved around the gate with `registry alias`
    assert run(["-w", w, "registry", "alias", "student@production", never]) == 2
    assert "registry promote" in capsys.readouterr().err
    assert run(["-w", w, "registry", "alias", "student@candidate", never]) == 0
    assert ws.manifest("student@candidate").id == never


OPEN_AT = """
import sys, time
from slmops.registry import Registry
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
Registry(sys.argv[2]).close()
"""


def test_processes_opening_a_new_registry_together_do_not_fail(tmp_path):
    """`accelerate launch` ranks open a fresh workspace at the same moment: the switch to WAL must wait for
    the other process instead of failing with "database is locked"."""
    import os
    import subprocess
    import sys
    import time

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    n = 6
    for i in range(6):
        path = str(tmp_path / f"r{i}" / "registry.sqlite")
        start = time.time() + 1.5  # after every process has imported slmops
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(start), path], env=env,
                                  stderr=subprocess.PIPE, text=True) for _ in range(n)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * n, "\n".join(e for e in errors if e)[-2000:]
