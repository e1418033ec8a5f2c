"""Workspace: atomic artifact writes, manifests, registry index, verify, rebuild, lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slmops.errors import BadInputError, NotFoundError
from slmops.workspace import MANIFEST, Workspace, sha256_file


def _make(ws: Workspace, name: str, content: str = "x", parents=None, kind: str = "model") -> str:
    with ws.create_artifact(kind, name, config={"lr": 0.1}, parents=parents, metrics={"acc": 0.5}) as w:
        (w.path / "weights.bin").write_text(content)
        (w.path / "sub").mkdir()
        (w.path / "sub" / "a.txt").write_text("nested")
        art_id = w.id
    return art_id


def test_manifest_has_hashes_config_parents_versions(tmp_path):
    ws = Workspace(tmp_path / "ws")
    parent = _make(ws, "base", kind="dataset")
    child = _make(ws, "child", "y", parents=[parent])
    folder = ws.resolve(child)
    m = json.loads((folder / MANIFEST).read_text())
    assert m["kind"] == "model" and m["id"] == child and m["name"] == "child"
    assert m["files"]["weights.bin"] == sha256_file(folder / "weights.bin")
    assert set(m["files"]) == {"weights.bin", "sub/a.txt"}
    assert m["config"] == {"lr": 0.1} and m["parents"] == [parent] and m["metrics"] == {"acc": 0.5}
    assert "torch" in m["libraries"] and "python" in m["libraries"] and m["created"]
    assert ws.registry.lineage(child)["ancestors"] == [parent]
    assert ws.registry.children(parent) == [child]
    assert ws.registry.metrics(child) == {"acc": 0.5}


def test_failed_write_leaves_nothing(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(RuntimeError):
        with ws.create_artifact("model", "broken") as w:
            (w.path / "half.bin").write_text("half")
            broken_id = w.id
            raise RuntimeError("crash midway")
    assert ws.registry.list() == []
    assert not (ws.artifacts_dir / broken_id).exists()
    assert list(ws.tmp_dir.iterdir()) == []
    with pytest.raises(NotFoundError):
        ws.resolve(broken_id)


def test_killed_write_leaves_no_artifact_the_registry_accepts(tmp_path):
    """SIGKILL a process in the middle of writing an artifact: nothing is registered, a rebuild finds
    nothing, and the partial folder is never resolvable."""
    root = tmp_path / "ws"
    marker = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from slmops.workspace import Workspace
        ws = Workspace({str(root)!r})
        with ws.create_artifact("model", "victim", id="model-victim") as w:
            with open(w.path / "big.bin", "wb") as f:
                f.write(b"0" * 1_000_000)
                f.flush()
                Path({str(marker)!r}).write_text("go")
                time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "writer did not start"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ws = Workspace(root)
    assert ws.registry.list() == []
    assert ws.rebuild_registry() == 0
    assert not (ws.artifacts_dir / "model-victim").exists()
    with pytest.raises(NotFoundError):
        ws.resolve("model-victim")
    assert ws.clean_partials() == 1


def test_verify_catches_one_changed_byte_and_missing_file(tmp_path):
    ws = Workspace(tmp_path / "ws")
    art = _make(ws, "m", "abcdef")
    assert ws.verify(art).ok
    f = ws.resolve(art) / "weights.bin"
    data = bytearray(f.read_bytes())
    data[3] ^= 1
    f.write_bytes(bytes(data))
    res = ws.verify(art)
    assert not res.ok and res.changed == ["weights.bin"]
    (ws.resolve(art) / "sub" / "a.txt").unlink()
    res = ws.verify(art)
    assert res.missing == ["sub/a.txt"] and "weights.bin" in res.describe()


def test_resolve_by_id_alias_and_path_and_rebuild(tmp_path):
    ws = Workspace(tmp_path / "ws")
    art = _make(ws, "m")
    folder = ws.resolve(art)
    ws.registry.set_alias("production", art, "test")
    assert ws.resolve("production") == folder
    assert ws.resolve(str(folder)) == folder
    assert ws.artifact_id(str(folder)) == art
    # the folders are the truth: drop the database and rebuild
    ws.registry.close()
    (ws.root / "registry.sqlite").unlink()
    for extra in ws.root.glob("registry.sqlite-*"):
        extra.unlink()
    ws2 = Workspace(ws.root)
    assert ws2.registry.list() == []
    assert ws2.rebuild_registry() == 1
    assert ws2.resolve(art) == folder


def test_remove_refuses_with_children_and_logs(tmp_path):
    ws = Workspace(tmp_path / "ws")
    base = _make(ws, "base")
    child = _make(ws, "child", parents=[base])
    with pytest.raises(BadInputError, match="has children"):
        ws.remove(base)
    ws.remove(child)
    ws.remove(base)
    assert ws.registry.list() == []
    assert [e["action"] for e in ws.registry.events()] == ["remove", "remove"]


def test_unknown_parent_and_kind_rejected(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(NotFoundError):
        with ws.create_artifact("model", parents=["nope"]):
            pass
    with pytest.raises(BadInputError):
        with ws.create_artifact("weird"):
            pass
    assert ws.registry.list() == []


def test_update_metrics_reindexes(tmp_path):
    ws = Workspace(tmp_path / "ws")
    art = _make(ws, "m")
    ws.update_metrics(art, {"exact_match": 0.97})
    assert ws.registry.metrics(art)["exact_match"] == 0.97
    assert ws.verify(art).ok
