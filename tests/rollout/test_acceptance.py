"""Acceptance: a static index on `python -m http.server`, 20 agent processes, two profiles.

v2 goes out at 10% -> 50% -> 100% (exactly the devices whose bucket is inside each share switch); a broken
v3 (its smoke test cannot pass) is rolled back by every device that tried it, `rollout status` shows the
failures and `rollout advance` refuses; a v4 tampered with in the index (one byte of a weight file; a
rewritten bundle.json) is refused by every device. Two agents run with --serve, so their `slmops serve`
restarts on the new version and keeps serving v2 through the failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from slmops.cli.app import run
from slmops.rollout.bundle import build_bundles, verify_bundle_dir
from slmops.rollout.channel import in_rollout
from slmops.rollout.status import start_collector

from .conftest import PROFILES, SRC, free_port, kill_servers, write_blueprint

DEVICES = [f"dev-{i:02d}" for i in range(20)]
SERVING = ("dev-04", "dev-15")  # both inside the first 10% of channel "stable"
PARALLEL = 3


def _profile(device: str) -> str:
    return PROFILES[int(device[-2:]) % 2]


def expected(percent: float) -> set[str]:
    """The documented function: int(sha256("stable:" + id)[:8], 16) % 10000 < percent * 100."""
    return {d for d in DEVICES if in_rollout("stable", d, percent)}


@pytest.mark.slow
def test_staged_rollout_20_agents(tmp_path, tiny_model_dir, tiny_answers):
    t0 = time.monotonic()
    assert len(expected(10)) >= 2 and len(expected(10)) < len(expected(50)) < 20
    assert set(SERVING) <= expected(10)
    good = write_blueprint(tmp_path / "good", tiny_model_dir, tiny_answers)
    broken = write_blueprint(tmp_path / "broken", tiny_model_dir, ["not what the model says"] * len(tiny_answers))
    out, index, homes = tmp_path / "bundles", tmp_path / "index", tmp_path / "devices"
    build_bundles(good, "v2", out)
    build_bundles(broken, "v3", out)
    build_bundles(good, "v4", out)
    index.mkdir()
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(index)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reports_dir = tmp_path / "reports"
    collector, collector_url = start_collector(reports_dir)
    serve_ports = {d: free_port() for d in SERVING}
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    url = f"http://127.0.0.1:{port}"

    def agent(device: str) -> tuple[int, dict, str]:
        cmd = [sys.executable, "-m", "slmops", "agent", "--index", url, "--device-id", device,
               "--profile", _profile(device), "--home", str(homes / device), "--once", "--collector", collector_url]
        if device in SERVING:
            cmd += ["--serve", "--serve-port", str(serve_ports[device]), "--ready-timeout", "120"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        assert lines, f"{device}: no report (exit {proc.returncode})\n{proc.stderr[-3000:]}"
        return proc.returncode, json.loads(lines[-1]), proc.stderr

    def poll_all() -> dict[str, dict]:
        with ThreadPoolExecutor(PARALLEL) as pool:
            results = dict(zip(DEVICES, pool.map(agent, DEVICES), strict=True))
        for d, (rc, rep, err) in results.items():
            assert rep["device_id"] == d and rep["state"] != "error", (d, rep, err[-2000:])
            assert rc == (1 if rep["state"] in ("rolled_back", "verify_failed") else 0), (d, rc, rep)
            # never anything but a verified bundle behind HOME/current
            if rep["version"] is not None:
                assert verify_bundle_dir(homes / d / "current")["version"] == rep["version"]
        return {d: rep for d, (_, rep, _) in results.items()}

    def on(reports: dict[str, dict], version: str) -> set[str]:
        return {d for d, r in reports.items() if r["version"] == version}

    def served_version(device: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{serve_ports[device]}/ready", timeout=10) as resp:
            assert resp.status == 200
        return json.loads((homes / device / "serve.pid").read_text())["version"]

    def status() -> dict:
        proc = subprocess.run([sys.executable, "-m", "slmops", "rollout", "status", "--index", str(index),
                               "--collector", str(reports_dir), "--json"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        idx = ["--index", str(index), "--channel", "stable"]
        stage_times = {}

        # v2: 10% -> 50% -> 100%, each stage exactly the devices inside the share
        assert run(["rollout", "publish", str(out / "v2"), *idx, "--percent", "10"]) == 0
        t = time.monotonic()
        reps = poll_all()
        stage_times["v2@10"] = time.monotonic() - t
        assert on(reps, "v2") == expected(10)
        assert all(r["state"] == "waiting" and r["version"] is None for d, r in reps.items() if d not in expected(10))
        assert {served_version(d) for d in SERVING} == {"v2"}
        for pct in (50, 100):
            assert run(["rollout", "advance", *idx, "--percent", str(pct), "--collector", str(reports_dir)]) == 0
            t = time.monotonic()
            reps = poll_all()
            stage_times[f"v2@{pct}"] = time.monotonic() - t
            assert on(reps, "v2") == expected(pct)
        assert on(reps, "v2") == set(DEVICES)
        assert {r["state"] for r in reps.values()} == {"ok", "updated"}

        # broken v3 at 10%: every device that tries it rolls back and stays on v2; advance refuses
        assert run(["rollout", "publish", str(out / "v3"), *idx, "--percent", "10"]) == 0
        t = time.monotonic()
        reps = poll_all()
        stage_times["v3@10"] = time.monotonic() - t
        tried = {d for d, r in reps.items() if r["state"] == "rolled_back"}
        assert tried == expected(10)
        assert on(reps, "v2") == set(DEVICES)
        assert all(reps[d]["failures"]["v3"]["stage"] == "smoke" for d in tried)
        st = status()
        assert st["summary"]["failures"]["v3"]["device_ids"] == sorted(tried)
        assert st["stage"] == {"version": "v3", "tried": len(tried), "failed": len(tried), "rate": 1.0}
        assert {"version": "v2", "profile": PROFILES[0], "devices": 10} in st["summary"]["on"]
        assert run(["rollout", "advance", *idx, "--percent", "50", "--collector", str(reports_dir)]) == 3
        assert json.loads((index / "channels" / "stable.json").read_text())["percent"] == 10
        # a second poll does not retry v3
        assert agent("dev-19")[1]["message"].startswith("v3 failed here before")
        assert run(["rollout", "rollback", *idx, "--reason", "smoke failures"]) == 0
        assert {served_version(d) for d in SERVING} == {"v2"}

        # v4 tampered in the index after publishing: refused everywhere, everyone stays on v2
        assert run(["rollout", "publish", str(out / "v4"), *idx, "--percent", "100"]) == 0
        weights = index / "bundles" / "v4" / PROFILES[0] / "model" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
        manifest = index / "bundles" / "v4" / PROFILES[1] / "bundle.json"
        doc = json.loads(manifest.read_text())
        doc["files"]["model/model.safetensors"]["sha256"] = doc["files"]["serve.json"]["sha256"]
        manifest.write_text(json.dumps(doc, indent=2))
        t = time.monotonic()
        reps = poll_all()
        stage_times["v4 tampered"] = time.monotonic() - t
        assert {r["state"] for r in reps.values()} == {"verify_failed"}
        assert on(reps, "v2") == set(DEVICES)
        for d, r in reps.items():
            assert r["failures"]["v4"]["stage"] == "verify"
            why = "model/model.safetensors" if _profile(d) == PROFILES[0] else "bundle.json sha256"
            assert why in r["message"], r
            assert not (homes / d / "versions" / "v4").exists()
        assert {served_version(d) for d in SERVING} == {"v2"}
        st = status()
        assert st["summary"]["failures"]["v4"]["by_stage"] == {"verify": 20}
        print(f"stage wall times: { {k: round(v, 1) for k, v in stage_times.items()} }; "
              f"total {time.monotonic() - t0:.1f}s")
    finally:
        kill_servers(*(homes / d for d in SERVING))
        collector.shutdown()
        web.kill()
        web.wait()
