"""The device agent in-process on a folder index: install, verify, smoke, switch, roll back, report."""

from __future__ import annotations

import json
import textwrap
import urllib.request
from pathlib import Path

import pytest

from slmops.rollout.agent import Agent, AgentConfig
from slmops.rollout.bundle import build_bundles
from slmops.rollout.channel import advance, halt, publish
from slmops.rollout.status import load_reports, start_collector, summarize

from .conftest import PROFILES, free_port, kill_servers, write_blueprint

FAKE_SERVER = textwrap.dedent("""
    # a stand-in for `slmops serve`: ready unless the model it is given resolves into a version named v-bad*
    import os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    model, port = sys.argv[1], int(sys.argv[2])
    bad = os.path.basename(os.path.dirname(os.path.realpath(model))).startswith("v-bad")
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503 if bad else 200); self.end_headers(); self.wfile.write(b"{}")
        def log_message(self, *a): pass
    HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.fixture
def setup(tmp_path, tiny_model_dir, tiny_answers):
    good = write_blueprint(tmp_path / "good", tiny_model_dir, tiny_answers)
    bad = write_blueprint(tmp_path / "bad", tiny_model_dir, ["wrong answer"] * len(tiny_answers))
    out = tmp_path / "bundles"
    return {"good": good, "bad": bad, "out": out, "index": tmp_path / "index", "tmp": tmp_path}


def _agent(s, name: str, profile: str = PROFILES[0], **kw) -> Agent:
    return Agent(AgentConfig(index=str(s["index"]), device_id=name, profile=profile, home=s["tmp"] / name,
                             collector=str(s["tmp"] / "reports"), **kw))


def test_install_smoke_fail_and_tamper(setup):
    s = setup
    build_bundles(s["good"], "v1", s["out"])
    build_bundles(s["bad"], "v2", s["out"])
    build_bundles(s["good"], "v3", s["out"])
    publish(s["out"] / "v1", s["index"], "stable", 100)
    a = _agent(s, "dev-a")
    r = a.poll()
    assert (r["state"], r["version"]) == ("updated", "v1"), r
    assert (a.home / "current").is_symlink() and Path(a.home / "current").resolve() == a.home / "versions" / "v1"
    assert a.poll()["state"] == "ok"
    # a version whose smoke test fails is rolled back (never switched to) and not retried
    publish(s["out"] / "v2", s["index"], "stable", 100)
    r = a.poll()
    assert (r["state"], r["version"], r["rollbacks_total"]) == ("rolled_back", "v1", 1), r
    assert r["failures"]["v2"]["stage"] == "smoke" and "exact_match" in r["failures"]["v2"]["reason"]
    assert not (a.home / "versions" / "v2").exists() and not list((a.home / "versions").glob(".*"))
    r = a.poll()
    assert (r["state"], r["version"]) == ("ok", "v1") and "not retried" in r["message"]
    # a tampered weight file in the index is refused: nothing switched, nothing left behind
    publish(s["out"] / "v3", s["index"], "stable", 100)
    weights = s["index"] / "bundles" / "v3" / PROFILES[0] / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = a.poll()
    assert (r["state"], r["version"]) == ("verify_failed", "v1"), r
    assert "model/model.safetensors" in r["message"] and r["failures"]["v3"]["stage"] == "verify"
    assert not (a.home / "versions" / "v3").exists() and not list((a.home / "versions").glob(".*"))
    # repaired index: retried and installed
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = a.poll()
    assert (r["state"], r["version"]) == ("updated", "v3") and "v3" not in r["failures"]
    reports = load_reports(s["tmp"] / "reports")
    assert len(reports) == 1 and reports[0]["version"] == "v3"
    assert summarize(reports)["failures"]["v2"]["by_stage"] == {"smoke": 1}


def test_tampered_manifest_refused_and_halt_returns_to_previous(setup):
    s = setup
    build_bundles(s["good"], "v1", s["out"])
    build_bundles(s["good"], "v2", s["out"])
    publish(s["out"] / "v1", s["index"], "stable", 100)
    publish(s["out"] / "v2", s["index"], "stable", 100)
    manifest = s["index"] / "bundles" / "v2" / PROFILES[1] / "bundle.json"
    original = manifest.read_bytes()
    doc = json.loads(original)
    doc["files"]["serve.json"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(doc))
    a = _agent(s, "dev-b", PROFILES[1])
    r = a.poll()
    assert (r["state"], r["version"]) == ("verify_failed", None) and "bundle.json sha256" in r["message"], r
    manifest.write_bytes(original)
    assert a.poll()["version"] == "v2"
    # halt: the device goes back to the kept previous version (re-verified, no download, no smoke)
    halt(s["index"], "stable")
    r = a.poll()
    assert (r["state"], r["version"]) == ("updated", "v1"), r
    advance(s["index"], "stable", 100, reports=None, force=True)
    assert a.poll()["version"] == "v2"


def test_server_not_ready_switches_back_and_metrics(setup, tmp_path):
    s = setup
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVER)
    build_bundles(s["good"], "v1", s["out"])
    build_bundles(s["good"], "v-bad", s["out"])
    publish(s["out"] / "v1", s["index"], "stable", 100)
    port, mport = free_port(), free_port()
    srv, url = start_collector(tmp_path / "posted")
    a = _agent(s, "dev-c", serve=True, serve_port=port, ready_timeout=2, metrics_port=mport,
               serve_command=["{python}", str(script), "{model}", "{port}"])
    a.cfg.collector = url
    try:
        r = a.poll()
        assert (r["state"], r["version"], r["serving"]) == ("updated", "v1", True), r
        pid1 = json.loads((a.home / "serve.pid").read_text())["pid"]
        publish(s["out"] / "v-bad", s["index"], "stable", 100)
        r = a.poll()
        assert (r["state"], r["version"], r["serving"]) == ("rolled_back", "v1", True), r
        assert r["failures"]["v-bad"]["stage"] == "ready"
        info = json.loads((a.home / "serve.pid").read_text())
        assert info["version"] == "v1" and info["pid"] != pid1  # the old version's server was restarted
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as resp:
            assert resp.status == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert 'slmops_agent_version_info{channel="stable",device_id="dev-c",profile="cpu-avx2-8gb",version="v1"} 1.0' in metrics
        assert "slmops_agent_rollbacks_total 1.0" in metrics and "slmops_agent_last_check_timestamp" in metrics
        posted = json.loads((tmp_path / "posted" / "dev-c.json").read_text())
        assert posted["state"] == "rolled_back"
    finally:
        srv.shutdown()
        a.server.stop()
        kill_servers(a.home)
        a.metrics.server.shutdown()


def test_agent_cli_once(setup):
    from slmops.cli.app import run

    s = setup
    assert run(["bundle", "--blueprint", str(s["good"]), "--version", "v1", "--out", str(s["out"])]) == 0
    assert run(["rollout", "publish", str(s["out"] / "v1"), "--index", str(s["index"]), "--percent", "100"]) == 0
    home = s["tmp"] / "cli-dev"
    args = ["agent", "--index", str(s["index"]), "--device-id", "cli-dev", "--profile", PROFILES[1],
            "--home", str(home), "--once", "--collector", str(s["tmp"] / "reports")]
    assert run(args) == 0
    assert json.loads((home / "report.json").read_text())["version"] == "v1"
    assert run(["rollout", "status", "--index", str(s["index"]), "--collector", str(s["tmp"] / "reports")]) == 0
    assert run(["agent", "--index", str(s["index"]), "--device-id", "bad id!", "--profile", "p",
                "--home", str(home), "--once"]) == 2

