"""Throughput of the openai-http teacher against --concurrency.

Runs the test suite's fake OpenAI-compatible server (tests/support/fake_openai.py) with a fixed latency per
request, standing in for a serving engine whose batches keep per-request latency roughly flat (vLLM with
spare batch capacity), and times `OpenAIHTTPEngine.generate` over the same requests at several
concurrency levels. With latency L and concurrency C the ceiling is C / L requests per second, until the
client or the machine is the bottleneck.

    .venv/bin/python benchmarks/distill_http_concurrency.py [--latency 0.1] [--requests 128]

Writes benchmarks/results/distill_http_concurrency.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location("fake_openai", ROOT / "tests" / "support" / "fake_openai.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    from slmops.engines import GenerationRequest
    from slmops.engines.openai_http import OpenAIHTTPEngine

    levels = [int(x) for x in args.levels.split(",")]
    rows = []
    with fake.FakeServer(latency=args.latency) as srv:
        for c in levels:
            n = min(args.requests, max(16, 8 * c))  # keep the sequential case short
            reqs = [GenerationRequest(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(n)]
            eng = OpenAIHTTPEngine(srv.url, concurrency=c, max_retries=0)
            eng.generate(reqs[:2])  # model lookup, warm connections
            rates = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                eng.generate(reqs)
                rates.append(n / (time.perf_counter() - t0))
            rows.append({"concurrency": c, "requests": n, "req_per_s_median": round(statistics.median(rates), 1),
                         "ceiling_req_per_s": round(c / args.latency, 1)})
            print(rows[-1], flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "distill_http_concurrency", "latency_s": args.latency, "machine": machine,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (out / "distill_http_concurrency.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# openai-http teacher: throughput vs --concurrency ({args.latency:g} s per request, fake server)", "",
          f"Machine: {machine}; {result['date']}; median of {args.repeats} runs.", "",
          "| concurrency | requests | req/s | ceiling C/L |", "| ---: | ---: | ---: | ---: |"]
    md += [f"| {r['concurrency']} | {r['requests']} | {r['req_per_s_median']} | {r['ceiling_req_per_s']} |" for r in rows]
    (out / "distill_http_concurrency.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
