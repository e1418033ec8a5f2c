"""Memory and load time of one model, measured in a spawned process of its own.

Peak RSS is a per-process number: in a process that has loaded two models it belongs to neither. So each
model is opened in a fresh (spawned) process that first imports its engine's libraries, then opens the
model (load time, RSS added by the load), runs the warm-up, then a long run of requests; RSS after the
warm-up vs after the long run is the leak check, VmHWM at the end the peak.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Current resident memory of this process (VmRSS), MB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (VmHWM, reset by exec so a spawned process has its own), MB."""
    value = _status_mb("VmHWM")
    if value is None:
        import resource

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return value


def preimport_engine_libraries(ref: str, workspace=None) -> str | None:
    """Import the libraries of the engine that will open `ref`, so a load time excludes library imports.
    Returns the engine kind (None if unknown)."""
    from slmops.engines import engine_kind

    if ref.startswith(("http://", "https://")):
        return "openai-http"
    path = None
    if workspace is not None:
        try:
            path = workspace.resolve(ref)
        except Exception:  # noqa: BLE001 - best effort
            path = None
    if path is None and Path(ref).expanduser().exists():
        path = Path(ref).expanduser()
    if path is None:
        return None
    try:
        kind = engine_kind(path)
    except Exception:  # noqa: BLE001
        return None
    if kind in ("torch", "adapter"):
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        import slmops.engines.torch_engine  # noqa: F401
    elif kind == "ort-genai":
        import onnxruntime_genai  # noqa: F401

        import slmops.engines.ortgenai_engine  # noqa: F401
    elif kind == "llama.cpp":
        import llama_cpp  # noqa: F401

        import slmops.engines.llamacpp_engine  # noqa: F401
    return kind


def _worker(ref: str, workspace: str | None, prompt_tokens: list[int], max_new_tokens: int, warmup_rounds: int,
            long_run: int, ignore_eos: bool, threads: int | None, seed: int) -> dict[str, Any]:
    if threads:
        import torch

        torch.set_num_threads(threads)
    from slmops.bench.prompts import build_prompt
    from slmops.bench.run import eos_disabled, measure_request
    from slmops.engines import open_engine
    from slmops.workspace import Workspace

    ws = Workspace(workspace) if workspace else None
    preimport_engine_libraries(ref, ws)
    runtime = rss_mb()
    t0 = time.perf_counter()
    engine = open_engine(ref, workspace=ws)
    load_s = time.perf_counter() - t0
    loaded = rss_mb()
    prompts = [build_prompt(engine, n, offset=0, max_new_tokens=max_new_tokens, seed=seed) for n in prompt_tokens]
    with eos_disabled(engine, ignore_eos):
        for _ in range(warmup_rounds):
            for p in prompts:
                measure_request(engine, p.request(max_new_tokens))
        after_warmup = rss_mb()
        samples = []
        for i in range(long_run):
            samples.append(measure_request(engine, prompts[i % len(prompts)].request(max_new_tokens)))
    end = rss_mb()
    return {
        "load_s": load_s,
        "runtime_rss_mb": runtime,
        "load_rss_mb": None if loaded is None or runtime is None else loaded - runtime,
        "rss_after_warmup_mb": after_warmup,
        "rss_end_mb": end,
        "rss_growth": None if end is None or after_warmup is None else end - after_warmup,
        "peak_rss_mb": peak_rss_mb(),
        "long_run_requests": long_run,
        "long_run_tokens": sum(s.completion_tokens for s in samples),
    }


def memory_profile(ref: str, *, workspace: str | Path | None = None, prompt_tokens: list[int], max_new_tokens: int,
                   warmup_rounds: int, long_run: int, ignore_eos: bool = True, threads: int | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Load time, RSS and the leak check for `ref`, in a spawned process (see the module docs)."""
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(1)
    try:
        return pool.apply(_worker, (str(ref), str(workspace) if workspace else None, list(prompt_tokens),
                                    max_new_tokens, warmup_rounds, long_run, ignore_eos, threads, seed))
    finally:  # close + join (not terminate): the worker exits cleanly and leaves no semaphores behind
        pool.close()
        pool.join()
