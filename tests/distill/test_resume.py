"""`slmops distill generate` end to end against the fake OpenAI-compatible server (a subprocess on
127.0.0.1): kill -9 of the client at random points, the acceptance run (a server failing 20% of calls and
killed once mid-run), several teachers with filters, and the dataset artifact."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import slmops
from slmops.cli.app import run
from slmops.data import validate_file

_spec = importlib.util.spec_from_file_location(
    "fake_openai", Path(__file__).resolve().parents[1] / "support" / "fake_openai.py")
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)

SRC = str(Path(slmops.__file__).resolve().parents[1])


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Customer message number {i}: where is my parcel?"}) + "\n"
                            for i in range(n)))
    return path


def cli(ws: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "slmops", "-q", "-w", str(ws), "distill", "generate", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def assert_every_prompt_once(out: Path, n: int) -> None:
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    counts = Counter(r["index"] for r in rows)
    assert sorted(counts) == list(range(n)), f"missing: {sorted(set(range(n)) - set(counts))}"
    assert max(counts.values()) == 1, f"duplicated: {[i for i, c in counts.items() if c > 1]}"
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [t["metadata"]["index"] for t in train] == list(range(n))
    for t in train:
        assert t["messages"][-1]["content"] == fake.answer_for(t["messages"][:-1])


@pytest.fixture()
def servers():
    started = []

    def start(**opts):
        srv = fake.FakeServer(**opts).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.kill()


def test_resume_after_kill_at_random_points(tmp_path, servers):
    n = 40
    srv = servers(latency=0.03, fail_rate=0.1, fail_modes="500,drop", seed=3)
    prompts = write_prompts(tmp_path / "prompts.jsonl", n)
    out, ws = tmp_path / "run", tmp_path / "ws"
    args = cli(ws, "--teacher", srv.url, "--prompts", str(prompts), "--out", str(out), "--concurrency", "2",
               "--max-retries", "8", "--backoff-base", "0.01", "--backoff-max", "0.05", "--json")
    rng = random.Random(20261129)
    progress = []
    for _ in range(4):  # kill -9 once the file has reached a random number of rows (or at a random time)
        target = count_lines(out / "generations.jsonl") + rng.randint(1, 6)
        deadline = time.monotonic() + rng.uniform(1.0, 4.0)
        proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and count_lines(out / "generations.jsonl") < target and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        progress.append(count_lines(out / "generations.jsonl"))
    assert 0 < progress[-1] < n, progress  # the kills landed mid-run
    done = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert_every_prompt_once(out, n)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation"]["done_before"] + summary["generation"]["generated"] == n
    assert summary["generation"]["done_before"] >= progress[-1] - 1  # at most a torn last row redone


def test_acceptance_flaky_server_killed_mid_run(tmp_path, servers):
    """20% of calls fail (429 / 500 / dropped connection) and the server is killed once mid-run: the run
    exits 1 with the grouped errors and keeps what succeeded; after a restart the rerun completes with
    every prompt exactly once."""
    n = 60
    srv = servers(latency=0.03, fail_rate=0.2, seed=11)
    prompts = write_prompts(tmp_path / "prompts.jsonl", n)
    out, ws = tmp_path / "run", tmp_path / "ws"
    args = cli(ws, "--teacher", srv.url, "--prompts", str(prompts), "--out", str(out), "--concurrency", "4",
               "--max-retries", "8", "--backoff-base", "0.01", "--backoff-max", "0.05")
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and count_lines(out / "generations.jsonl") < 15:
        time.sleep(0.005)
    srv.kill()  # the server dies mid-run
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    kept = count_lines(out / "generations.jsonl")
    assert 15 <= kept < n
    assert f"of {n} prompt generations failed ({kept} succeeded" in stderr
    assert "x fake-teacher: connection: ConnectError" in stderr  # grouped by error
    assert "rerun the same command" in stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == n - kept and all(f["error"].startswith("connection") for f in failures)
    assert not (out / "train.jsonl").exists()  # no dataset from a failed run

    srv.start()  # restarted on the same port, still failing 20% of calls
    again = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert_every_prompt_once(out, n)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation"]["done_before"] == kept and summary["generation"]["generated"] == n - kept
    assert summary["filters"]["kept"] == n
    assert srv.stats()["failures"] > 0  # the restarted server kept failing calls: retried


def test_several_teachers_filters_and_dataset_artifact(tmp_path, servers, capsys):
    a = servers(model="teacher-a")
    b = servers(model="teacher-b")
    c = servers(model="teacher-c", answer="text")  # disagrees (and is not JSON)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)
    ws = tmp_path / "ws"
    common = ["-w", str(ws), "distill", "generate", "--teacher", a.url, "--teacher", b.url, "--teacher", c.url,
              "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--system-prompt", "Answer in JSON."]
    assert run([*common, "--min-agreement", "0.5"]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "kept 5 of 5" in printed and "registered dataset-" in printed
    train = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    m = train[0]["metadata"]
    assert m["teachers"] == ["teacher-a", "teacher-b", "teacher-c"]
    assert m["agreeing_teachers"] == ["teacher-a", "teacher-b"] and m["agreement"] == 0.6667
    assert train[0]["messages"][0] == {"role": "system", "content": "Answer in JSON."}
    assert validate_file(tmp_path / "run" / "train.jsonl", purpose="train").ok

    assert run(["-w", str(ws), "models", "list", "--kind", "dataset", "--json"]) == 0
    (art,) = json.loads(capsys.readouterr().out)
    assert run(["-w", str(ws), "models", "show", art["id"], "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert {"train.jsonl", "generations.jsonl", "rejected.jsonl", "summary.json"} <= set(manifest["files"])
    assert manifest["metrics"]["filters"]["kept"] == 5 and manifest["metrics"]["examples"] == 5
    assert manifest["config"]["teachers"] == ["teacher-a", "teacher-b", "teacher-c"]
    assert "api_key" not in json.dumps(manifest["config"])
    # rerun, unchanged: nothing generated, the same artifact
    assert run(common + ["--min-agreement", "0.5"]) == 0
    assert f"already registered as {art['id']}" in capsys.readouterr().out
    # stricter agreement: every prompt rejected, counted by reason in the summary and manifest
    assert run([*common, "--min-agreement", "0.7", "--name", "strict"]) == 0
    out = capsys.readouterr().out
    assert "kept 0 of 5" in out and "low-agreement" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["filters"]["rejected"] == {"low-agreement": 5}
    # --json drops teacher-c's samples, so the two JSON teachers agree fully
    assert run([*common, "--json", "--min-agreement", "0.6", "--no-register"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["filters"]["kept"] == 5 and summary["filters"]["samples"]["rejected"] == {"invalid-json": 5}


def test_workspace_teacher_becomes_the_datasets_parent(tmp_path, tiny_model_dir, capsys):
    from slmops.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    model = ws.import_folder(tiny_model_dir, "model", name="tiny-teacher")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    rc = run(["-w", str(ws.root), "distill", "generate", "--teacher", model.id, "--prompts", str(prompts),
              "--out", str(tmp_path / "run"), "--max-tokens", "4", "--batch-size", "2", "--no-refusals",
              "--keep-truncated", "--no-dedup"])
    assert rc == 0, capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["teacher"] == model.id and r["engine"] == "torch" for r in rows)
    (art,) = ws.registry.list("dataset")
    assert ws.manifest(art["id"]).parents == [model.id]


def test_cli_bad_input_exits_2(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    base = ["-w", str(tmp_path / "ws"), "distill", "generate", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert run([*base, "--teacher", "http://127.0.0.1:9/v1#m", "--regex", "("]) == 2
    assert "bad --regex" in capsys.readouterr().err
    assert run([*base, "--teacher", "no-such-model"]) == 2
    assert run(["-w", str(tmp_path / "ws"), "distill", "generate", "--teacher", "x", "--out", "o",
                "--prompts", str(tmp_path / "missing.jsonl")]) == 2
