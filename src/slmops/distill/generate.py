"""Resumable, lossless teacher generation: prompts x teachers -> ``<out>/generations.jsonl``.

One JSON line per (prompt, teacher)::

    {"prompt_hash": ..., "messages_hash": ..., "index": 3, "messages": [...], "teacher": "fake-teacher",
     "engine": "openai-http", "samples": ["...", ...], "finish_reasons": ["stop", ...],
     "sampling": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 256, "num_samples": 4, "seed": 0},
     "seeds": [...], "timing": {"latency_s": [...], "ttft_s": [...], "finished_at": "..."},
     "usage": {"prompt_tokens": ..., "completion_tokens": ...}, "attempts": [...]}

``prompt_hash`` is the sha256 of the canonical JSON of the prompt messages (with the system prompt in
them), the teacher's name and the sampling settings, so changing any of them never reuses old rows;
``messages_hash`` hashes the messages alone (it groups rows of the same prompt across teachers).

Resume: on start the file is read; a torn last line (a kill during a write) is cut off and redone, a
line that does not parse or repeats a hash is dropped (the file is rewritten without it); every hash
present is done and skipped. Rows are appended one write per row and flushed at once (a kill -9 loses at
most the rows in flight) and fsynced at least every second. A pair that finally fails goes to
``failures.jsonl`` (a log; nothing there counts as done) and is tried again by the next run. An exclusive
lock on ``<out>/.lock`` stops two runs from writing the same folder.

Sample k of a prompt is requested with the seed derived from (seed, prompt_hash, k), so a rerun asks the
teacher the same question with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.engines.base import Engine, GenerationRequest, GenerationResult
from slmops.errors import BadInputError, SlmopsError

GENERATIONS = "generations.jsonl"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Teacher:
    """A teacher: the name rows are keyed by (an artifact id, a folder, or the served model's id for an
    OpenAI-compatible server, so the same model at a new address resumes the same rows), its engine, and
    its artifact id when it is a workspace artifact (the dataset's parent)."""

    name: str
    engine: Engine
    artifact_id: str | None = None
    ref: str | None = None


def teacher_name(engine: Engine) -> str:
    """A stable name for an engine handed in without one."""
    if engine.name == "openai-http":
        return str(engine.model)  # type: ignore[attr-defined]
    path = getattr(engine, "path", "") or ""
    return f"{engine.name}:{path}" if path else engine.name


def open_teacher(ref: str | Engine | Teacher, workspace=None, **opts: Any) -> Teacher:
    """A Teacher from an artifact id/alias, a model folder, an http(s) URL (``URL#model`` picks the
    model) or an Engine. `opts` go to the engine (openai-http: concurrency, api_key, timeout, max_retries,
    max_rps, backoff_base, backoff_max; torch: max_batch_size, dtype)."""
    if isinstance(ref, Teacher):
        return ref
    if not isinstance(ref, str | Path):
        return Teacher(name=teacher_name(ref), engine=ref)
    from slmops.engines import open_engine

    ref_s = str(ref)
    remote = ref_s.startswith(("http://", "https://"))
    remote_keys = {"concurrency", "api_key", "timeout", "max_retries", "max_rps", "backoff_base", "backoff_max"}
    engine_opts = {k: v for k, v in opts.items() if (k in remote_keys) == remote and v is not None}
    engine = open_engine(ref_s, workspace=workspace, **engine_opts)
    if remote:
        return Teacher(name=teacher_name(engine), engine=engine, ref=ref_s)
    artifact_id = None
    name = ref_s
    if workspace is not None:
        try:
            artifact_id = workspace.artifact_id(ref_s)
        except SlmopsError:
            artifact_id = None
        if artifact_id is not None and workspace.registry.get(artifact_id) is None:
            artifact_id = None
        name = artifact_id or str(workspace.resolve(ref_s))
    elif Path(ref_s).expanduser().exists():
        name = str(Path(ref_s).expanduser().resolve())
    return Teacher(name=name, engine=engine, artifact_id=artifact_id, ref=ref_s)


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The prompt as sent: `system_prompt` is added first unless the prompt has its own system message
    (a prompt's own system message wins). Messages keep only role, content and name."""
    clean = [{k: m[k] for k in ("role", "content", "name") if k in m} for m in messages]
    if system_prompt and not (clean and clean[0]["role"] == "system"):
        clean.insert(0, {"role": "system", "content": system_prompt})
    return clean


def sample_seed(seed: int, prompt_hash: str, k: int) -> int:
    """The seed of sample k of a prompt (31 bits, reproducible)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_hash}:{k}".encode()).digest()[:4], "big") & 0x7FFFFFFF


# --- the output file ---------------------------------------------------------------------------------
def _valid_row(row: Any) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("prompt_hash"), str) and isinstance(row.get("samples"), list)
            and isinstance(row.get("teacher"), str) and isinstance(row.get("messages"), list))


@dataclass
class Repair:
    """What was fixed in an existing output file on start."""

    torn_last_line: bool = False
    bad_lines: int = 0
    duplicate_lines: int = 0

    @property
    def any(self) -> bool:
        return self.torn_last_line or bool(self.bad_lines or self.duplicate_lines)


def repair_and_index(path: Path) -> tuple[set[str], Repair]:
    """Read a generations file: the hashes it holds, after cutting a torn last line and dropping lines
    that do not parse or repeat a hash (the file is rewritten atomically only when needed)."""
    repair = Repair()
    if not path.exists():
        return set(), repair
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else a torn last line
    if tail:
        repair.torn_last_line = True
    hashes: set[str] = set()
    keep: list[bytes] = []
    for line in lines:
        if not line.strip():
            repair.bad_lines += 1
            continue
        try:
            row = json.loads(line)
        except ValueError:
            repair.bad_lines += 1
            continue
        if not _valid_row(row):
            repair.bad_lines += 1
            continue
        if row["prompt_hash"] in hashes:
            repair.duplicate_lines += 1
            continue
        hashes.add(row["prompt_hash"])
        keep.append(line)
    if repair.bad_lines or repair.duplicate_lines:
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("wb") as f:
            f.write(b"".join(line + b"\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    elif repair.torn_last_line:
        with path.open("r+b") as f:
            f.truncate(len(data) - len(tail))
            f.flush()
            os.fsync(f.fileno())
    return hashes, repair


def read_rows(path: Path, hashes: set[str] | None = None) -> list[dict]:
    """The rows of a (repaired) generations file, first occurrence of each hash, optionally only those
    in `hashes`."""
    rows: list[dict] = []
    seen: set[str] = set()
    if not path.exists():
        return rows
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not _valid_row(row) or row["prompt_hash"] in seen:
                continue
            if hashes is not None and row["prompt_hash"] not in hashes:
                continue
            seen.add(row["prompt_hash"])
            rows.append(row)
    return rows


class _Appender:
    """Appends JSON lines: one write per line, flushed at once, fsynced at least every `fsync_s`."""

    def __init__(self, path: Path, fsync_s: float = 1.0):
        self.f = path.open("ab")
        self.fsync_s = fsync_s
        self.last_sync = time.monotonic()

    def write(self, obj: dict) -> None:
        self.f.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        self.f.flush()
        if time.monotonic() - self.last_sync >= self.fsync_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.f.fileno())
        self.last_sync = time.monotonic()

    def close(self) -> None:
        if not self.f.closed:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with (out_dir / LOCK).open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInputError(f"another run is writing {out_dir}",
                                "wait for it to finish, or use another --out folder") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --- running -----------------------------------------------------------------------------------------
@dataclass
class _Pair:
    index: int
    messages: list[dict]
    messages_hash: str
    prompt_hash: str
    teacher: Teacher


def error_summary(exc: BaseException) -> str:
    """How a failure is grouped: a RemoteError's kind and detail, else the exception type and message."""
    summary = getattr(exc, "summary", None)
    if isinstance(summary, str):
        return summary
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def _settled(engine: Engine, requests: Iterator[GenerationRequest],
             batch_size: int) -> Iterator[tuple[int, GenerationResult | Exception]]:
    """(index, result | exception) for each request: the engine's own `iter_settled` when it has one
    (remote engines: concurrent, in completion order), else batches of `batch_size` through `generate`,
    retrying a failed batch request by request so that one bad prompt fails alone."""
    iter_settled = getattr(engine, "iter_settled", None)
    if iter_settled is not None:
        yield from iter_settled(requests)
        return
    start = 0
    while True:
        batch = []
        for req in requests:
            batch.append(req)
            if len(batch) >= batch_size:
                break
        if not batch:
            return
        try:
            results: list[GenerationResult | Exception] = list(engine.generate(batch))
        except Exception:  # noqa: BLE001 - find which request failed
            results = []
            for req in batch:
                try:
                    results.append(engine.generate([req])[0])
                except Exception as exc:  # noqa: BLE001 - settled
                    results.append(exc)
        for i, res in enumerate(results):
            yield start + i, res
        start += len(batch)


@dataclass
class GenerateReport:
    """What a generation run did. Counts are of (prompt, teacher) pairs."""

    out_dir: Path
    prompts: int  # distinct prompts
    duplicate_prompts: int  # prompts that repeat an earlier one (generated once)
    teachers: list[str]
    total: int
    done_before: int
    generated: int
    failed: int
    errors: dict[str, int] = field(default_factory=dict)  # "<teacher>: <error summary>" -> count, this run
    elapsed_s: float = 0.0
    repair: Repair = field(default_factory=Repair)
    hashes: list[str] = field(default_factory=list)  # every pair's prompt_hash, in prompt order
    stale_rows: int = 0  # rows in the file from other prompts or settings (kept, not used)
    min_success: float = 0.9
    sampling: dict = field(default_factory=dict)

    @property
    def succeeded(self) -> int:
        return self.done_before + self.generated

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.total if self.total else 1.0

    @property
    def ok(self) -> bool:
        return self.succeeded >= self.min_success * self.total

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts, "duplicate_prompts": self.duplicate_prompts, "teachers": self.teachers,
            "pairs": self.total, "done_before": self.done_before, "generated": self.generated,
            "failed": self.failed, "succeeded": self.succeeded, "success_rate": round(self.success_rate, 4),
            "min_success": self.min_success, "errors": self.errors, "elapsed_s": round(self.elapsed_s, 3),
            "repaired": {"torn_last_line": self.repair.torn_last_line, "bad_lines": self.repair.bad_lines,
                         "duplicate_lines": self.repair.duplicate_lines},
            "stale_rows": self.stale_rows, "sampling": self.sampling,
        }

    def failure_message(self) -> str:
        lines = [f"{self.failed} of {self.total} prompt generations failed ({self.succeeded} succeeded, "
                 f"{self.success_rate:.0%} < --min-success {self.min_success:.0%}):"]
        lines += [f"  {n} x {err}" for err, n in sorted(self.errors.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


class GenerationFailed(SlmopsError):
    """Fewer generations succeeded than `min_success` asks; `report` says what happened."""

    def __init__(self, report: GenerateReport):
        super().__init__(
            report.failure_message(),
            f"what succeeded is kept in {report.out_dir / GENERATIONS}; rerun the same command to retry "
            f"only the failed prompts (failures are logged in {report.out_dir / FAILURES})",
        )
        self.report = report


def generate_synthetic(
    teachers: list[Engine | Teacher | str],
    prompts: list[list[dict]],
    out_dir: str | Path,
    *,
    system_prompt: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    num_samples: int = 1,
    seed: int = 0,
    stop: list[str] | None = None,
    batch_size: int = 16,
    min_success: float = 0.9,
    progress: Callable[..., None] | None = None,
    workspace=None,
) -> GenerateReport:
    """Ask every teacher for `num_samples` answers to every prompt, appending rows to
    ``<out_dir>/generations.jsonl`` (see the module docstring for the format and resume rules).

    Returns the report; raises :class:`GenerationFailed` (exit 1) when fewer than `min_success` of the
    (prompt, teacher) pairs are done at the end, with the errors grouped. `progress(n, status=..., total=...)`
    is called as pairs finish (first with the count already done and the total).
    """
    if not teachers:
        raise BadInputError("no teacher given", "pass --teacher MODEL|URL")
    if not prompts:
        raise BadInputError("no prompts")
    if num_samples < 1:
        raise BadInputError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= min_success <= 1:
        raise BadInputError(f"min_success must be in [0, 1], got {min_success}")
    # check the sampling settings once, with the request's own validation
    GenerationRequest(prompt="x", max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      stop=list(stop or []))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher_objs = [open_teacher(t, workspace) for t in teachers]
    names = [t.name for t in teacher_objs]
    if len(set(names)) != len(names):
        raise BadInputError(f"the same teacher is given twice: {', '.join(names)}")
    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "num_samples": num_samples, "seed": seed, "stop": list(stop or [])}
    progress = progress or (lambda n=1, **kw: None)
    t_start = time.perf_counter()

    with _locked(out):
        path = out / GENERATIONS
        done, repair = repair_and_index(path)
        pairs: list[_Pair] = []
        seen_prompts: set[str] = set()
        duplicates = 0
        for index, prompt in enumerate(prompts):
            messages = with_system_prompt(prompt, system_prompt)
            messages_hash = sha256_text(canonical_json(messages))
            if messages_hash in seen_prompts:
                duplicates += 1
                continue
            seen_prompts.add(messages_hash)
            for teacher in teacher_objs:
                key = sha256_text(canonical_json({"messages": messages, "teacher": teacher.name,
                                                  "sampling": sampling}))
                pairs.append(_Pair(index, messages, messages_hash, key, teacher))
        hashes = [p.prompt_hash for p in pairs]
        current = set(hashes)
        report = GenerateReport(
            out_dir=out, prompts=len(seen_prompts), duplicate_prompts=duplicates, teachers=names,
            total=len(pairs), done_before=len(current & done), generated=0, failed=0, repair=repair,
            hashes=hashes, stale_rows=len(done - current), min_success=min_success, sampling=sampling,
        )
        progress(report.done_before, status="", total=report.total)
        errors: Counter[str] = Counter()
        rows = _Appender(path)
        failures = _Appender(out / FAILURES)
        try:
            for teacher in teacher_objs:
                todo = [p for p in pairs if p.teacher is teacher and p.prompt_hash not in done]
                for pair, results in _run_teacher(teacher, todo, sampling, batch_size):
                    bad = next((r for r in results if isinstance(r, BaseException)), None)
                    if bad is None:
                        rows.write(_row(pair, results, sampling))
                        report.generated += 1
                        done.add(pair.prompt_hash)
                    else:
                        summary = error_summary(bad)
                        errors[f"{teacher.name}: {summary}"] += 1
                        failures.write({"prompt_hash": pair.prompt_hash, "index": pair.index,
                                        "teacher": teacher.name, "error": summary, "message": str(bad),
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                        report.failed += 1
                    progress(1, status=f"{report.failed} failed" if report.failed else "")
        finally:
            rows.close()
            failures.close()
        report.errors = dict(errors)
        report.elapsed_s = time.perf_counter() - t_start
        _write_json(out / SUMMARY, {"generation": report.to_dict()})
    if not report.ok:
        raise GenerationFailed(report)
    return report


def _run_teacher(teacher: Teacher, todo: list[_Pair], sampling: dict,
                 batch_size: int) -> Iterator[tuple[_Pair, list]]:
    """Run every sample of every pair (local engines: `batch_size` requests per batch); yield each pair
    with its K results once all K are in."""
    k = sampling["num_samples"]

    def requests() -> Iterator[GenerationRequest]:
        for pair in todo:
            for j in range(k):
                yield GenerationRequest(
                    messages=pair.messages, max_new_tokens=sampling["max_new_tokens"],
                    temperature=sampling["temperature"], top_p=sampling["top_p"], stop=sampling["stop"],
                    seed=sample_seed(sampling["seed"], pair.prompt_hash, j),
                )

    collected: dict[int, dict[int, Any]] = {}
    for flat, result in _settled(teacher.engine, requests(), batch_size):
        p, j = divmod(flat, k)
        got = collected.setdefault(p, {})
        got[j] = result
        if len(got) == k:
            del collected[p]
            yield todo[p], [got[i] for i in range(k)]


def _row(pair: _Pair, results: list[GenerationResult], sampling: dict) -> dict:
    row = {
        "prompt_hash": pair.prompt_hash,
        "messages_hash": pair.messages_hash,
        "index": pair.index,
        "messages": pair.messages,
        "teacher": pair.teacher.name,
        "engine": pair.teacher.engine.name,
        "samples": [r.text for r in results],
        "finish_reasons": [r.finish_reason for r in results],
        "sampling": sampling,
        "seeds": [sample_seed(sampling["seed"], pair.prompt_hash, j) for j in range(len(results))],
        "timing": {"latency_s": [round(r.latency_s, 4) for r in results],
                   "ttft_s": [round(r.ttft_s, 4) for r in results],
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "usage": {"prompt_tokens": sum(r.prompt_tokens for r in results),
                  "completion_tokens": sum(r.completion_tokens for r in results)},
    }
    attempts = [getattr(r, "attempts", None) for r in results]
    if any(a is not None for a in attempts):
        row["attempts"] = attempts
    return row


def _write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically, merging into what the file already holds."""
    existing: dict = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            existing = {}
    existing.update(obj)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(existing, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
