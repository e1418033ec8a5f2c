"""A workspace with the demo's life cycle laid out as artifacts (no training: small files and the metrics each
stage stores), plus eval.json / bench.json files in the shapes `slmops eval --out` and `slmops bench --out`
write. The shapes are the contract between eval, bench and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.workspace import Workspace

MACHINE = {"cpu": "Test CPU 9000", "cores": 2, "torch_threads": 2, "memory_gib": 7.7, "os": "Linux 6", "machine": "x86_64",
           "libraries": {"python": "3.11.2", "torch": "2.13.0", "transformers": "5.1"}, "gpu": None}


def _artifact(ws: Workspace, kind: str, name: str, parents: list[str], size: int, metrics: dict | None = None,
              config: dict | None = None, filename: str = "model.safetensors") -> str:
    with ws.create_artifact(kind, name, parents=parents, metrics=metrics or {}, config=config or {}) as w:
        (w.path / filename).write_bytes(b"\0" * size)
        return w.id


def eval_metrics(data: str, em: float, ci: tuple[float, float], n: int, **more: float) -> dict:
    scores: dict = {"exact_match": em, "exact_match_ci": list(ci), "n": n, "template": "chatml (tokenizer_config.json)"}
    for k, v in more.items():
        scores[k] = v
        scores[f"{k}_ci"] = [round(v - 0.02, 4), round(min(v + 0.02, 1.0), 4)]
    return {data: scores}


def bench_metrics(decode: float, ttft: float, latency: float, rss: float, size: int) -> dict:
    return {"decode_tok_s": decode, "prefill_tok_s": decode * 8, "ttft_s": ttft, "latency_s": latency, "peak_rss_mb": rss,
            "rss_growth": 0.01, "cpu_util": 1.9, "bytes_on_disk": size, "load_s": 0.4}


@pytest.fixture()
def lifecycle_ws(tmp_path) -> tuple[Workspace, dict[str, str]]:
    """teacher -> distill data -> student -> adapter -> onnx int4 / gguf q4_k_m, plus the test data.

    eval + gates on teacher, student, onnx-int4 and gguf (gguf fails a gate); bench on teacher, student and
    the two exports; the adapter has recorded scores only (no eval, no bench)."""
    ws = Workspace(tmp_path / "ws")
    ids: dict[str, str] = {}
    data_dir = tmp_path / "demo-data"
    data_dir.mkdir()
    (data_dir / "test.jsonl").write_text('{"messages": []}\n')
    ids["data"] = ws.import_folder(data_dir, "dataset", "demo-triage-seed0").id
    ids["teacher"] = _artifact(ws, "model", "demo-teacher", [], 12_000_000,
                               {"parameters": 3_164_416, "train_wall_time_s": 3164.5})
    ws.registry.set_alias("demo-teacher", ids["teacher"])
    ids["synthetic"] = _artifact(ws, "dataset", "distill-synthetic", [ids["teacher"]], 1000,
                                 {"examples": 2000, "filters": {"total": 2000, "kept": 1990}}, filename="train.jsonl")
    ids["student"] = _artifact(ws, "model", "student", [ids["teacher"], ids["synthetic"]], 2_000_000,
                               {"parameters": 494_208, "train_loss": 0.0021, "tokens_per_s": 22820.5, "retention": 0.97,
                                "decode_speedup": 3.1})
    ids["adapter"] = _artifact(ws, "adapter", "student-lora-gifts", [ids["student"]], 300_000,
                               {"parameters": 568_192, "trainable_parameters": 73_984, "exact_match_new_task": 0.945,
                                "peak_rss_mb": 714.2}, filename="adapter_model.safetensors")
    parity = {"size_bytes": 354_512, "source_fp16_bytes": 988_416, "size_ratio_vs_fp16": 0.3587, "ppl_source": 239.9,
              "ppl_candidate": 237.0, "ppl_ratio": 0.9880, "mean_kl": 0.0408, "top1_agreement": 0.9441,
              "exact_match_source": 0.93, "exact_match_candidate": 0.92, "exact_match_retention": 0.9892,
              "n_texts": 100, "n_records": 100, "n_kl_tokens": 9158}
    ids["onnx"] = _artifact(ws, "export", "onnx-int4", [ids["student"], ids["adapter"]], 354_512,
                            {**parity, "parameters": 494_208}, {"precision": "int4"}, filename="model.onnx")
    ids["gguf"] = _artifact(ws, "export", "model-q4_k_m", [ids["student"], ids["adapter"]], 513_472,
                            {"bytes": 513_472, "size_ratio_vs_fp16": 0.5195,
                             "parity": {**parity, "size_ratio_vs_fp16": 0.5195, "mean_kl": 0.0063,
                                        "exact_match_candidate": 0.93, "exact_match_retention": 1.0},
                             "tokenizer_agreement": {"texts": 106, "identical": 106, "rate": 1.0}},
                            {"quant": "q4_k_m"}, filename="model.gguf")
    ok = {"passed": True, "data": "test", "checks": [
        {"expr": "exact_match>=0.9", "metric": "exact_match", "value": 0.97, "threshold": 0.9, "passed": True,
         "reason": "exact_match 0.97 >= 0.9"}]}
    for key, em, ci, f1, bench in [
        ("teacher", 1.0, (0.99, 1.0), 0.998, bench_metrics(322.9, 0.0050, 0.1205, 640.0, 12_000_000)),
        ("student", 0.97, (0.95, 0.985), 0.991, bench_metrics(1004.0, 0.0021, 0.0388, 410.0, 2_000_000)),
        ("onnx", 0.92, (0.89, 0.95), 0.97, bench_metrics(1500.0, 0.0015, 0.0301, 250.0, 354_512)),
        ("gguf", 0.8765, (0.84, 0.91), 0.96, bench_metrics(2100.0, 0.0011, 0.0205, 120.0, 513_472)),
    ]:
        gates = ok
        if key == "gguf":
            gates = {"passed": False, "data": "test", "checks": [
                {"expr": "exact_match>=0.9", "metric": "exact_match", "value": em, "threshold": 0.9, "passed": False,
                 "reason": "exact_match 0.8765 < 0.9 (short by 0.0235)"},
                {"expr": "json_valid>=0.99", "metric": "json_valid", "value": 1.0, "threshold": 0.99, "passed": True,
                 "reason": "json_valid 1 >= 0.99"}]}
        ws.update_metrics(ids[key], {"eval": eval_metrics("test", em, ci, 300, token_f1=f1, json_valid=1.0),
                                     "gates": gates, "bench": bench})
    return ws, ids


@pytest.fixture()
def result_files(tmp_path, lifecycle_ws) -> tuple[Path, Path]:
    """eval.json and bench.json (contract shapes): the student by alias and a remote endpoint not in the workspace."""
    ws, ids = lifecycle_ws
    ws.registry.set_alias("candidate", ids["student"])
    ev_dir, b_dir = tmp_path / "ev", tmp_path / "b"
    ev_dir.mkdir()
    b_dir.mkdir()
    url = "http://127.0.0.1:8000/v1#support"
    ev = {"data": str(tmp_path / "data" / "hard.jsonl"), "metrics": ["exact_match", "rouge_l"],
          "models": [
              {"model": "candidate", "name": "student", "engine": "torch", "format": "hf", "precision": "fp32",
               "template": "chat_template from tokenizer_config.json",
               "scores": {"exact_match": {"value": 0.81, "low": 0.765, "high": 0.85, "n": 200},
                          "rouge_l": {"value": 0.9312, "low": 0.918, "high": 0.944, "n": 200}},
               "gates": [{"expr": "exact_match>=0.8", "metric": "exact_match", "value": 0.81, "threshold": 0.8,
                          "passed": True, "reason": "exact_match 0.81 >= 0.8"}]},
              {"model": url, "name": "support@server", "engine": "openai-http", "format": "remote", "precision": "?",
               "template": "server-side",
               "scores": {"exact_match": {"value": 0.79, "low": 0.74, "high": 0.835, "n": 200},
                          "rouge_l": {"value": 0.925, "low": 0.91, "high": 0.94, "n": 200}},
               "gates": [{"expr": "exact_match>=0.8", "metric": "exact_match", "value": 0.79, "threshold": 0.8,
                          "passed": False, "reason": "exact_match 0.79 < 0.8 (short by 0.01)"}]}],
          "machine": MACHINE}
    (ev_dir / "eval.json").write_text(json.dumps(ev))
    rows = []
    for model, name, decode in (("candidate", "student", 980.0), (url, "support@server", 450.0)):
        rows.append({"model": model, "name": name, "engine": "torch" if model == "candidate" else "openai-http",
                     "format": "hf", "precision": "fp32", **bench_metrics(decode, 0.003, 0.05, 300.0, 2_000_000),
                     "spread": {"decode_tok_s": [decode * 0.97, decode * 1.02], "ttft_s": [0.0028, 0.0033],
                                "latency_s": [0.048, 0.053]},
                     "by_prompt_tokens": {"16": {"ttft_s": 0.002, "latency_s": 0.045, "decode_tok_s": decode},
                                          "256": {"ttft_s": 0.006, "latency_s": 0.061, "decode_tok_s": decode * 0.9}},
                     "repeats": 5})
    bench = {"rows": rows, "ratios": {"student/support@server": {"decode_tok_s": 2.178, "ttft_s": 1.0}},
             "concurrency": [{"model": url, "concurrency": 4, "tok_s": 1500.0, "ttft_p50_s": 0.01, "ttft_p95_s": 0.02}],
             "machine": MACHINE}
    (b_dir / "bench.json").write_text(json.dumps(bench))
    return ev_dir / "eval.json", b_dir / "bench.json"
