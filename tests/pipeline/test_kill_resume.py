"""Kill -9 a pipeline run at five random moments, `--resume` each time: the final artifacts and registry
equal those of an uninterrupted run (file hashes of every deterministic file, lineage, aliases)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmops.workspace import Workspace

SRC = Path(__file__).resolve().parents[2] / "src"

# generate + distill on the bundled teacher with tiny sizes, then eval, gate and promote
PIPE = """\
name: killme
steps:
  - name: data
    kind: demo-data
    options: {seed: 0, sizes: {train: 16, val: 8, test: 8, prompts: 32, gold: 2}}
  - name: teacher
    kind: import
    options: {bundled: demo-teacher}
  - name: generate
    kind: generate
    inputs: {teacher: "${steps.teacher.output}", prompts: "${steps.data.output}/prompts.jsonl"}
    options: {limit: 12, max_new_tokens: 96, batch_size: 4, filters: {json_valid: true}}
  - name: distill
    kind: distill
    inputs: {data: "${steps.generate.output}", teacher: "${steps.teacher.output}"}
    options: {student_preset: demo-student, max_steps: 32, batch_size: 4, lr: 2.0e-3, kd_alpha: 0.0,
              max_length: 256, val_fraction: 0.0, save_every: 4, save_total_limit: 2, logging_steps: 4, seed: 0}
  - name: eval
    kind: eval
    inputs: {model: "${steps.distill.output}", data: "${steps.data.output}/test.jsonl"}
    options: {limit: 4, max_new_tokens: 48, resamples: 20}
  - name: gate
    kind: gate
    inputs: {eval: "${steps.eval.output}"}
    options: {checks: ["json_valid>=0"]}
  - name: promote
    kind: promote
    inputs: {artifact: "${steps.gate.output}"}
    options: {to: candidate}
"""

# files that hold timings (not bit-deterministic); every other file of every artifact must match
NOT_DETERMINISTIC = {
    ("dataset", "generations.jsonl"),  # per-row latency and finish time
    ("dataset", "summary.json"),       # elapsed time, rows reused on resume
    ("model", "training.json"),        # wall times, tokens/s, resumed_from
    ("eval", "eval.json"),             # wall time, answers/s, machine
    ("eval", "eval.md"),
}
# compared by content, not bytes, because they name things that differ between two workspaces: eval
# examples-*.jsonl by their answers (rows name the data file's path), the generated dataset's train.jsonl and
# rejected.jsonl by their messages (rows' metadata holds the teacher's artifact id and prompt hashes made
# with it); everything else (model weights, tokenizer, demo data, teacher) byte for byte


def _cmd(ws: Path, pipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "slmops", "-q", "-w", str(ws), "run", str(pipe), *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["SLMOPS_USER"] = "pipeline-test"
    return env


def _steps(state_file: Path) -> dict:
    try:
        return json.loads(state_file.read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return {}


def _snapshot(ws_dir: Path) -> dict:
    """The registry as (kind, name) -> deterministic file hashes, parents, aliases and gates."""
    ws = Workspace(ws_dir)
    rows = ws.registry.list()
    names = {r["id"]: (r["kind"], r["name"]) for r in rows}
    assert len(names) == len(set(names.values())), f"duplicate artifacts: {sorted(names.values())}"
    arts = {}
    for r in rows:
        m = ws.manifest(r["id"])
        files = {f: h for f, h in m.files.items() if (m.kind, f) not in NOT_DETERMINISTIC}
        for f in [f for f in files if f.startswith("examples-")]:  # rows name their workspace's data path
            rows = [json.loads(line) for line in (ws.resolve(m.id) / f).read_text().splitlines()]
            files[f] = [(r.get("index"), r.get("prediction")) for r in rows]
        if m.kind == "dataset" and "generations.jsonl" in m.files:  # metadata names the teacher's artifact id
            for f in ("train.jsonl", "rejected.jsonl"):
                rows = [json.loads(line) for line in (ws.resolve(m.id) / f).read_text().splitlines()]
                files[f] = [(r.get("messages"), r.get("reason")) for r in rows]
        arts[names[r["id"]]] = {"files": files, "parents": sorted(names[p] for p in m.parents),
                                "gates": (m.metrics.get("gates") or {}).get("passed")}
    aliases = {a: names[i] for a, i in ws.registry.aliases().items()}
    return {"artifacts": arts, "aliases": aliases}


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    pipe = tmp_path / "killme.yaml"
    pipe.write_text(PIPE)
    env = _env()
    t = time.perf_counter()
    subprocess.run(_cmd(tmp_path / "ws-clean", pipe), env=env, check=True, capture_output=True, timeout=600)
    clean_s = time.perf_counter() - t
    reference = _snapshot(tmp_path / "ws-clean")

    # five random moments across the run: uniform over the uninterrupted run's step timeline, each landing
    # `offset` seconds into a step (the killed run is watched until that step has started)
    clean_state = json.loads((tmp_path / "ws-clean" / "pipelines" / "killme" / "state.json").read_text())["steps"]
    timeline = [(n, e["runs"][e["key"]]["seconds"]) for n, e in clean_state.items()]
    rng = random.Random(8)
    moments = []
    for t_kill in sorted(rng.uniform(0, sum(d for _, d in timeline)) for _ in range(5)):
        for name, d in timeline:
            if t_kill <= d:
                moments.append((name, t_kill))
                break
            t_kill -= d
    ws = tmp_path / "ws-killed"
    state_file = ws / "pipelines" / "killme" / "state.json"
    landed = []
    for step, offset in moments:
        before = _steps(state_file).get(step, {}).get("started", "")
        proc = subprocess.Popen(_cmd(ws, pipe, "--resume"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        while proc.poll() is None:  # until this run starts `step` (or is past it)
            e = _steps(state_file).get(step, {})
            if (e.get("status") == "running" and e.get("started", "") > before) or e.get("status") == "done":
                break
            time.sleep(0.02)
        try:
            proc.wait(timeout=offset)
            landed.append(f"{step}+{offset:.1f}s: finished before the kill")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            running = [n for n, e in _steps(state_file).items() if e.get("status") == "running"]
            landed.append(f"{step}+{offset:.1f}s: killed during {running[0] if running else 'a step change'}")
    final = subprocess.run(_cmd(ws, pipe, "--resume", "--json"), env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    distill = next(st for st in json.loads(final.stdout)["steps"] if st["name"] == "distill")
    killed_state = _steps(state_file)["distill"]
    summaries = [r["summary"] for r in killed_state["runs"].values()]
    print(f"uninterrupted run {clean_s:.1f} s; kills: {landed}; distill: {distill['action']}, {summaries}")
    assert sum("killed" in x for x in landed) >= 2, landed
    result = json.loads(final.stdout)
    assert all(s["action"] in ("ran", "cached") for s in result["steps"])
    got = _snapshot(ws)
    assert got["aliases"] == reference["aliases"] == {"killme-distill@candidate": ("model", "killme-distill"),
                                                      "demo-teacher": ("model", "demo-teacher")}
    assert set(got["artifacts"]) == set(reference["artifacts"])
    for key, ref in reference["artifacts"].items():
        assert got["artifacts"][key] == ref, key
    # and a kill right after a training checkpoint was started (a half-written one is removed on resume):
    # --resume continues training from the last complete checkpoint, with the same final weights
    ws2 = tmp_path / "ws-checkpoint"
    proc = subprocess.Popen(_cmd(ws2, pipe), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = ws2 / "pipelines" / "killme" / "work" / "distill" / "checkpoints"
    while proc.poll() is None and not (ckpts / "checkpoint-8").exists():
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_cmd(ws2, pipe, "--resume", "--json"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    distill = next(st for st in json.loads(resumed.stdout)["steps"] if st["name"] == "distill")
    assert distill["action"] == "ran" and "resumed from checkpoint-" in distill["summary"], distill
    assert _snapshot(ws2) == reference
    # a further run does nothing
    again = subprocess.run(_cmd(ws, pipe, "--json"), env=env, capture_output=True, text=True, timeout=600)
    assert [s["action"] for s in json.loads(again.stdout)["steps"]] == ["cached"] * 7
