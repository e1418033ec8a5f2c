"""Does the bench harness invent differences? The bundled demo teacher against an identical copy of itself.

The teacher folder is copied to a temporary folder (a different path, opened as a second engine), and
`slmops.bench.run.run_bench` measures both, interleaved in one process (A B, then B A, every prompt length,
every round), with warm-ups, repeats and medians. The acceptance criterion: the decode tokens/s ratio
(A / its identical copy B; the median of per-pair ratios of requests run back to back) is within 5% of 1.0.

Writes benchmarks/results/bench_identical.json (`ratio`, `within_5pct`, `ratios` for every measured key,
the full bench payload under `bench`, `machine`) and bench_identical.md. Usage:

    .venv/bin/python benchmarks/bench_identical.py [--repeats 30] [--threads 1] [--no-memory]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmops.bench.results import markdown_table, write_results  # noqa: E402
from slmops.bench.run import BenchConfig, bench_markdown, run_bench  # noqa: E402
from slmops.demo.teacher import BUNDLED_TEACHER_DIR  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompt-tokens", default="32,128")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadier on a shared machine; the ratio is what counts)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-model memory/load process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slmops-bench-identical-") as tmp:
        a = Path(tmp) / "teacher"
        b = Path(tmp) / "teacher-copy"
        shutil.copytree(BUNDLED_TEACHER_DIR, a)
        shutil.copytree(BUNDLED_TEACHER_DIR, b)
        cfg = BenchConfig(models=[str(a), str(b)], names=["A", "B"],
                          prompt_tokens=[int(x) for x in args.prompt_tokens.split(",")],
                          max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
                          threads=args.threads, memory=not args.no_memory)
        bench = run_bench(cfg, log=print)
    ratios = bench["ratios"]["A/B"]
    ratio = ratios["decode_tok_s"]
    within = abs(ratio - 1.0) <= 0.05
    payload = {
        "ratio": ratio,
        "within_5pct": within,
        "ratios": ratios,
        "what": "decode tokens/s of the bundled demo teacher (A) / an identical copy of it (B), interleaved",
        "settings": bench["config"],
        "seconds": time.perf_counter() - t0,
        "bench": bench,
        "machine": bench["machine"],
    }
    rows = [{"key": k, "A/B": v} for k, v in ratios.items()]
    body = (f"Decode tokens/s ratio A / B (identical models): **{ratio:.4f}** "
            f"({'within' if within else 'OUTSIDE'} 5% of 1.0).\n\n" + markdown_table(rows)
            + "\n## The bench run\n\n" + bench_markdown(bench))
    jpath, _ = write_results("bench_identical", payload, body, args.out)
    print(f"ratio (decode tok/s A / identical B) = {ratio:.4f}  {'OK, within 5%' if within else 'OUTSIDE 5%'}")
    print(f"wrote {jpath} in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
