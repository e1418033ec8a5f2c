"""Teacher vs student(s), side by side: task metric, size, speed, memory; retention and speed-up.

Quality is measured by batched greedy evaluation of each model in its own process (so its peak RSS is its
own); speed by single requests interleaved A B A B in one process (so drift on a noisy machine hits every
model alike). Ratios are against the reference model (the teacher).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.bench.results import markdown_table

COLUMNS = ["model", "parameters", "param_ratio", "size_mb", "exact_match", "retention", "field_accuracy",
           "json_valid", "median_latency_ms", "decode_tok_s", "decode_speedup", "peak_rss_mb"]


def compare_models(models: dict[str, str], test_path: str | Path, *, reference: str, workspace=None,
                   limit: int | None = None, latency_requests: int = 20, threads: int | None = None,
                   max_new_tokens: int = 96) -> dict[str, Any]:
    """Evaluate every model in `models` (name -> ref) on `test_path`; ratios against `reference`."""
    from slmops.data import load_dataset_file
    from slmops.engines import open_engine
    from slmops.evaluate.isolated import evaluate_in_subprocess
    from slmops.evaluate.runner import compare_latency

    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of {list(models)}")
    ws_root = str(workspace.root) if workspace is not None else None
    quality = {name: evaluate_in_subprocess(ref, test_path, workspace=ws_root, limit=limit, threads=threads,
                                            max_new_tokens=max_new_tokens)
               for name, ref in models.items()}
    records = load_dataset_file(test_path).records
    engines = {name: open_engine(ref, workspace=workspace) for name, ref in models.items()}
    speed = compare_latency(engines, records, n=latency_requests, max_new_tokens=max_new_tokens)
    ref_q, ref_s = quality[reference], speed[reference]
    rows = []
    for name in models:
        q, s = quality[name], speed[name]
        em = q["scores"]["exact_match"]
        rows.append({
            "model": name,
            "ref": str(models[name]),
            "parameters": q["parameters"],
            "param_ratio": q["parameters"] / ref_q["parameters"],
            "size_mb": (q["bytes_on_disk"] or 0) / 1e6,
            "exact_match": em,
            "retention": em / ref_q["scores"]["exact_match"] if ref_q["scores"]["exact_match"] else None,
            "field_accuracy": q["scores"].get("field_accuracy"),
            "json_valid": q["scores"]["json_valid"],
            "median_latency_ms": s["median_latency_s"] * 1000,
            "decode_tok_s": s["median_decode_tok_s"],
            "decode_speedup": s["median_decode_tok_s"] / ref_s["median_decode_tok_s"] if ref_s["median_decode_tok_s"] else None,
            "peak_rss_mb": q["peak_rss_mb"],
            "n": q["n"],
            "scores": q["scores"],
        })
    return {"reference": reference, "test": str(test_path), "rows": rows,
            "latency_requests": latency_requests}


def comparison_markdown(result: dict[str, Any]) -> str:
    rows = [{k: r.get(k) for k in COLUMNS} for r in result["rows"]]
    return (f"Reference: `{result['reference']}`; test file `{result['test']}` "
            f"({result['rows'][0]['n']} examples, greedy). Speed: median of {result['latency_requests']} single "
            "requests per model, interleaved.\n\n" + markdown_table(rows, COLUMNS))
