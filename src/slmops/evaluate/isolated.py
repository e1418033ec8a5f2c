"""Evaluate a model in a fresh process, so its peak memory is its own and measured the same way for
every model."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any


def vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM). Unlike ru_maxrss, it is reset by exec, so a spawned
    worker does not report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(ref: str, test_path: str, workspace: str | None, limit: int | None, max_new_tokens: int,
            threads: int | None) -> dict[str, Any]:
    import torch

    from slmops.data import load_dataset_file
    from slmops.engines import open_engine
    from slmops.evaluate.runner import evaluate_engine
    from slmops.workspace import Workspace

    if threads:
        torch.set_num_threads(threads)
    base_mb = vm_hwm_mb()
    records = load_dataset_file(test_path).records
    if limit:
        records = records[:limit]
    engine = open_engine(ref, workspace=Workspace(workspace) if workspace else None)
    info = engine.info()
    result = evaluate_engine(engine, records, max_new_tokens=max_new_tokens)
    peak_mb = vm_hwm_mb()
    return {
        "scores": result.scores,
        "n": result.n,
        "answers_per_s": result.answers_per_s,
        "examples": result.examples,
        "parameters": info.parameters,
        "bytes_on_disk": info.bytes_on_disk,
        "engine": info.name,
        "precision": info.precision,
        "peak_rss_mb": peak_mb,
        "runtime_rss_mb": base_mb,  # the process with torch imported, before the model
    }


def evaluate_in_subprocess(ref: str | Path, test_path: str | Path, *, workspace: str | Path | None = None,
                           limit: int | None = None, max_new_tokens: int = 96,
                           threads: int | None = None) -> dict[str, Any]:
    """Batched greedy evaluation of `ref` on `test_path` in a spawned process; scores plus peak RSS."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_worker, (str(ref), str(test_path), str(workspace) if workspace else None, limit,
                                    max_new_tokens, threads))
