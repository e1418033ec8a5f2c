"""Fine-tuning benchmark: full vs LoRA vs QLoRA on the same base and data, and slmops' LoRA against a plain
PEFT + TRL SFTTrainer script on the same settings.

One run, on this machine:
  * data: the demo's `gifts` extension (two intents the base has never seen; a quarter of train/val is
    replayed base-task data), written by `slmops.demo.task.write_finetune_data`;
  * base: the bundled demo teacher (3.16M parameters, 100% on the base task, 0% on the new intents);
  * full / lora / qlora fine-tunes for the same number of steps, each in its own process (peak RSS is that
    process's VmHWM): trainable parameters, peak RSS, tokens/s, validation loss, and exact match on the new
    task's test split (the gain over the base) and on the base task (forgetting);
  * throughput: slmops LoRA and a plain PEFT + TRL `SFTTrainer` script with the same model, data, LoRA
    settings, batch size, sequence length, precision (fp32, no gradient checkpointing) and steps,
    interleaved A B A B ..., median tokens/s of each (non-padding tokens / train_runtime, as both report);
  * two adapters on one base: a second LoRA on the `subscriptions` extension; both adapters loaded on one
    base in one engine, each scored on both tasks (each should beat the base on its own task only).

Writes benchmarks/results/finetune.json and finetune.md. Usage:

    .venv/bin/python benchmarks/finetune.py [--steps 300] [--tp-steps 60] [--tp-repeats 3]
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
from slmops.demo.task import FinetuneSizes, write_finetune_data  # noqa: E402
from slmops.demo.teacher import BUNDLED_TEACHER_DIR  # noqa: E402
from slmops.evaluate.isolated import vm_hwm_mb  # noqa: E402

BASE = str(BUNDLED_TEACHER_DIR)
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)



def score(engine, path: str, limit: int) -> dict:
    from slmops.data import load_dataset_file
    from slmops.evaluate.runner import evaluate_engine

    records = load_dataset_file(path).records[:limit]
    return evaluate_engine(engine, records).scores


def engine_for(method: str, out: Path | None):
    """The trained model, merged: base + adapter (QLoRA: on the NF4-rounded base it trained with, dense, so it
    scores exactly the trained model at dense speed; bitsandbytes' CPU 4-bit inference is ~10x slower)."""
    from slmops.engines.torch_engine import TorchEngine
    from slmops.models.load import load_model, load_tokenizer

    if out is None:
        return TorchEngine(BASE)
    if method == "full":
        return TorchEngine(str(out))
    from peft import PeftModel

    if method == "qlora":
        from slmops.finetune.lora import load_nf4_rounded

        base = load_nf4_rounded(BASE)
    else:
        base = load_model(BASE, dtype="float32")
    model = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    return TorchEngine(model=model, tokenizer=load_tokenizer(BASE))


def _method_worker(method: str, cfg: dict, out: str, data: dict, limit: int, queue) -> None:
    try:
        import torch

        torch.set_num_threads(2)
        from slmops.finetune import FinetuneConfig, run_finetune

        rss0 = vm_hwm_mb()
        report = run_finetune(FinetuneConfig(**cfg), out)
        peak = vm_hwm_mb()
        engine = engine_for(method, Path(out))
        new, base = score(engine, data["test"], limit), score(engine, data["test_base"], limit)
        queue.put({"ok": True, "report": report.to_dict(), "peak_rss_mb": peak, "rss_before_mb": rss0,
                   "new": new, "base": base})
    except Exception as exc:  # reported in the results, not raised: one method failing keeps the others
        import traceback

        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]})


def run_method(method: str, cfg: dict, out: Path, data: dict, limit: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_method_worker, args=(method, cfg, str(out), data, limit, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def trl_lora_tokens_per_s(data_file: str, steps: int, lr: float, out: Path) -> float:
    """The plain PEFT + TRL script a user would write, on the same settings as slmops' LoRA run."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from slmops.data import load_dataset_file
    from slmops.models.load import load_model, load_tokenizer

    rows = [{"messages": r["messages"]} for r in load_dataset_file(data_file).records]
    tok = load_tokenizer(BASE)
    model = load_model(BASE, dtype="float32")
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, logging_steps=10, save_strategy="no",
        report_to=[], bf16=False, gradient_checkpointing=False, assistant_only_loss=True, max_length=512,
        packing=False, use_cpu=True, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        seed=0, disable_tqdm=True, eval_strategy="no",
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config)
    metrics = trainer.train().metrics
    return trainer.state.num_input_tokens_seen / metrics["train_runtime"]


def slmops_lora_tokens_per_s(data_file: str, steps: int, lr: float, out: Path) -> float:
    from slmops.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(model=BASE, data=data_file, method="lora", lora=LORA, max_steps=steps, lr=lr,
                         batch_size=8, val_fraction=0.0, tensorboard=False, save_every=10**6)
    return run_finetune(cfg, out).tokens_per_s


def two_adapters(work: Path, args, data_a: dict) -> dict:
    """LoRA adapters for `gifts` and `subscriptions` on one base, in one engine; each scored on both tasks."""
    from slmops.engines.torch_engine import TorchEngine
    from slmops.evaluate.runner import evaluate_engine
    from slmops.finetune import FinetuneConfig, run_finetune

    data_b = write_finetune_data(work / "data-subscriptions", "subscriptions", seed=0, sizes=SIZES, replay=0.25)
    adapters = {"gifts": work / "lora", "subscriptions": work / "lora-subscriptions"}
    if not (adapters["subscriptions"] / "adapter_model.safetensors").exists() or args.fresh:
        run_finetune(FinetuneConfig(model=BASE, data=str(Path(data_b["train"]).parent), method="lora", lora=LORA,
                                    max_steps=args.steps, lr=args.lora_lr, batch_size=8, eval_every=args.steps // 3,
                                    tensorboard=False), adapters["subscriptions"])
    from slmops.data import load_dataset_file

    tests = {"gifts": data_a["test"], "subscriptions": data_b["test"]}
    engine = TorchEngine(BASE, adapters={k: str(v) for k, v in adapters.items()})
    table: dict[str, dict[str, float]] = {}
    for model_name in ("base", "gifts", "subscriptions"):
        adapter = None if model_name == "base" else model_name
        table[model_name] = {}
        for task, path in tests.items():
            records = load_dataset_file(path).records[: args.limit]
            table[model_name][task] = evaluate_engine(engine, records, adapter=adapter).scores["exact_match"]
    own = all(table[t][t] > table["base"][t] for t in tests)
    other = all(table[a][t] <= table["base"][t] for a in tests for t in tests if a != t)
    return {"exact_match": table, "each_beats_base_on_own_task": own, "no_gain_on_other_task": other}


SIZES = FinetuneSizes(train=1000, val=100, test=200, test_base=200)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of every method")
    ap.add_argument("--full-lr", type=float, default=5e-4)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--tp-steps", type=int, default=60, help="steps of each throughput run")
    ap.add_argument("--tp-repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=200, help="test examples scored per task")
    ap.add_argument("--fresh", action="store_true", help="retrain (otherwise nothing is cached but the data)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "finetune")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    data = write_finetune_data(work / "data", "gifts", seed=0, sizes=SIZES, replay=0.25)
    data_dir = str(Path(data["train"]).parent)

    # the base model
    base_engine = engine_for("base", None)
    base_scores = {"new": score(base_engine, data["test"], args.limit),
                   "base": score(base_engine, data["test_base"], args.limit)}
    del base_engine
    log(f"base: exact match {base_scores['new']['exact_match']:.3f} on the new task, "
        f"{base_scores['base']['exact_match']:.3f} on the base task")

    # full / lora / qlora at equal steps
    common = dict(model=BASE, data=data_dir, max_steps=args.steps, batch_size=8, eval_every=max(1, args.steps // 3),
                  tensorboard=False, seed=0)
    methods = {
        "full": dict(common, method="full", lr=args.full_lr),
        "lora": dict(common, method="lora", lr=args.lora_lr, lora=LORA),
        "qlora": dict(common, method="qlora", lr=args.lora_lr, lora=LORA),
    }
    results: dict[str, dict] = {}
    from slmops.finetune.lora import qlora_unavailable_reason

    qlora_reason = qlora_unavailable_reason()
    for method, cfg in methods.items():
        if method == "qlora" and qlora_reason:
            results[method] = {"ok": False, "error": qlora_reason}
            continue
        log(f"{method}: training {args.steps} steps")
        results[method] = run_method(method, cfg, work / method, data, args.limit)
        r = results[method]
        if r["ok"]:
            log(f"{method}: exact match {r['new']['exact_match']:.3f} (new task), {r['base']['exact_match']:.3f} "
                f"(base task), {r['report']['tokens_per_s']:,.0f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB")
        else:
            log(f"{method}: FAILED {r['error']}")

    def gain(method: str) -> float | None:
        r = results.get(method, {})
        return r["new"]["exact_match"] - base_scores["new"]["exact_match"] if r.get("ok") else None

    rows = [{"method": "base", "trainable_params": 0, "trainable_share": 0.0, "peak_rss_mb": None,
             "tokens_per_s": None, "train_s": None, "val_loss": None,
             "exact_match_new": base_scores["new"]["exact_match"], "exact_match_base": base_scores["base"]["exact_match"],
             "json_valid_new": base_scores["new"]["json_valid"], "gain": 0.0}]
    for method, r in results.items():
        if not r.get("ok"):
            continue
        rep = r["report"]
        rows.append({"method": method, "trainable_params": rep["trainable_parameters"],
                     "trainable_share": rep["trainable_share"], "peak_rss_mb": round(r["peak_rss_mb"], 1),
                     "tokens_per_s": rep["tokens_per_s"], "train_s": rep["train_time_s"],
                     "val_loss": rep["val_loss"], "exact_match_new": r["new"]["exact_match"],
                     "exact_match_base": r["base"]["exact_match"], "json_valid_new": r["new"]["json_valid"],
                     "gain": gain(method)})
    full_gain, lora_gain = gain("full"), gain("lora")
    lora_gain_ratio = lora_gain / full_gain if (full_gain and lora_gain is not None) else None

    # throughput: slmops LoRA vs plain PEFT + TRL, interleaved
    log(f"throughput: slmops LoRA vs PEFT+TRL SFTTrainer, {args.tp_repeats} x {args.tp_steps} steps each")
    tp = {"slmops": [], "trl": []}
    for i in range(args.tp_repeats):
        order = ("slmops", "trl") if i % 2 == 0 else ("trl", "slmops")
        for who in order:
            fn = slmops_lora_tokens_per_s if who == "slmops" else trl_lora_tokens_per_s
            tp[who].append(fn(data["train"], args.tp_steps, args.lora_lr, work / f"tp-{who}"))
        log(f"  round {i + 1}: slmops {tp['slmops'][-1]:,.0f} tok/s, trl {tp['trl'][-1]:,.0f} tok/s")
    lora_vs_peft = statistics.median(tp["slmops"]) / statistics.median(tp["trl"])

    log("two adapters on one base")
    adapters = two_adapters(work, args, data) if results.get("lora", {}).get("ok") else None

    qlora = ({"status": "ok", **next(r for r in rows if r["method"] == "qlora")} if results.get("qlora", {}).get("ok")
             else {"status": results.get("qlora", {}).get("error", "not run")})
    payload = {
        "benchmark": "finetune",
        "task": "demo gifts extension (new intents gift_card, price_match; 25% base-task replay)",
        "base_model": "bundled demo teacher",
        "steps": args.steps,
        "lora_gain_ratio": lora_gain_ratio,
        "lora_vs_peft_throughput": lora_vs_peft,
        "throughput_runs": {k: [round(v, 1) for v in vals] for k, vals in tp.items()},
        "qlora": qlora,
        "rows": rows,
        "two_adapters": adapters,
        "settings": {"lora": LORA, "full_lr": args.full_lr, "lora_lr": args.lora_lr, "batch_size": 8,
                     "tp_steps": args.tp_steps, "tp_repeats": args.tp_repeats, "test_examples": args.limit},
        "checks": {"lora_gain_ratio>=0.95": (lora_gain_ratio or 0) >= 0.95,
                   "lora_vs_peft_throughput>=0.95": lora_vs_peft >= 0.95},
        "failures": {m: r for m, r in results.items() if not r.get("ok")},
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    cols = ["method", "trainable_params", "trainable_share", "peak_rss_mb", "tokens_per_s", "train_s", "val_loss",
            "exact_match_new", "exact_match_base", "gain"]
    md = (f"Base: bundled demo teacher; data: demo `gifts` extension; {args.steps} steps per method, batch 8.\n\n"
          + markdown_table(rows, cols)
          + f"\n\nLoRA gain / full gain: **{lora_gain_ratio:.3f}**" if lora_gain_ratio is not None else "")
    md += (f"\n\nslmops LoRA vs plain PEFT + TRL SFTTrainer throughput (median of {args.tp_repeats} interleaved runs "
           f"of {args.tp_steps} steps): **{lora_vs_peft:.3f}x** "
           f"({statistics.median(tp['slmops']):,.0f} vs {statistics.median(tp['trl']):,.0f} tokens/s)\n")
    if adapters:
        md += "\nTwo adapters on one base (exact match; rows: model, columns: task):\n\n"
        md += markdown_table([{"model": k, **v} for k, v in adapters["exact_match"].items()])
        md += (f"\n\neach adapter beats the base on its own task: {adapters['each_beats_base_on_own_task']}; "
               f"no gain on the other task: {adapters['no_gain_on_other_task']}\n")
    json_path, md_path = write_results("finetune", payload, md, args.out)
    log(f"wrote {json_path} and {md_path} ({payload['wall_s']:.0f} s)")
    print(json.dumps({k: payload[k] for k in ("lora_gain_ratio", "lora_vs_peft_throughput", "checks")}, indent=2))


if __name__ == "__main__":
    main()
