"""`slmops bench`: latency, throughput, memory, size and load time of one or more models, side by side.

How it measures (docs/bench.md has the user-facing version):

- Every model is opened in ONE process and requests run in the order of
  :func:`slmops.bench.stats.interleaved_schedule`: each round runs every prompt length for every model,
  alternating A B per prompt length and reversing the order every other round, so drift on a noisy
  machine hits all models alike. Warm-up rounds are run and discarded.
- Each request is one streamed greedy generation through the Engine (``engine.stream``): time to first
  token, end-to-end latency, decode tokens/s ((tokens - 1) / (last token - first token)), prefill tokens/s
  (prompt tokens / TTFT) and process CPU time / wall time (CPU utilisation; 2.0 = two cores busy).
- Prompts of ~N tokens are demo-task text measured with each model's own tokenizer through its chat
  template (:mod:`slmops.bench.prompts`).
- With ``ignore_eos`` (the default) engines that expose ``eos_ids`` (torch, ort-genai) keep decoding to
  ``max_new_tokens``, so every model decodes the same number of tokens.
- Memory and load time come from a spawned process per model (:mod:`slmops.bench.memory`).
- Results: medians with [p25, p75] spread, per prompt length too, and ratios of the first model to each
  other one. The machine fingerprint is recorded; :func:`compare_results` refuses to compare results
  from different hardware.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.bench.prompts import BenchPrompt, build_prompt
from slmops.bench.results import machine_fingerprint, markdown_table
from slmops.bench.stats import interleaved_schedule, median, paired_ratio, percentile, ratio, spread
from slmops.engines.base import GenerationRequest
from slmops.errors import BadInputError

# the per-model keys of the contract (manifest metrics "bench" and bench.json rows)
BENCH_KEYS = ("decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s", "peak_rss_mb", "rss_growth", "cpu_util",
              "bytes_on_disk", "load_s")
RATIO_KEYS = ("decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s", "peak_rss_mb", "cpu_util", "bytes_on_disk",
              "load_s")
SAMPLED_KEYS = ("decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s")
# fingerprint fields that describe the hardware: results that differ here are never compared
HARDWARE_KEYS = ("cpu", "cores", "memory_gib", "machine", "torch_threads", "gpu")

Progress = Callable[..., contextlib.AbstractContextManager]


@dataclass
class BenchConfig:
    """What `run_bench` measures. `models`: artifact ids/aliases, folders, .gguf files or http(s) URLs."""

    models: list[str]
    names: list[str] | None = None
    prompt_tokens: list[int] = field(default_factory=lambda: [32, 128, 512])
    max_new_tokens: int = 64
    repeats: int = 5
    warmup: int = 2
    concurrency: list[int] = field(default_factory=list)
    concurrency_requests: int | None = None  # per level (default: max(2 x level, 8))
    concurrency_prompt_tokens: int | None = None  # default: the middle of prompt_tokens
    server: str | None = None  # run the concurrency levels against this server ("URL#model")
    api_key: str | None = None
    ignore_eos: bool = True
    memory: bool = True
    long_run: int | None = None  # requests in the leak check (default: max(20, repeats x prompt lengths))
    threads: int | None = None
    seed: int = 0

    def check(self) -> None:
        problems = []
        if not self.models:
            problems.append("give at least one --model")
        if self.names is not None and len(self.names) != len(self.models):
            problems.append("names must match models one to one")
        if not self.prompt_tokens or any(n < 1 for n in self.prompt_tokens):
            problems.append(f"--prompt-tokens must be positive integers, got {self.prompt_tokens}")
        if self.max_new_tokens < 2:
            problems.append("--max-new-tokens must be >= 2 (decode speed needs two tokens)")
        if self.repeats < 1:
            problems.append("--repeats must be >= 1")
        if self.warmup < 0:
            problems.append("--warmup must be >= 0")
        if any(c < 1 for c in self.concurrency):
            problems.append(f"--concurrency levels must be >= 1, got {self.concurrency}")
        if self.long_run is not None and self.long_run < 1:
            problems.append("--long-run must be >= 1")
        if self.server is not None and not self.server.startswith(("http://", "https://")):
            problems.append(f"--server must be an http(s) URL, got {self.server!r}")
        if problems:
            raise BadInputError("bad bench settings: " + "; ".join(problems),
                                "see `slmops bench --help`")


@dataclass
class Sample:
    ttft_s: float
    latency_s: float
    decode_tok_s: float | None
    prefill_tok_s: float | None
    prompt_tokens: int
    completion_tokens: int
    cpu_s: float
    wall_s: float


@contextlib.contextmanager
def eos_disabled(engine: Any, on: bool = True) -> Iterator[bool]:
    """While active, an engine that exposes ``eos_ids`` (torch, ort-genai) never stops at end-of-text, so
    every request decodes exactly ``max_new_tokens``. Yields whether it could."""
    if not on or not hasattr(engine, "eos_ids"):
        yield False
        return
    saved = engine.eos_ids
    engine.eos_ids = set()
    try:
        yield True
    finally:
        engine.eos_ids = saved


def measure_request(engine: Any, request: GenerationRequest) -> Sample:
    """One streamed generation: TTFT, latency, decode and prefill speed, process CPU time."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    first = last = None
    tokens = chunks = prompt_tokens = 0
    for ev in engine.stream(request):
        now = time.perf_counter()
        if ev.text:
            chunks += 1
        count = ev.completion_tokens or chunks  # remote streams carry text; their usage comes at the end
        if count > tokens:
            first = first if first is not None else now
            last = now
            tokens = count
        prompt_tokens = max(prompt_tokens, ev.prompt_tokens or 0)
    end = time.perf_counter()
    cpu = time.process_time() - cpu0
    ttft = (first if first is not None else end) - t0
    decode = (tokens - 1) / (last - first) if tokens > 1 and last is not None and last > first else None
    return Sample(ttft_s=ttft, latency_s=end - t0, decode_tok_s=decode,
                  prefill_tok_s=prompt_tokens / ttft if prompt_tokens and ttft > 0 else None,
                  prompt_tokens=prompt_tokens, completion_tokens=tokens, cpu_s=cpu, wall_s=end - t0)


def folder_bytes(path: str | Path) -> int | None:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.name != "slmops.json")
    return None


def artifact_id(workspace: Any, ref: str) -> str | None:
    """The id of the registered artifact behind `ref` (id, alias, or a folder inside the workspace), else
    None: metrics are only ever written into the workspace's own artifacts."""
    if workspace is None or ref.startswith(("http://", "https://")):
        return None
    try:
        hit = workspace.registry.lookup(ref)
        if hit is not None:
            return workspace.artifact_id(ref)
        p = Path(ref).expanduser()
        if p.exists() and p.resolve().is_relative_to(workspace.artifacts_dir) and (p / "slmops.json").exists():
            return workspace.artifact_id(p)
    except Exception:  # noqa: BLE001 - an unreadable registry means: not an artifact
        return None
    return None


def display_names(refs: list[str], workspace: Any = None) -> list[str]:
    """Short unique names: the artifact's name, the folder or file name, or the served model's name."""
    names = []
    for ref in refs:
        name = None
        aid = artifact_id(workspace, ref)
        if aid:
            try:
                name = workspace.manifest(aid).name
            except Exception:  # noqa: BLE001
                name = aid
            if ref != aid and not Path(ref).exists():
                name = ref  # an alias reads better than the artifact's name
        elif ref.startswith(("http://", "https://")):
            name = ref.split("#", 1)[1] if "#" in ref else ref.split("//", 1)[1].split("/", 1)[0]
        else:
            p = Path(ref)
            name = p.stem if p.suffix == ".gguf" else p.name or ref
        names.append(name or ref)
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 and names.count(n) == 1 else f"{n}#{seen[n]}")
    return out


# --- concurrency ---------------------------------------------------------------------------------------
def concurrency_inprocess(engine: Any, prompts: list[BenchPrompt], level: int, n_requests: int,
                          max_new_tokens: int) -> dict[str, Any]:
    """Keep `level` requests in flight through the server's own continuous-batching scheduler until
    `n_requests` are done: aggregate tokens/s and TTFT percentiles."""
    from slmops.serve.scheduler import Scheduler

    sched = Scheduler(engine, max_batch_size=max(1, level), max_queue=n_requests + level, name="bench")
    done: queue.Queue = queue.Queue()
    submitted_at: dict[int, float] = {}
    first_at: dict[int, float] = {}
    tokens: dict[int, int] = {}

    def deliver_for(i: int):
        def deliver(item) -> None:
            now = time.perf_counter()
            if item is None or isinstance(item, BaseException):
                done.put((i, item, now))
                return
            if item.completion_tokens >= 1 and i not in first_at:
                first_at[i] = now
            tokens[i] = max(tokens.get(i, 0), item.completion_tokens)
        return deliver

    def submit(i: int) -> None:
        submitted_at[i] = time.perf_counter()
        sched.submit(prompts[i % len(prompts)].request(max_new_tokens), deliver_for(i))

    t0 = time.perf_counter()
    try:
        nxt = 0
        while nxt < min(level, n_requests):
            submit(nxt)
            nxt += 1
        finished, t_end = 0, t0
        while finished < n_requests:
            i, err, now = done.get(timeout=600)
            if isinstance(err, BaseException):
                raise err
            finished += 1
            t_end = max(t_end, now)
            if nxt < n_requests:
                submit(nxt)
                nxt += 1
    finally:
        sched.close()
    ttfts = [first_at[i] - submitted_at[i] for i in first_at]
    total = sum(tokens.values())
    return {"concurrency": level, "requests": n_requests, "tokens": total, "wall_s": t_end - t0,
            "tok_s": total / (t_end - t0) if t_end > t0 else None,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95), "where": "in-process"}


def concurrency_server(url: str, prompts: list[BenchPrompt], level: int, n_requests: int, max_new_tokens: int,
                       api_key: str | None = None) -> dict[str, Any]:
    """The same against an OpenAI-compatible server (`URL#model`), streaming with the openai client."""
    import asyncio
    import os

    from openai import AsyncOpenAI

    from slmops.engines.openai_http import split_base_url

    base, model = split_base_url(url)
    key = api_key or os.environ.get("SLMOPS_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"

    async def main() -> dict[str, Any]:
        client = AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=600)
        name = model or (await client.models.list()).data[0].id
        ttfts: list[float] = []
        total = 0
        counter = iter(range(n_requests))

        async def worker() -> None:
            nonlocal total
            for i in counter:
                p = prompts[i % len(prompts)]
                msgs = p.messages or [{"role": "user", "content": p.prompt or ""}]
                t = time.perf_counter()
                first, chunks, usage = None, 0, None
                stream = await client.chat.completions.create(
                    model=name, messages=msgs, max_tokens=max_new_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                        chunks += 1
                        first = first or time.perf_counter()
                    if getattr(chunk, "usage", None):
                        usage = chunk.usage
                if first is not None:
                    ttfts.append(first - t)
                total += usage.completion_tokens if usage else chunks

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(level)))
        finally:
            await client.close()
        wall = time.perf_counter() - t0
        return {"concurrency": level, "requests": n_requests, "tokens": total, "wall_s": wall,
                "tok_s": total / wall if wall > 0 else None, "ttft_p50_s": percentile(ttfts, 50),
                "ttft_p95_s": percentile(ttfts, 95), "where": base}

    return asyncio.run(main())


# --- the run -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_progress(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    yield lambda n=1, **kw: None


def _summ(values: list[float | None]) -> tuple[float | None, list[float] | None]:
    vals = [v for v in values if v is not None]
    return median(vals), spread(vals)


def run_bench(cfg: BenchConfig, *, workspace: Any = None, progress: Progress | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark described by `cfg`; returns the bench.json payload (see the module docs).
    With a workspace, every model that is one of its artifacts gets the "bench" metrics in its manifest."""
    from slmops.bench.memory import memory_profile, preimport_engine_libraries
    from slmops.engines import open_engine

    cfg.check()
    progress = progress or _no_progress
    log = log or (lambda msg: None)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    names = cfg.names or display_names(cfg.models, workspace)
    ws_root = str(workspace.root) if workspace is not None else None
    long_run = cfg.long_run or max(20, cfg.repeats * len(cfg.prompt_tokens))
    notes: list[str] = []

    # 1. open every model in this process (a bad reference fails before anything is measured)
    engines, infos, load_inproc = [], [], []
    for ref in cfg.models:
        preimport_engine_libraries(ref, workspace)
        t = time.perf_counter()
        engine = open_engine(ref, workspace=workspace)
        load_inproc.append(time.perf_counter() - t)
        engines.append(engine)
        infos.append(engine.info())
    try:
        # 2. memory and load time, one spawned process per local model
        memory: dict[int, dict[str, Any]] = {}
        local = [i for i, m in enumerate(cfg.models) if not m.startswith(("http://", "https://"))]
        if cfg.memory and local:
            with progress("memory and load time (a fresh process per model)", total=len(local)) as advance:
                for i in local:
                    memory[i] = memory_profile(cfg.models[i], workspace=ws_root, prompt_tokens=cfg.prompt_tokens,
                                               max_new_tokens=cfg.max_new_tokens, warmup_rounds=max(1, cfg.warmup),
                                               long_run=long_run, ignore_eos=cfg.ignore_eos, threads=cfg.threads,
                                               seed=cfg.seed)
                    advance(1, status=names[i])
        return _run_opened(cfg, engines, infos, load_inproc, memory, names, notes, long_run, workspace,
                           progress, log)
    finally:
        for e in engines:
            with contextlib.suppress(Exception):
                e.close()


def _run_opened(cfg: BenchConfig, engines: list, infos: list, load_inproc: list[float], memory: dict,
                names: list[str], notes: list[str], long_run: int, workspace: Any, progress: Progress,
                log: Callable[[str], None]) -> dict[str, Any]:
    schedule = interleaved_schedule(len(engines), cfg.prompt_tokens, cfg.repeats, cfg.warmup)
    prompt_cache: dict[tuple[int, int, int], BenchPrompt] = {}

    def prompt_for(m: int, n: int, rnd: int) -> BenchPrompt:
        key = (m, n, rnd)
        if key not in prompt_cache:  # the same text for every model in a round, cut to each one's tokens
            prompt_cache[key] = build_prompt(engines[m], n, offset=rnd * 53, max_new_tokens=cfg.max_new_tokens,
                                             seed=cfg.seed)
        return prompt_cache[key]

    samples: dict[int, dict[int, list[Sample]]] = {m: {n: [] for n in cfg.prompt_tokens} for m in range(len(engines))}
    eos_ok = []
    with contextlib.ExitStack() as stack:
        for e in engines:
            eos_ok.append(stack.enter_context(eos_disabled(e, cfg.ignore_eos)))
        with progress("interleaved timing", total=len(schedule)) as advance:
            for step in schedule:
                p = prompt_for(step.model, step.prompt_tokens, step.round)
                s = measure_request(engines[step.model], p.request(cfg.max_new_tokens))
                if not step.warmup:
                    samples[step.model][step.prompt_tokens].append(s)
                advance(1, status=f"{'warm-up' if step.warmup else f'repeat {step.repeat + 1}'} "
                                  f"{names[step.model]} {step.prompt_tokens} tok")

        # concurrency
        conc_rows: list[dict[str, Any]] = []
        if cfg.concurrency:
            mid = cfg.concurrency_prompt_tokens or sorted(cfg.prompt_tokens)[len(cfg.prompt_tokens) // 2]
            targets: list[tuple[str, int | None, str | None]] = []  # (name, engine index, server url)
            if cfg.server:
                targets.append((cfg.server.split("#", 1)[1] if "#" in cfg.server else cfg.server, 0, cfg.server))
            else:
                for m, ref in enumerate(cfg.models):
                    remote = ref.startswith(("http://", "https://"))
                    targets.append((names[m], m, ref if remote else None))
            total = len(targets) * len(cfg.concurrency)
            with progress("concurrency", total=total) as advance:
                for name, m, url in targets:
                    prompts = [prompt_for(m or 0, mid, r) for r in range(8)]
                    for level in cfg.concurrency:
                        n_req = cfg.concurrency_requests or max(2 * level, 8)
                        if url:
                            row = concurrency_server(url, prompts, level, n_req, cfg.max_new_tokens, cfg.api_key)
                        else:
                            row = concurrency_inprocess(engines[m], prompts, level, n_req, cfg.max_new_tokens)
                        conc_rows.append({"model": name, **row, "prompt_tokens": mid})
                        advance(1, status=f"{name} c={level}")

    rows = []
    for m, (ref, info) in enumerate(zip(cfg.models, infos, strict=True)):
        every = [s for n in cfg.prompt_tokens for s in samples[m][n]]
        row: dict[str, Any] = {"model": ref, "name": names[m], "engine": info.name, "format": info.format,
                               "precision": info.precision, "parameters": info.parameters}
        sp: dict[str, list[float] | None] = {}
        for key in SAMPLED_KEYS:
            row[key], sp[key] = _summ([getattr(s, key) for s in every])
        remote = info.format == "remote"
        wall = sum(s.wall_s for s in every)
        row["cpu_util"] = None if remote or wall <= 0 else sum(s.cpu_s for s in every) / wall
        mem = memory.get(m) or {}
        row["peak_rss_mb"] = mem.get("peak_rss_mb")
        row["rss_growth"] = mem.get("rss_growth")
        row["bytes_on_disk"] = info.bytes_on_disk if info.bytes_on_disk else (None if remote else folder_bytes(info.path))
        row["load_s"] = mem.get("load_s", None if remote else load_inproc[m])
        row["spread"] = sp
        by = {}
        for n in cfg.prompt_tokens:
            ss = samples[m][n]
            entry: dict[str, Any] = {}
            for key in SAMPLED_KEYS:
                entry[key], _ = _summ([getattr(s, key) for s in ss])
            entry["prompt_tokens"] = median([s.prompt_tokens for s in ss]) if ss else None
            entry["completion_tokens"] = median([s.completion_tokens for s in ss]) if ss else None
            entry["capped"] = any(prompt_cache[k].capped for k in prompt_cache if k[0] == m and k[1] == n)
            by[str(n)] = entry
        row["by_prompt_tokens"] = by
        row["repeats"] = cfg.repeats
        row["samples"] = len(every)
        row["memory"] = {**mem, "load_s_in_bench_process": load_inproc[m],
                         "method": "spawned process per model" if mem else "not measured"}
        row["ignore_eos"] = bool(eos_ok[m])
        if cfg.ignore_eos and not eos_ok[m]:
            notes.append(f"{names[m]}: the {info.name} engine cannot ignore end-of-text; its answers may be shorter")
        capped = [n for n in cfg.prompt_tokens if by[str(n)]["capped"]]
        if capped:
            notes.append(f"{names[m]}: prompt lengths {capped} lowered to fit its context "
                         f"({info.context_length} tokens with {cfg.max_new_tokens} new tokens)")
        rows.append(row)

    # ratios of the first model to each other one: for the sampled keys, the median of per-pair ratios (the
    # two requests of a pair ran back to back, same round and prompt length), else plain value ratios
    ratios, ratios_of_medians = {}, {}
    for o in range(1, len(rows)):
        pair = f"{rows[0]['name']}/{rows[o]['name']}"
        ratios[pair] = {k: ratio(rows[0][k], rows[o][k]) for k in RATIO_KEYS}
        ratios_of_medians[pair] = {k: ratio(rows[0][k], rows[o][k]) for k in SAMPLED_KEYS}
        for k in SAMPLED_KEYS:
            a = [getattr(s, k) for n in cfg.prompt_tokens for s in samples[0][n]]
            b = [getattr(s, k) for n in cfg.prompt_tokens for s in samples[o][n]]
            ratios[pair][k] = paired_ratio(a, b)
    payload: dict[str, Any] = {
        "rows": rows, "ratios": ratios, "ratios_of_medians": ratios_of_medians, "concurrency": conc_rows,
        "config": {"prompt_tokens": cfg.prompt_tokens, "max_new_tokens": cfg.max_new_tokens,
                   "repeats": cfg.repeats, "warmup": cfg.warmup, "concurrency": cfg.concurrency,
                   "ignore_eos": cfg.ignore_eos, "long_run": long_run, "threads": cfg.threads,
                   "server": cfg.server.split("#")[0] if cfg.server else None,
                   "order": "interleaved: A B per prompt length, order reversed every other round",
                   "ratio_method": "median of per-pair ratios (requests run back to back) for ttft, latency, "
                                   "decode and prefill; value ratios for the rest"},
        "notes": notes,
        "machine": machine_fingerprint(),
    }
    if workspace is not None:
        for ref, row in zip(cfg.models, rows, strict=True):
            aid = artifact_id(workspace, ref)
            if aid:
                workspace.update_metrics(aid, {"bench": {k: row[k] for k in BENCH_KEYS}})
                row["artifact"] = aid
                log(f"bench metrics recorded in {aid}")
    return payload


# --- comparing results ------------------------------------------------------------------------------
def machine_differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(hardware differences, library differences) between two fingerprints, as readable lines."""
    hw = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in HARDWARE_KEYS if old.get(k) != new.get(k)]
    lo, ln = old.get("libraries") or {}, new.get("libraries") or {}
    libs = [f"{k}: {lo.get(k)} -> {ln.get(k)}" for k in sorted(set(lo) | set(ln)) if lo.get(k) != ln.get(k)]
    return hw, libs


def compare_results(old: dict[str, Any], new: dict[str, Any], *, force: bool = False,
                    warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """New / old ratios per model (matched by name) for `RATIO_KEYS`.

    Numbers from different hardware are never compared: a different CPU, core count, memory, architecture,
    torch thread count or GPU raises BadInputError, unless `force`, which still warns loudly. Different
    library versions only warn (that is often the point of the comparison)."""
    if "machine" not in old:
        raise BadInputError("the old results have no machine fingerprint, so they cannot be compared",
                            "rerun the old benchmark with this version of slmops")
    hw, libs = machine_differences(old["machine"], new["machine"])
    warn = warn or (lambda msg: None)
    if hw and not force:
        raise BadInputError(
            "refusing to compare benchmark results from different machines: " + "; ".join(hw),
            "rerun both on the same machine, or pass --force-compare to see the ratios anyway (they will "
            "mostly measure the hardware)")
    if hw:
        warn("WARNING: comparing results from DIFFERENT MACHINES (" + "; ".join(hw) + "): the ratios mostly "
             "measure the hardware")
    if libs:
        warn("note: library versions differ: " + "; ".join(libs))
    old_rows = {r["name"]: r for r in old.get("rows", [])}
    out = {}
    for r in new.get("rows", []):
        if r["name"] in old_rows:
            out[r["name"]] = {k: ratio(r.get(k), old_rows[r["name"]].get(k)) for k in RATIO_KEYS}
    return {"ratios_new_over_old": out, "hardware_differences": hw, "library_differences": libs,
            "old_generated": old.get("generated")}


# --- presentation ------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return ""
    return format(v, fmt) if isinstance(v, float) else str(v)


def _with_spread(r: dict[str, Any], key: str, scale: float = 1.0, fmt: str = ".3g") -> str:
    v, s = r.get(key), (r.get("spread") or {}).get(key)
    if v is None:
        return ""
    text = format(v * scale, fmt)
    return f"{text} [{format(s[0] * scale, fmt)}-{format(s[1] * scale, fmt)}]" if s else text


def summary_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One display row per model (strings), for the console table and the markdown."""
    return [{
        "model": r["name"], "engine": f"{r['engine']} {r['precision']}",
        "decode tok/s": _with_spread(r, "decode_tok_s", fmt=".4g"),
        "prefill tok/s": _with_spread(r, "prefill_tok_s", fmt=".4g"),
        "TTFT ms": _with_spread(r, "ttft_s", 1000), "latency ms": _with_spread(r, "latency_s", 1000),
        "CPU util": _f(r.get("cpu_util"), ".2f"),
        "peak RSS MB": _f(r.get("peak_rss_mb"), ".0f"),
        "RSS growth MB": _f(r.get("rss_growth"), ".1f"),
        "size MB": _f(r["bytes_on_disk"] / 1e6 if r.get("bytes_on_disk") else None, ".3g"),
        "load s": _f(r.get("load_s"), ".3g"),
    } for r in payload["rows"]]


def markdown_sections(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, markdown body) pairs: the summary (title ""), by prompt length, ratios, concurrency, the
    comparison and notes (those present)."""
    cfg = payload.get("config", {})
    sections = [("", (
        f"Greedy generation, {cfg.get('max_new_tokens')} new tokens"
        f"{' (end-of-text ignored)' if cfg.get('ignore_eos') else ''}; prompts of {cfg.get('prompt_tokens')} tokens; "
        f"{cfg.get('warmup')} warm-up rounds, {cfg.get('repeats')} repeats, models interleaved (A B, then B A). "
        "Medians with [p25-p75].\n\n" + markdown_table(summary_rows(payload))))]
    lengths = []
    for r in payload["rows"]:
        for n, e in r["by_prompt_tokens"].items():
            lengths.append({"model": r["name"], "prompt tokens": n, "actual": e.get("prompt_tokens"),
                            "TTFT ms": e["ttft_s"] * 1000 if e.get("ttft_s") is not None else None,
                            "latency ms": e["latency_s"] * 1000 if e.get("latency_s") is not None else None,
                            "decode tok/s": e.get("decode_tok_s"), "prefill tok/s": e.get("prefill_tok_s"),
                            "new tokens": e.get("completion_tokens")})
    sections.append(("By prompt length", markdown_table(lengths)))
    if payload.get("ratios"):
        rrows = [{"pair": k, **{key: v.get(key) for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s",
                                                             "peak_rss_mb", "bytes_on_disk", "load_s")}}
                 for k, v in payload["ratios"].items()]
        sections.append(("Ratios (first model / each other model)", markdown_table(rrows)))
    if payload.get("concurrency"):
        crow = [{"model": c["model"], "concurrency": c["concurrency"], "requests": c["requests"],
                 "tok/s": c["tok_s"], "TTFT p50 ms": c["ttft_p50_s"] * 1000 if c.get("ttft_p50_s") else None,
                 "TTFT p95 ms": c["ttft_p95_s"] * 1000 if c.get("ttft_p95_s") else None, "where": c["where"]}
                for c in payload["concurrency"]]
        sections.append(("Concurrency (aggregate throughput)", markdown_table(crow)))
    if payload.get("compared_to"):
        comp = payload["compared_to"]
        crows = [{"model": k, **v} for k, v in comp["ratios_new_over_old"].items()]
        sections.append((f"Compared to {comp.get('path')} (new / old)", markdown_table(crows)))
    if payload.get("notes"):
        sections.append(("Notes", "".join(f"- {n}\n" for n in payload["notes"])))
    return sections


def bench_markdown(payload: dict[str, Any]) -> str:
    return "".join(body if not title else f"\n## {title}\n\n{body}" for title, body in markdown_sections(payload))


def write_bench(payload: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """`<out>/bench.json` and `<out>/bench.md` (with the machine line)."""
    from slmops.bench.results import write_results

    return write_results("bench", payload, bench_markdown(payload), out_dir)
