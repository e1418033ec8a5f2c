"""Hyperparameter-search benchmark: a 4-trial `slmops tune` on the demo, its wall time, and whether its best
recipe reproduces the best trial's score when rerun with `slmops finetune --config best.yaml`.

One run, on this machine:
  * data: the demo's `gifts` extension (two intents the base never saw, 25% replayed base-task data);
  * base: the bundled demo teacher; LoRA, 100 steps of 16 rows per trial, validation every 20 steps
    (feeding the median pruner);
  * search: learning rate (log), LoRA rank, alpha and dropout, TPE sampler; objective: exact match of
    greedy answers on 100 validation records;
  * the whole search is timed (the target: under 10 minutes for 4 trials), then `best.yaml` is trained
    again through the CLI (`slmops finetune --config`) and scored on the same records.

Writes benchmarks/results/tune.json and tune.md. Usage:

    .venv/bin/python benchmarks/tune.py [--trials 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slmops.bench.results import markdown_table, write_results  # noqa: E402
from slmops.demo.task import FinetuneSizes, write_finetune_data  # noqa: E402
from slmops.demo.teacher import BUNDLED_TEACHER_DIR  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "tune")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    work = args.work
    if work.exists():
        shutil.rmtree(work)  # a fresh study every run (a kept one would resume instead of searching)
    work.mkdir(parents=True)
    data = write_finetune_data(work / "data", "gifts", seed=0, sizes=FinetuneSizes(train=1000, val=100, test=0,
                                                                                     test_base=0))
    hpo = {
        "recipe": {
            "model": str(BUNDLED_TEACHER_DIR), "method": "lora", "data": str(Path(data["train"]).parent),
            "max_steps": args.steps, "batch_size": 16, "eval_every": 20, "save_every": 20, "logging_steps": 20,
            "tensorboard": False, "seed": 0, "lora": {"r": 8, "alpha": 16},
        },
        "search_space": {
            "lr": {"type": "log", "low": 5e-4, "high": 1e-2},
            "lora.r": {"type": "choice", "values": [4, 8, 16]},
            "lora.alpha": {"type": "choice", "values": [8, 16, 32]},
            "lora.dropout": {"type": "float", "low": 0.0, "high": 0.1},
        },
        "objective": "exact_match", "eval_limit": args.eval_limit, "sampler": "tpe", "pruner": "median",
        "pruner_startup_trials": 2, "n_trials": args.trials, "seed": 0,
    }
    import yaml

    hpo_file = work / "hpo.yaml"
    hpo_file.write_text(yaml.safe_dump(hpo, sort_keys=False))

    # the search, through the CLI as a user runs it
    env_py = [sys.executable, "-m", "slmops", "-q"]
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    log(f"slmops tune: {args.trials} trials")
    t0 = time.perf_counter()
    proc = subprocess.run(env_py + ["tune", "--config", str(hpo_file), "--out", str(work / "hpo"), "--json"],
                          capture_output=True, text=True, env=env)
    tune_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"slmops tune failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    log(f"tune: {tune_s:.0f} s, best trial {summary['best_trial']} exact match {summary['best_value']:.3f}")

    # the best recipe, retrained with `slmops finetune --config` and scored on the same records
    best_yaml = Path(summary["best_config_file"])
    t0 = time.perf_counter()
    proc = subprocess.run(env_py + ["-w", str(work / "ws"), "finetune", "--config", str(best_yaml), "--out",
                                    str(work / "rerun"), "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"slmops finetune --config best.yaml failed:\n{proc.stderr[-3000:]}")
    rerun_s = time.perf_counter() - t0
    from slmops.config import load_yaml_config
    from slmops.data import load_dataset_file
    from slmops.finetune.config import FinetuneConfig
    from slmops.finetune.tune import task_scores

    cfg = load_yaml_config(best_yaml, FinetuneConfig)
    records = load_dataset_file(data["val"]).records[: args.eval_limit]
    rerun_score = task_scores(cfg, work / "rerun", records, base_ref=str(BUNDLED_TEACHER_DIR))["exact_match"]
    diff = rerun_score - summary["best_value"]
    log(f"rerun of best.yaml: exact match {rerun_score:.3f} ({diff:+.3f}), {rerun_s:.0f} s")

    # noise: one answer of `eval_limit` flips the score by 1/eval_limit
    noise = 1.0 / args.eval_limit
    rows = [{k: t.get(k) for k in ("number", "state", "objective", "val_loss", "steps", "seconds")}
            | {"params": json.dumps(t.get("params"))} for t in summary["trials"]]
    payload = {
        "benchmark": "tune",
        "trials": args.trials,
        "tune_wall_s": round(tune_s, 1),
        "under_10_minutes": tune_s < 600,
        "best_trial": summary["best_trial"],
        "best_value": summary["best_value"],
        "best_params": summary["best_params"],
        "rerun_value": rerun_score,
        "rerun_diff": diff,
        "reproduces_within_noise": abs(diff) <= noise,
        "noise": noise,
        "n_complete": summary["n_complete"], "n_pruned": summary["n_pruned"], "n_failed": summary["n_failed"],
        "rows": rows,
        "settings": {"steps": args.steps, "eval_limit": args.eval_limit, "search_space": hpo["search_space"]},
    }
    md = (f"4-trial search (LoRA on the bundled teacher, demo `gifts` extension, objective exact match on "
          f"{args.eval_limit} validation records): **{tune_s:.0f} s** (target < 600 s).\n\n"
          + markdown_table(rows, ["number", "state", "objective", "val_loss", "steps", "seconds", "params"])
          + f"\n\nBest trial {summary['best_trial']}: {summary['best_value']:.3f}; `slmops finetune --config best.yaml` "
          f"rerun: {rerun_score:.3f} (difference {diff:+.3f}; one answer = {noise:.3f}).\n")
    json_path, md_path = write_results("tune", payload, md, args.out)
    log(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
