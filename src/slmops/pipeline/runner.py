"""Run a pipeline: steps in order, each skipped when its cache key has a finished output, state written
atomically after every change, so that a run killed at any moment continues where it stopped.

State: ``<workspace>/pipelines/<name>/state.json``::

    {"pipeline": "quickstart", "file": "/abs/quickstart.yaml", "updated": "...",
     "steps": {"distill": {"status": "done" | "running" | "failed", "key": KEY, "parts": {...},
                           "started": "...", "error": "...",
                           "runs": {KEY: {"output": ARTIFACT_ID, "finished": "...", "seconds": 12.3,
                                          "summary": "...", "parts": {...}}}}}}

``runs`` maps every cache key a step has finished with to its output artifact, so going back to earlier
inputs finds the earlier output again. Working folders (generation rows, checkpoints) are
``<workspace>/pipelines/<name>/work/<step>/``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, GateFailedError, SlmopsError
from slmops.pipeline.plan import Pipeline, Step, artifact_digest, literal_fingerprint, step_key, why_changed
from slmops.pipeline.steps import RUNNERS, StepContext, expected_output, promote_target

STATE_FILE = "state.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class StepResult:
    """What happened to one step (or, in a dry run, what would)."""

    name: str
    kind: str
    action: str  # "ran" | "cached" | "skipped" | "run" (dry run) | "failed"
    reason: str
    output: str | None = None
    seconds: float = 0.0
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunResult:
    pipeline: str
    state_path: Path
    steps: list[StepResult] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0

    def names(self, action: str) -> list[str]:
        return [s.name for s in self.steps if s.action == action]

    @property
    def ran(self) -> list[str]:
        return self.names("ran")

    @property
    def cached(self) -> list[str]:
        return self.names("cached")

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "state": str(self.state_path), "dry_run": self.dry_run,
                "seconds": round(self.seconds, 2), "steps": [s.to_dict() for s in self.steps]}

    def table(self) -> str:
        """One line per step: action, name, kind, output and why."""
        w = max([len(s.name) for s in self.steps] + [4])
        lines = []
        for s in self.steps:
            what = s.output or ""
            why = s.reason if s.action != "ran" else (s.summary or s.reason)
            lines.append(f"  {s.action:<7} {s.name:<{w}}  {s.kind:<9} {what}" + (f"  ({why})" if why else ""))
        return "\n".join(lines)


class PipelineState:
    """The state file of one pipeline, rewritten atomically (temp file, fsync, rename) on every change."""

    def __init__(self, folder: Path, pipeline: Pipeline):
        self.folder = folder
        self.path = folder / STATE_FILE
        self.data: dict[str, Any] = {"pipeline": pipeline.name, "file": str(pipeline.path), "steps": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict) and isinstance(loaded.get("steps"), dict):
                    self.data = loaded
            except ValueError:
                pass  # a state file is only ever replaced whole; an unreadable one means start over
        self.data["file"] = str(pipeline.path)

    def entry(self, name: str) -> dict[str, Any]:
        return self.data["steps"].setdefault(name, {"runs": {}})

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data["updated"] = _now()
        tmp = self.folder / f".{STATE_FILE}.{os.getpid()}.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(self.data, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        try:
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


@contextmanager
def _locked(folder: Path, name: str) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with (folder / ".lock").open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInputError(f"another run of pipeline {name} is in progress in this workspace",
                                "wait for it to finish (a killed run releases the lock at once)") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def state_dir(workspace, pipeline_name: str) -> Path:
    return workspace.root / "pipelines" / pipeline_name


def _exists(workspace, art_id: str | None) -> bool:
    return bool(art_id) and workspace.registry.get(art_id) is not None


def _adopt_orphan(workspace, step: Step, pipeline: str, entry: dict[str, Any]) -> str | None:
    """The output of an earlier run of this key killed after it registered its artifact but before the
    state said so: an artifact of the expected kind and name created since that run started."""
    expected = expected_output(step, pipeline)
    started = entry.get("started")
    if expected is None or not started:
        return None
    kind, name = expected
    rows = [r for r in workspace.registry.list(kind) if r["name"] == name and r["created"] >= started]
    return rows[0]["id"] if rows else None


def run_pipeline(pipeline: Pipeline, workspace, *, dry_run: bool = False, resume: bool = False,
                 from_step: str | None = None, only: str | None = None,
                 log: Callable[[str], None] = lambda _m: None, progress: Callable | None = None) -> RunResult:
    """Run (or with `dry_run`, plan) `pipeline` in `workspace`.

    A step whose cache key has a finished output is skipped ("cached"). `from_step` reruns that step and
    every step that depends on it; `only` runs that step alone (its upstream steps must be cached).
    `resume` lets a step interrupted earlier with the same key continue from its own checkpoints (training)
    instead of starting over. A failing gate raises GateFailedError (exit 3) and stops the pipeline.
    """
    t0 = time.perf_counter()
    names = pipeline.names
    for flag, value in (("--from", from_step), ("--only", only)):
        if value is not None and value not in names:
            raise BadInputError(f"{flag} {value}: no such step", f"steps: {', '.join(names)}")
    if from_step and only:
        raise BadInputError("give --from or --only, not both")
    forced: set[str] = set()
    force_reason = ""
    if from_step:
        forced = {from_step} | pipeline.downstream(from_step)
        force_reason = f"forced by --from {from_step}"
    if only:
        forced = {only}
        force_reason = "forced by --only"
    needed = ({only} | pipeline.upstream(only)) if only else set(names)

    folder = state_dir(workspace, pipeline.name)
    result = RunResult(pipeline.name, folder / STATE_FILE, dry_run=dry_run)
    lock = _nolock() if dry_run else _locked(folder, pipeline.name)
    with lock:
        state = PipelineState(folder, pipeline)
        outputs: dict[str, str] = {}
        pending: set[str] = set()
        total = len(pipeline.steps)
        for i, step in enumerate(pipeline.steps, 1):
            tag = f"[{i}/{total}] {step.name}"
            if step.name not in needed:
                result.steps.append(StepResult(step.name, step.kind, "skipped", f"not selected (--only {only})"))
                continue
            waiting = [d for d in step.deps if d in pending]
            if waiting:  # dry run: an upstream step runs, so this one's inputs are not known yet
                result.steps.append(StepResult(step.name, step.kind, "run",
                                               f"after {', '.join(waiting)}, which run{'s' if len(waiting) == 1 else ''}"))
                pending.add(step.name)
                continue
            prints = _fingerprints(step, outputs, workspace)
            key, parts = step_key(step, prints)
            entry = state.data["steps"].get(step.name, {"runs": {}})
            done = entry.get("runs", {}).get(key)
            valid, invalid_reason = _still_valid(step, done, workspace)
            if step.name in forced:
                action, reason = "run", force_reason
            elif valid:
                action, reason = "cached", "cached"
            elif done is not None:
                action, reason = "run", invalid_reason
            elif entry.get("status") in ("running", "failed") and entry.get("key") == key:
                how = "interrupted" if entry.get("status") == "running" else "failed"
                action = "run"
                reason = (f"{how} earlier, continuing from its checkpoints" if resume
                          else f"{how} earlier, starting over (--resume continues from its checkpoints)")
            else:
                action, reason = "run", why_changed(entry.get("parts"), parts)
            if only and step.name != only and action != "cached":
                raise BadInputError(f"--only {only} needs the output of {step.name}, which must run first ({reason})",
                                    "run the pipeline without --only first (or with --from)")
            if dry_run:
                result.steps.append(StepResult(step.name, step.kind, action, reason,
                                               done["output"] if action == "cached" and done else None))
                if action == "cached":
                    outputs[step.name] = done["output"]
                else:
                    pending.add(step.name)
                continue
            e = state.entry(step.name)
            if action == "cached":
                outputs[step.name] = done["output"]
                e.update(status="done", key=key, parts=parts)
                state.save()
                log(f"{tag}: cached -> {done['output']}")
                result.steps.append(StepResult(step.name, step.kind, "cached", "cached", done["output"]))
                continue
            # run it
            same_key_before = e.get("key") == key and e.get("status") in ("running", "failed")
            orphan = _adopt_orphan(workspace, step, pipeline.name, e) if same_key_before else None
            log(f"{tag} ({step.kind}): running ({reason})")
            t = time.perf_counter()
            if orphan is not None:
                out_id, summary = orphan, "registered by the interrupted run"
            else:
                e.update(status="running", key=key, parts=parts, started=_now(), error=None)
                state.save()
                ctx = StepContext(workspace=workspace, pipeline=pipeline.name, step=step,
                                  inputs=_resolve_inputs(step, outputs, workspace),
                                  parents=_parents(step, outputs, workspace),
                                  work_dir=folder / "work" / step.name, resume=resume and same_key_before,
                                  log=log, progress=progress)
                ctx.work_dir.mkdir(parents=True, exist_ok=True)
                try:
                    out = RUNNERS[step.kind](ctx)
                except GateFailedError as exc:
                    e.update(status="failed", error=exc.message)
                    state.save()
                    result.steps.append(StepResult(step.name, step.kind, "failed", exc.message))
                    raise GateFailedError(f"pipeline {pipeline.name} stopped at step {step.name}: "
                                          + " ".join(exc.message.split()), exc.hint) from exc
                except Exception as exc:
                    e.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                    state.save()
                    raise
                out_id, summary = out.artifact_id, out.summary
            seconds = time.perf_counter() - t
            e.setdefault("runs", {})[key] = {"output": out_id, "finished": _now(), "seconds": round(seconds, 2),
                                             "summary": summary, "parts": parts}
            e.update(status="done", key=key, parts=parts, error=None)
            state.save()
            outputs[step.name] = out_id
            log(f"{tag}: done in {seconds:.1f} s -> {out_id}" + (f" ({summary})" if summary else ""))
            result.steps.append(StepResult(step.name, step.kind, "ran", reason, out_id, round(seconds, 2), summary))
    result.seconds = time.perf_counter() - t0
    return result


@contextmanager
def _nolock() -> Iterator[None]:
    yield


def _still_valid(step: Step, done: dict | None, workspace) -> tuple[bool, str]:
    if done is None:
        return False, ""
    out = done.get("output")
    if not _exists(workspace, out):
        return False, f"its output {out} is no longer in the workspace"
    if step.kind == "promote":
        alias = promote_target(workspace, out, step.options.get("to", ""))
        now = workspace.registry.aliases().get(alias)
        if now != out:
            return False, f"alias {alias} now points at {now or 'nothing'}"
    return True, ""


def _fingerprints(step: Step, outputs: dict[str, str], workspace) -> dict[str, str]:
    prints: dict[str, str] = {}
    for name, iv in step.inputs.items():
        if iv.step is not None:
            prints[name] = f"step:{artifact_digest(workspace, outputs[iv.step])}{iv.suffix}"
        else:
            try:
                prints[name] = literal_fingerprint(iv, workspace)
            except SlmopsError as exc:
                raise BadInputError(f"step {step.name}: input {name} ({iv.text}): {exc.message}", exc.hint) from exc
    for dep in step.deps:
        if all(iv.step != dep for iv in step.inputs.values()):
            prints[f"after:{dep}"] = artifact_digest(workspace, outputs[dep])
    return prints


def _resolve_inputs(step: Step, outputs: dict[str, str], workspace) -> dict[str, str]:
    """Input name -> an artifact id (an earlier step's output, or an id/alias pinned to its id) or an
    absolute path (a file inside an earlier step's output, or a file/folder of the user's)."""
    out: dict[str, str] = {}
    for name, iv in step.inputs.items():
        if iv.step is not None:
            art = outputs[iv.step]
            out[name] = art if not iv.suffix else str(workspace.resolve(art)) + iv.suffix
        else:
            value = iv.value or iv.text
            if not value.startswith(("http://", "https://")) and not Path(value).is_absolute():
                try:
                    value = workspace.artifact_id(value) or value
                except SlmopsError:
                    pass
            out[name] = value
    return out


def _parents(step: Step, outputs: dict[str, str], workspace) -> list[str]:
    ids: list[str] = []
    for iv in step.inputs.values():
        art = None
        if iv.step is not None:
            art = outputs[iv.step]
        elif iv.value and not iv.value.startswith(("http://", "https://")):
            try:
                art = workspace.artifact_id(iv.value)
            except SlmopsError:
                art = None
        if art and workspace.registry.get(art) is not None and art not in ids:
            ids.append(art)
    return ids
