"""Blueprint validation, bundle manifests, the percentage function, channel file writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slmops.errors import BadInputError, GateFailedError, IntegrityError
from slmops.rollout import bundle as bundle_mod
from slmops.rollout.blueprint import load_blueprint
from slmops.rollout.bundle import build_bundles, verify_bundle_dir
from slmops.rollout.channel import (
    advance,
    bucket,
    channel_path,
    halt,
    in_rollout,
    publish,
    read_channel,
    rollback,
    stage_failures,
)
from slmops.rollout.util import sha256_bytes

from .conftest import PROFILES, write_blueprint, write_jsonl

ANSWERS = ["a", "b", "c"]


# --- blueprint ----------------------------------------------------------------------------------------


def test_blueprint_unknown_key_names_line(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]}])
    (tmp_path / "m").mkdir()
    bp = tmp_path / "bp.yaml"
    bp.write_text("name: x\nprofiles:\n  cpu-arm-4gb:\n    variant:\n      model: m\n      format: hf\n"
                  "      precison: int4\n    smoke: {data: s.jsonl}\n")
    with pytest.raises(BadInputError) as e:
        load_blueprint(bp)
    assert f"{bp}:7: profiles.cpu-arm-4gb.variant.precison: unknown key" in e.value.message


def test_blueprint_every_problem_at_once(tmp_path):
    bp = tmp_path / "bp.yaml"
    bp.write_text("profiles:\n  gpu-cuda:\n    variant: {model: m, format: onnx, engine: torch}\n"
                  "    smoke: {data: s.jsonl, gate: \"exact_match=>0.8\"}\n  bad name!:\n    variant: {model: m}\n")
    with pytest.raises(BadInputError) as e:
        load_blueprint(bp)
    msg = e.value.message
    assert "engine 'torch' cannot run format 'onnx'" in msg
    assert "bad gate" in msg and ":4:" in msg
    assert "bad name!" in msg


def test_blueprint_smoke_file_checked(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    bp = tmp_path / "bp.yaml"
    bp.write_text("profiles:\n  gpu-cuda:\n    variant: {model: m, format: hf}\n    smoke: {data: s.jsonl}\n")
    with pytest.raises(BadInputError, match="s.jsonl:1: a smoke record"):
        load_blueprint(bp)
    bp.write_text("profiles:\n  gpu-cuda:\n    variant: {model: m, format: hf}\n    smoke: {data: nope.jsonl}\n")
    with pytest.raises(BadInputError, match="no such file"):
        load_blueprint(bp)


def test_example_blueprint_validates():
    from slmops.config import load_yaml_config
    from slmops.rollout.blueprint import Blueprint

    bp = load_yaml_config(Path(__file__).parents[2] / "examples" / "blueprint.yaml", Blueprint)
    assert {"cpu-avx2-8gb", "cpu-arm-4gb", "gpu-cuda"} <= set(bp.profiles)
    assert bp.profiles["cpu-arm-4gb"].variant.engine == "llama.cpp"


# --- bundles ------------------------------------------------------------------------------------------


@pytest.fixture
def bundles(tmp_path, tiny_model_dir):
    bp = write_blueprint(tmp_path / "bp", tiny_model_dir, ANSWERS)
    return build_bundles(bp, "v1", tmp_path / "out")


def test_bundle_manifest_hashes_every_file(bundles):
    assert [b.profile for b in bundles] == list(PROFILES)
    b = bundles[0]
    manifest = json.loads((b.path / "bundle.json").read_text())
    on_disk = sorted(p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [p for p in on_disk if p != "bundle.json"]
    from slmops.workspace import sha256_file

    for rel, meta in manifest["files"].items():
        assert meta["sha256"] == sha256_file(b.path / rel) and meta["size"] == (b.path / rel).stat().st_size
    assert "model/model.safetensors" in manifest["files"] and "smoke/smoke.jsonl" in manifest["files"]
    serve = json.loads((b.path / "serve.json").read_text())
    assert serve == {"name": "tiny", "model": "model", "format": "hf", "precision": "fp32", "engine": "torch",
                     "engine_options": {}, "max_context": 256}
    smoke = json.loads((b.path / "smoke/smoke.json").read_text())
    assert smoke["gate"] == ["exact_match>=0.8"] and smoke["records"] == 3
    assert b.bundle_sha256 == sha256_bytes((b.path / "bundle.json").read_bytes())
    assert verify_bundle_dir(b.path, b.bundle_sha256)["version"] == "v1"


def test_bundle_verify_detects_changes(bundles):
    b = bundles[0]
    weights = b.path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="changed model/model.safetensors"):
        verify_bundle_dir(b.path)
    (b.path / "extra.txt").write_text("x")
    with pytest.raises(IntegrityError, match="unexpected extra.txt"):
        verify_bundle_dir(b.path)
    with pytest.raises(IntegrityError, match="does not match the expected"):
        verify_bundle_dir(bundles[1].path, "0" * 64)


def test_bundle_immutable_and_descriptor(tmp_path, tiny_model_dir, bundles):
    bp = write_blueprint(tmp_path / "bp", tiny_model_dir, ANSWERS)
    with pytest.raises(BadInputError, match="already exists"):
        build_bundles(bp, "v1", tmp_path / "out")
    # an ONNX folder gets a Foundry Local inference_model.json derived from its chat template
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (onnx / f).write_bytes((tiny_model_dir / f).read_bytes())
    (onnx / "genai_config.json").write_text(json.dumps({"model": {"context_length": 256}, "search": {"max_length": 256}}))
    b = tmp_path / "b"
    (b / "model").mkdir(parents=True)
    for p in onnx.iterdir():
        (b / "model" / p.name).write_bytes(p.read_bytes())
    notes = bundle_mod._descriptors(b, "onnx", "tiny", "v1", 256)
    desc = json.loads((b / "model" / "inference_model.json").read_text())
    assert desc["Name"] == "tiny" and "PromptTemplate" in desc, notes


def test_gguf_bundle_gets_modelfile(tmp_path, tiny_model_dir):
    gg = tmp_path / "gg"
    gg.mkdir()
    (gg / "model.gguf").write_bytes(b"not really gguf")
    (gg / "tokenizer_config.json").write_bytes((tiny_model_dir / "tokenizer_config.json").read_bytes())
    write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]}])
    (tmp_path / "bp.yaml").write_text("profiles:\n  cpu-arm-4gb:\n    variant: {model: gg, format: gguf, "
                                      "max_context: 512}\n    smoke: {data: s.jsonl}\n")
    (b,) = build_bundles(tmp_path / "bp.yaml", "v1", tmp_path / "out")
    text = (b.path / "Modelfile").read_text()
    assert "FROM ./model/model.gguf" in text and "PARAMETER num_ctx 512" in text
    assert verify_bundle_dir(b.path)["files"]["Modelfile"]["size"] == len(text.encode())
    with pytest.raises(BadInputError, match="is not format 'onnx'"):
        (tmp_path / "bp.yaml").write_text("profiles:\n  p:\n    variant: {model: gg, format: onnx}\n"
                                          "    smoke: {data: s.jsonl}\n")
        build_bundles(tmp_path / "bp.yaml", "v2", tmp_path / "out")


# --- the percentage function --------------------------------------------------------------------------


def test_bucket_is_documented_function():
    import hashlib

    h = int(hashlib.sha256(b"stable:dev-07").hexdigest()[:8], 16) % 10000
    assert bucket("stable", "dev-07") == h
    assert in_rollout("stable", "dev-07", h / 100 + 0.01) and not in_rollout("stable", "dev-07", h / 100)


def test_percentages_are_nested_and_proportional():
    ids = [f"device-{i}" for i in range(5000)]
    sets = {p: {d for d in ids if in_rollout("stable", d, p)} for p in (0, 1, 10, 12.5, 50, 100)}
    assert sets[0] == set() and sets[100] == set(ids)
    assert sets[1] <= sets[10] <= sets[12.5] <= sets[50] <= sets[100]
    for p in (10, 50):
        assert abs(len(sets[p]) / len(ids) - p / 100) < 0.03
    # another channel picks other devices
    other = {d for d in ids if in_rollout("canary", d, 10)}
    assert other != sets[10]


# --- channel files ------------------------------------------------------------------------------------


def _reports(n_on: int, n_failed: int, version: str, prev: str = "v1") -> list[dict]:
    ok = [{"device_id": f"ok{i}", "channel": "stable", "version": version, "failures": {}} for i in range(n_on)]
    bad = [{"device_id": f"bad{i}", "channel": "stable", "version": prev,
            "failures": {version: {"stage": "smoke", "reason": "x", "retry": False}}} for i in range(n_failed)]
    return ok + bad


def test_channel_publish_advance_halt_rollback(tmp_path, tiny_model_dir):
    bp = write_blueprint(tmp_path / "bp", tiny_model_dir, ANSWERS)
    out = tmp_path / "out"
    build_bundles(bp, "v1", out)
    build_bundles(bp, "v2", out)
    index = tmp_path / "index"
    ch = publish(out / "v1", index, "stable", 100)
    assert ch.current.version == "v1" and ch.previous is None and ch.percent == 100
    raw = json.loads(channel_path(index, "stable").read_text())
    assert raw["state"] == "active" and raw["current"]["bundles"]["cpu-arm-4gb"]["url"] == "bundles/v1/cpu-arm-4gb/"
    sha = raw["current"]["bundles"]["cpu-arm-4gb"]["bundle_sha256"]
    assert sha == sha256_bytes((index / "bundles/v1/cpu-arm-4gb/bundle.json").read_bytes())
    assert not list(index.rglob(".*.tmp")) and not list(index.rglob("*.partial"))

    ch = publish(out / "v2", index, "stable", 10)
    assert (ch.current.version, ch.previous.version, ch.percent) == ("v2", "v1", 10)
    with pytest.raises(BadInputError, match="already the current"):
        publish(out / "v2", index, "stable", 10)
    # advance: needs reports, refuses above the failure rate, passes at or below it
    with pytest.raises(BadInputError, match="--collector"):
        advance(index, "stable", 50, reports=None)
    with pytest.raises(GateFailedError, match="1 of 3 devices failed v2"):
        advance(index, "stable", 50, reports=_reports(2, 1, "v2"))
    assert stage_failures(read_channel(index, "stable"), _reports(19, 1, "v2"))["rate"] == pytest.approx(0.05)
    assert advance(index, "stable", 50, reports=_reports(19, 1, "v2")).percent == 50
    with pytest.raises(BadInputError, match="only raises"):
        advance(index, "stable", 20, reports=[])
    assert halt(index, "stable", "testing").state == "halted"
    target, _ = read_channel(index, "stable").target("dev-04")
    assert target.version == "v1"  # a halted channel sends everyone to previous
    assert advance(index, "stable", 50, reports=[]).state == "active"
    ch = rollback(index, "stable", "bad")
    assert (ch.current.version, ch.previous, ch.percent, ch.withdrawn) == ("v1", None, 100, ["v2"])
    assert [h["action"] for h in ch.history] == ["publish", "publish", "advance", "halt", "advance", "rollback"]
    with pytest.raises(BadInputError, match="rolled back"):
        publish(out / "v2", index, "stable", 10)
    from slmops.errors import SlmopsError

    with pytest.raises(SlmopsError, match="no previous version"):
        rollback(index, "stable")


def test_publish_refuses_changed_bundle_and_writes_atomically(tmp_path, tiny_model_dir, monkeypatch):
    bp = write_blueprint(tmp_path / "bp", tiny_model_dir, ANSWERS)
    out = tmp_path / "out"
    build_bundles(bp, "v1", out)
    (out / "v1" / PROFILES[0] / "serve.json").write_text("{}")
    with pytest.raises(IntegrityError):
        publish(out / "v1", tmp_path / "index", "stable", 10)
    assert not channel_path(tmp_path / "index", "stable").exists()
    # a crash while replacing the channel file leaves the old one whole
    build_bundles(bp, "v2", out)
    publish(out / "v2", tmp_path / "index", "stable", 100)
    before = channel_path(tmp_path / "index", "stable").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        halt(tmp_path / "index", "stable")
    assert channel_path(tmp_path / "index", "stable").read_bytes() == before
    assert not [p for p in (tmp_path / "index" / "channels").iterdir() if p.name != "stable.json"]
