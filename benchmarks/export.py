"""Export benchmark: every format and precision, size against fp16, speed and memory through its Engine, and
for the trained demo teacher the quality kept.

One run, on this machine:
  * models: the bundled demo teacher (trained: quality rows) and the Qwen2.5-0.5B-shaped preset with random
    weights (size and speed only);
  * exports: ONNX (onnxruntime-genai builder) fp32 / int8 / int4, GGUF (llama.cpp converter + quantizer)
    f16 / q8_0 / q4_k_m / q4_0, and the torch source as the reference row;
  * each artifact is opened by its Engine in a fresh process: single-request decode tokens/s and time to
    first token (medians), peak RSS of that process (VmHWM);
  * the teacher's exports are measured against it on the demo test split by the export's own parity step:
    exact match retention, perplexity ratio, mean KL and top-1 agreement.

Writes benchmarks/results/export.json and export.md. Usage:

    .venv/bin/python benchmarks/export.py [--models teacher,qwen0.5b] [--requests 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmops.bench.results import markdown_table, write_results  # noqa: E402
from slmops.demo.task import DemoSizes, write_demo_data  # noqa: E402
from slmops.demo.teacher import BUNDLED_TEACHER_DIR  # noqa: E402
from slmops.evaluate.isolated import vm_hwm_mb  # noqa: E402

ONNX = ("fp32", "int8", "int4")
# (quant, token embedding type): q4_k_m as llama.cpp mixes it (embeddings q6_k), and with 4-bit embeddings
GGUF = (("f16", None), ("q8_0", None), ("q4_k_m", None), ("q4_k_m", "q4_k"), ("q4_0", None))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)



def _speed_worker(ref: str, prompts: list, n: int, max_new_tokens: int, queue) -> None:
    try:
        import torch

        torch.set_num_threads(2)
        from slmops.engines import GenerationRequest, open_engine

        engine = open_engine(ref)
        tps, ttft = [], []
        for i, msgs in enumerate(prompts[: n + 1]):
            res = engine.generate([GenerationRequest(messages=msgs, max_new_tokens=max_new_tokens)])[0]
            if i == 0:
                continue  # warm-up
            ttft.append(res.ttft_s)
            if res.decode_tokens_per_s:
                tps.append(res.decode_tokens_per_s)
        queue.put({"ok": True, "decode_tok_s": statistics.median(tps) if tps else None,
                   "ttft_s": statistics.median(ttft), "peak_rss_mb": vm_hwm_mb()})
    except Exception as exc:
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def speed(ref: str, prompts: list, n: int, max_new_tokens: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_speed_worker, args=(ref, prompts, n, max_new_tokens, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def qwen_shape(work: Path, zero_unused_rows: bool = False) -> Path:
    """The Qwen2.5-0.5B-shaped preset (real vocabulary size) with random weights and the demo tokenizer.

    `zero_unused_rows` (benchmarks/serve.py) zeroes the (tied) embedding rows past the tokenizer's vocabulary:
    their logits are then 0 while the real tokens' are random around 0, so greedy decoding picks tokens the
    tokenizer can print (streamed content, so a time to first token) instead of ids with no text. Same shape,
    size and compute per token."""
    out = work / "sources" / "qwen2.5-0.5b-shape"
    if (out / "config.json").exists():
        return out
    import torch

    from slmops.models.create import write_model_folder
    from slmops.models.load import load_tokenizer
    from slmops.models.presets import create_model

    tok = load_tokenizer(str(BUNDLED_TEACHER_DIR))
    model = create_model("qwen2.5-0.5b-shape", seed=0)
    for c in (model.config, model.generation_config):
        c.eos_token_id, c.pad_token_id, c.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    if zero_unused_rows:
        with torch.no_grad():
            model.get_input_embeddings().weight[len(tok):] = 0.0
    write_model_folder(model, tok, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="teacher,qwen0.5b")
    ap.add_argument("--requests", type=int, default=10, help="single requests per engine (after one warm-up)")
    ap.add_argument("--eval-limit", type=int, default=200, help="test records for the teacher's parity")
    ap.add_argument("--int4-block-size", type=int, default=128,
                    help="ONNX int4 block size (128: fewer scales, which weigh a lot in a 3M-parameter model)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "export")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    data = write_demo_data(work / "data", seed=0, sizes=DemoSizes(train=0, val=0, test=args.eval_limit, prompts=0,
                                                                  gold=0))
    from slmops.data import load_dataset_file
    from slmops.evaluate.runner import split_prompt_reference
    from slmops.export.gguf import export_gguf
    from slmops.export.onnx import export_onnx
    from slmops.models.load import model_info

    prompts, _ = split_prompt_reference(load_dataset_file(data["test"]).records[: args.requests + 1])
    models = {}
    if "teacher" in args.models:
        models["demo-teacher"] = (Path(BUNDLED_TEACHER_DIR), True, 96)
    if "qwen0.5b" in args.models:
        models["qwen2.5-0.5b-shape"] = (qwen_shape(work), False, 32)

    rows = []
    for name, (src, trained, new_tokens) in models.items():
        params = int(model_info(str(src))["params"])
        fp16 = params * 2
        log(f"{name}: {params:,} parameters; torch reference")
        s = speed(str(src), prompts, args.requests, new_tokens)
        rows.append({"model": name, "format": "torch", "precision": "fp32", "size_mb": round(params * 4 / 1e6, 2),
                     "size_ratio_vs_fp16": 2.0, **{k: s.get(k) for k in ("decode_tok_s", "ttft_s", "peak_rss_mb")},
                     "exact_match_retention": 1.0 if trained else None, "ppl_ratio": 1.0 if trained else None})
        exports = [("onnx", p, None) for p in ONNX] + [("gguf", q, e) for q, e in GGUF]
        for fmt, quant, emb in exports:
            prec = quant + (f"+emb_{emb}" if emb else "")
            out = work / name / (f"onnx-{prec}" if fmt == "onnx" else f"{prec}.gguf")
            t = time.perf_counter()
            try:
                if fmt == "onnx":
                    res = export_onnx(str(src), out, precision=prec, force=True, int4_block_size=args.int4_block_size,
                                      **({"eval_records": load_dataset_file(data["test"]).records} if trained else {}))
                    size = res.size_bytes
                else:
                    res = export_gguf(str(src), out, quant=quant, token_embedding_type=emb, force=True, measure=trained,
                                      eval_file=data["test"] if trained else None, eval_limit=args.eval_limit)
                    size = res.bytes
            except Exception as exc:  # a failed export is a row, not a crash
                log(f"  {fmt} {prec}: FAILED {type(exc).__name__}: {exc}")
                rows.append({"model": name, "format": fmt, "precision": prec, "error": f"{type(exc).__name__}: {exc}"})
                continue
            build_s = time.perf_counter() - t
            parity = res.parity.to_dict() if res.parity is not None and hasattr(res.parity, "to_dict") else res.parity
            s = speed(str(out), prompts, args.requests, new_tokens)
            row = {"model": name, "format": fmt, "precision": prec, "size_mb": round(size / 1e6, 2),
                   "size_ratio_vs_fp16": round(size / fp16, 4), "size_reduction_vs_fp16": round(1 - size / fp16, 4),
                   "decode_tok_s": s.get("decode_tok_s"), "ttft_s": s.get("ttft_s"), "peak_rss_mb": s.get("peak_rss_mb"),
                   "build_s": round(build_s, 1)}
            if trained and parity:
                row.update({"exact_match_retention": parity.get("exact_match_retention"),
                            "ppl_ratio": parity.get("ppl_ratio"), "mean_kl": parity.get("mean_kl"),
                            "top1_agreement": parity.get("top1_agreement")})
            if not s.get("ok"):
                row["error"] = s.get("error")
            rows.append(row)
            log(f"  {fmt} {prec}: {size / 1e6:.1f} MB ({size / fp16:.2f}x fp16), "
                f"{row['decode_tok_s'] or 0:,.0f} tok/s" + (f", retention {row.get('exact_match_retention')}"
                                                             if trained else ""))
        if name != "demo-teacher":  # GBs of random weights: not worth keeping
            shutil.rmtree(work / name, ignore_errors=True)
            shutil.rmtree(work / "sources", ignore_errors=True)

    def row(model, fmt, prec):
        return next((r for r in rows if (r["model"], r["format"], r["precision"]) == (model, fmt, prec)), {})

    checks = {}
    for fmt, prec in (("onnx", "int4"), ("gguf", "q4_k_m"), ("gguf", "q4_k_m+emb_q4_k")):
        r = row("demo-teacher", fmt, prec)
        if r:
            checks[f"{fmt} {prec}: >=70% smaller than fp16"] = (r.get("size_reduction_vs_fp16") or 0) >= 0.70
            checks[f"{fmt} {prec}: keeps >=98% exact match"] = (r.get("exact_match_retention") or 0) >= 0.98
        q = row("qwen2.5-0.5b-shape", fmt, prec)
        if q:
            checks[f"qwen0.5b {fmt} {prec}: >=70% smaller than fp16"] = (q.get("size_reduction_vs_fp16") or 0) >= 0.70
    payload = {"benchmark": "export", "rows": rows, "checks": checks, "requests": args.requests,
               "int4_block_size": args.int4_block_size, "eval_limit": args.eval_limit,
               "wall_s": round(time.perf_counter() - t_all, 1)}
    cols = ["model", "format", "precision", "size_mb", "size_ratio_vs_fp16", "decode_tok_s", "ttft_s", "peak_rss_mb",
            "exact_match_retention", "ppl_ratio", "mean_kl", "top1_agreement"]
    md = (f"Single requests through each format's Engine (median of {args.requests} after a warm-up; 2 threads); "
          f"teacher quality on {args.eval_limit} demo test records.\n\n" + markdown_table(rows, cols)
          + "\n\nChecks: " + json.dumps(checks, indent=1) + "\n")
    json_path, md_path = write_results("export", payload, md, args.out)
    log(f"wrote {json_path} and {md_path} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
