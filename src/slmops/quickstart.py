"""The quickstart: the whole life of a model, offline, on the bundled demo task and teacher.

Generate the demo data, register it and the bundled teacher, evaluate the teacher through the torch
Engine, distill it into a student a quarter of its size or less (the teacher labels the unlabeled prompts,
the student trains on them; sequence-level, which beat logit KD at equal steps in benchmarks/distill.py), compare the two side by side, and write ``report.md``.
Later stages extend this same function.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from slmops.errors import NotFoundError
from slmops.workspace import Workspace, hash_folder


@dataclass
class QuickstartResult:
    workdir: Path
    report_path: Path
    teacher_id: str
    dataset_id: str
    eval_id: str
    scores: dict[str, float]
    latency: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    student_id: str | None = None
    comparison: dict | None = None
    adapter_id: str | None = None
    finetune: dict | None = None
    exports: dict | None = None

    def summary(self) -> str:
        s, lat = self.scores, self.latency
        return (
            f"teacher {self.teacher_id} on {int(s.get('n', 0))} test examples: "
            f"exact match {s['exact_match']:.1%}, JSON valid {s['json_valid']:.1%}, "
            f"field accuracy {s.get('field_accuracy', 0):.1%}; "
            f"median latency {lat['median_latency_s'] * 1000:.0f} ms, decode {lat['median_decode_tok_s']:.0f} tok/s"
        ) + self._student_line() + self._finetune_line() + self._export_line()

    def _export_line(self) -> str:
        parts = []
        for name, e in (self.exports or {}).items():
            if "error" in e:
                parts.append(f"{name}: {e['error']}")
            elif e.get("size_ratio_vs_fp16") is not None:
                ret = e.get("exact_match_retention")
                parts.append(f"{name} {1 - e['size_ratio_vs_fp16']:.0%} smaller than fp16"
                             + (f", {ret:.1%} of the exact match kept" if ret is not None else ""))
        return ("\nexports: " + "; ".join(parts)) if parts else ""

    def _finetune_line(self) -> str:
        if not self.finetune:
            return ""
        f = self.finetune
        return (f"\nLoRA adapter {self.adapter_id} on the {f['model_role']} for the new intents "
                f"({', '.join(f['intents'])}): exact match {f['before']['new']:.1%} -> {f['after']['new']:.1%} on "
                f"them, {f['before']['base']:.1%} -> {f['after']['base']:.1%} on the original task")

    def _student_line(self) -> str:
        if not self.comparison:
            return ""
        st = next(r for r in self.comparison["rows"] if r["model"] == "student")
        return (f"\nstudent {self.student_id}: exact match {st['exact_match']:.1%} "
                f"(retention {st['retention']:.1%}), {st['param_ratio']:.0%} of the teacher's parameters, "
                f"{st['decode_speedup']:.1f}x its decode tokens/s")


def _find_same(ws: Workspace, kind: str, name: str, folder_hashes: dict[str, str]) -> str | None:
    """An existing artifact of this kind and name with exactly these files (to reuse on reruns)."""
    for row in ws.registry.list(kind):
        if row["name"] != name:
            continue
        m = json.loads(ws.registry.get(row["id"])["manifest"])
        if m["files"] == folder_hashes:
            return row["id"]
    return None


def register_bundled_teacher(ws: Workspace) -> str:
    """Register the teacher that ships in the package (once per workspace); returns its id."""
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR

    if not (BUNDLED_TEACHER_DIR / "model.safetensors").exists():
        raise NotFoundError(
            f"the bundled demo teacher is missing from {BUNDLED_TEACHER_DIR}",
            "reinstall slmops, or train one with `slmops demo train-teacher --bundle`",
        )
    existing = _find_same(ws, "model", "demo-teacher", hash_folder(BUNDLED_TEACHER_DIR))
    if existing:
        return existing
    record = json.loads((BUNDLED_TEACHER_DIR / "training.json").read_text())
    m = ws.import_folder(BUNDLED_TEACHER_DIR, "model", "demo-teacher", config=record,
                        metrics={"parameters": record["parameters"], "train_wall_time_s": record["wall_time_s"]})
    ws.registry.set_alias("demo-teacher", m.id, "bundled demo teacher")
    return m.id


def register_demo_data(ws: Workspace, data_dir: Path, seed: int) -> str:
    from slmops.demo.task import write_demo_data

    write_demo_data(data_dir, seed=seed)
    name = f"demo-triage-seed{seed}"
    existing = _find_same(ws, "dataset", name, hash_folder(data_dir))
    if existing:
        return existing
    m = ws.import_folder(data_dir, "dataset", name, config={"generator": "slmops.demo.task", "seed": seed})
    return m.id


def run_quickstart(workdir: str | Path, workspace: str | Path | None = None, seed: int = 0,
                   limit: int | None = None, progress: Callable | None = None, distill_steps: int = 1200,
                   prompts: int | None = None, log: Callable[[str], None] = lambda _m: None,
                   finetune_steps: int = 300, export: bool = True) -> QuickstartResult:
    """Run the quickstart in `workdir`. `limit` evaluates on the first N test examples only; `prompts`
    labels only the first N unlabeled prompts; `distill_steps=0` skips distillation; `finetune_steps=0`
    skips the LoRA fine-tune (of the student, or of the teacher without one); `export=False` skips exporting
    the fine-tuned model to ONNX int4 and GGUF q4_k_m."""
    from slmops.data import load_dataset_file
    from slmops.engines import open_engine
    from slmops.evaluate import evaluate_engine, measure_latency

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(workspace or workdir / ".slmops")
    timings: dict[str, float] = {}
    bar = progress or (lambda *a, **k: nullcontext(lambda *a, **k: None))

    t = time.perf_counter()
    dataset_id = register_demo_data(ws, workdir / "data", seed)
    teacher_id = register_bundled_teacher(ws)
    timings["setup_s"] = time.perf_counter() - t

    test = load_dataset_file(ws.resolve(dataset_id) / "test.jsonl").records
    if limit:
        test = test[:limit]
    t = time.perf_counter()
    engine = open_engine(teacher_id, workspace=ws)
    with bar("evaluating teacher", total=len(test)) as advance:
        result = evaluate_engine(engine, test, progress=advance)
    latency = measure_latency(engine, test, n=min(20, len(test)))
    result.latency = latency
    timings["eval_s"] = time.perf_counter() - t
    info = engine.info()
    metrics = result.metrics()
    with ws.create_artifact("eval", f"eval-{teacher_id}", parents=[teacher_id, dataset_id],
                            config={"model": teacher_id, "data": f"{dataset_id}/test.jsonl", "engine": info.name,
                                    "decoding": "greedy", "max_new_tokens": 96, "limit": limit},
                            metrics=metrics) as w:
        with (w.path / "examples.jsonl").open("w", encoding="utf-8") as f:
            for row in result.examples:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        eval_id = w.id
    ws.update_metrics(teacher_id, {"exact_match": result.scores["exact_match"],
                                   "json_valid": result.scores["json_valid"]})
    engine.close()
    text = _report(teacher_id, dataset_id, eval_id, info, result, latency)
    student_id = comparison = None
    if distill_steps > 0:
        t = time.perf_counter()
        student_id, comparison, section = _distill(ws, workdir, teacher_id, dataset_id, distill_steps, prompts,
                                                   limit, progress, log)
        timings["distill_s"] = time.perf_counter() - t
        text += section
    adapter_id = finetune = None
    if finetune_steps > 0:
        t = time.perf_counter()
        adapter_id, finetune, section = _finetune(ws, workdir, student_id or teacher_id,
                                                  "student" if student_id else "teacher", seed, finetune_steps,
                                                  limit, progress, log)
        timings["finetune_s"] = time.perf_counter() - t
        text += section
    exports = None
    if export:
        t = time.perf_counter()
        model_id = student_id or teacher_id
        exports, section = _export(ws, workdir, model_id, adapter_id, finetune, limit, log)
        timings["export_s"] = time.perf_counter() - t
        text += section
    report = workdir / "report.md"
    report.write_text(text, encoding="utf-8")
    return QuickstartResult(workdir, report, teacher_id, dataset_id, eval_id, metrics, latency, timings,
                            student_id, comparison, adapter_id, finetune, exports)


def _export(ws: Workspace, workdir: Path, model_id: str, adapter_id: str | None, finetune: dict | None,
            limit: int | None, log) -> tuple[dict, str]:
    """Export the (fine-tuned) model to ONNX int4 and GGUF q4_k_m, with the adapter merged, each measured
    against the torch model (size vs fp16, perplexity, KL, top-1 agreement, exact match)."""
    from slmops.data import load_dataset_file
    from slmops.export.parity import parity_table

    if finetune is not None:
        test = ws.resolve(finetune["data"]) / "test.jsonl"  # the new intents: what the adapter added
    else:
        test = next(ws.resolve(r["id"]) for r in ws.registry.list("dataset")) / "test.jsonl"
    records = load_dataset_file(test).records[: limit or 100]
    what = f"`{model_id}`" + (f" with adapter `{adapter_id}` merged" if adapter_id else "")
    section = f"\n## Export: ONNX int4 and GGUF q4_k_m\n\nThe model {what}, measured against it on {len(records)} " \
              f"examples of `{test.parent.name}/{test.name}`.\n"
    out: dict = {}
    try:
        from slmops.export.onnx import export_onnx

        log("exporting to ONNX int4 (onnxruntime-genai builder)")
        res = export_onnx(model_id, workdir / "export" / "onnx-int4", precision="int4", int4_block_size=128,
                          adapter=adapter_id, adapter_mode="merge", force=True, workspace=ws, eval_records=records)
        out["onnx-int4"] = {"artifact_id": res.artifact_id, "path": res.out_dir, **(res.parity.to_dict() if res.parity else {})}
        section += f"\n### ONNX int4 (`{res.artifact_id}`, {res.out_dir})\n\n" + parity_table(res.parity) + "\n"
    except Exception as exc:  # an optional stage: its failure is reported, not fatal
        out["onnx-int4"] = {"error": f"{type(exc).__name__}: {exc}"}
        section += f"\nONNX int4 export failed: {exc}\n"
    try:
        from slmops.export.gguf import export_gguf
        from slmops.export.llamacpp import llama_cpp_available

        if not llama_cpp_available():
            raise RuntimeError("llama-cpp-python is not installed (`make llama-cpp` builds it)")
        log("exporting to GGUF q4_k_m (llama.cpp converter and quantizer)")
        eval_file = workdir / "export" / "eval.jsonl"
        eval_file.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
        adapter = str(ws.resolve(adapter_id)) if adapter_id else None
        res = export_gguf(model_id, workdir / "export" / "model-q4_k_m.gguf", quant="q4_k_m", adapter=adapter,
                          adapter_mode="merge", force=True, workspace=ws, eval_file=eval_file,
                          eval_limit=len(records))
        out["gguf-q4_k_m"] = {"artifact_id": res.artifact_id, "path": res.out,
                              **(res.parity.to_dict() if res.parity else {})}
        section += f"\n### GGUF q4_k_m (`{res.artifact_id}`, {res.out}; Ollama Modelfile beside it)\n\n" \
                   + parity_table(res.parity) + "\n"
    except Exception as exc:
        out["gguf-q4_k_m"] = {"error": f"{type(exc).__name__}: {exc}"}
        section += f"\nGGUF q4_k_m export skipped: {exc}\n"
    return out, section


def _finetune(ws: Workspace, workdir: Path, model_id: str, role: str, seed: int, steps: int, limit: int | None,
              progress, log) -> tuple[str | None, dict, str]:
    """LoRA-fine-tune `model_id` on the demo's `gifts` extension (two intents it has never seen, with a
    quarter of replayed original-task data) and score it before/after on the new intents and the old task."""
    from slmops.data import load_dataset_file
    from slmops.demo.task import FinetuneSizes, write_finetune_data
    from slmops.engines.torch_engine import TorchEngine
    from slmops.evaluate import evaluate_engine
    from slmops.finetune import FinetuneConfig, run_finetune

    bar = progress or (lambda *a, **k: nullcontext(lambda *a, **k: None))
    sizes = FinetuneSizes(train=1000, val=100, test=limit or 200, test_base=limit or 200)
    files = write_finetune_data(workdir / "finetune-data", "gifts", seed=seed, sizes=sizes, replay=0.25)
    folder = Path(files["train"]).parent
    hashes = hash_folder(folder)
    data_id = _find_same(ws, "dataset", "demo-gifts", hashes)
    if data_id is None:
        data_id = ws.import_folder(folder, "dataset", "demo-gifts",
                                   config={"task": "gifts", "seed": seed, "replay": 0.25}).id
    cfg = FinetuneConfig(model=model_id, data=data_id, method="lora", max_steps=steps, batch_size=16, lr=3e-3,
                         lora={"r": 16, "alpha": 32, "dropout": 0.05}, eval_every=max(1, steps // 3),
                         logging_steps=25, save_total_limit=1, seed=seed, name=f"{role}-lora-gifts")
    log(f"fine-tuning: LoRA on the {role} for the new intents {', '.join(files['intents'])}, {steps} steps")
    with bar(f"LoRA fine-tune of the {role}", total=steps) as advance:
        report = run_finetune(cfg, workdir / "finetune", workspace=ws, progress=advance)
    data = ws.resolve(data_id)
    tests = {"new": load_dataset_file(data / "test.jsonl").records,
             "base": load_dataset_file(data / "test_base.jsonl").records}
    engine = TorchEngine(ws.resolve(model_id), adapters={"gifts": str(ws.resolve(report.artifact_id))})
    scores: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    with bar("scoring before/after", total=2 * sum(len(r) for r in tests.values())) as advance:
        for when, adapter in (("before", "base"), ("after", "gifts")):
            for task, records in tests.items():
                scores[when][task] = evaluate_engine(engine, records, adapter=adapter,
                                                     progress=advance).scores["exact_match"]
    engine.close()
    ws.update_metrics(report.artifact_id, {"exact_match_new_task": scores["after"]["new"],
                                           "exact_match_original_task": scores["after"]["base"]})
    result = {"model_role": role, "model": model_id, "data": data_id, "intents": files["intents"],
              "steps": report.steps, "trainable_parameters": report.trainable_parameters,
              "parameters": report.parameters, "tokens_per_s": report.tokens_per_s, **scores}
    section = (
        f"\n## Fine-tuning: a LoRA adapter for new intents\n\n"
        f"The {role} (`{model_id}`) never saw the intents {', '.join(f'`{i}`' for i in files['intents'])}. A LoRA "
        f"adapter (`{report.artifact_id}`, {report.trainable_parameters:,} trainable parameters = "
        f"{report.trainable_share:.1%} of {report.parameters:,}) trained {report.steps} steps on `{data_id}` "
        f"(new intents plus 25% replayed original-task examples), at {report.tokens_per_s:,.0f} tokens/s.\n\n"
        "| exact match | before (base) | after (base + adapter) |\n|---|---|---|\n"
        f"| new intents ({len(tests['new'])} examples) | {scores['before']['new']:.4f} | {scores['after']['new']:.4f} |\n"
        f"| original task ({len(tests['base'])} examples) | {scores['before']['base']:.4f} | "
        f"{scores['after']['base']:.4f} |\n"
    )
    return report.artifact_id, result, section


def _distill(ws: Workspace, workdir: Path, teacher_id: str, dataset_id: str, steps: int, prompts: int | None,
             limit: int | None, progress, log) -> tuple[str | None, dict, str]:
    from slmops.distill import FilterConfig
    from slmops.distill.compare import comparison_markdown
    from slmops.distill.run import run_distillation

    data = ws.resolve(dataset_id)
    prompt_file = data / "prompts.jsonl"
    if prompts:
        prompt_file = workdir / "prompts-subset.jsonl"
        lines = (data / "prompts.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:prompts]
        prompt_file.write_text("".join(lines), encoding="utf-8")
    outcome = run_distillation(
        teacher_id, prompt_file, workdir / "distill", workspace=ws, student_preset="demo-student",
        test=data / "test.jsonl", filters=FilterConfig(json_valid=True), eval_limit=limit,
        generation={"max_new_tokens": 96, "batch_size": 32},
        training={"max_steps": steps, "batch_size": 32, "lr": 2e-3, "kd_alpha": 0.0,
                  "max_length": 256, "val_fraction": 0.02, "logging_steps": 50, "save_total_limit": 1},
        progress=progress, log=log,
    )
    section = ("\n## Distillation: teacher vs student\n\n"
               f"The teacher labelled the unlabeled prompts ({outcome.filters['kept']} answers kept of "
               f"{outcome.filters['total']}); a `demo-student` trained {steps} steps on them (sequence-level: it beat logit-level KD at equal steps in benchmarks/distill.py) "
               f"(student `{outcome.student_id}`).\n\n" + comparison_markdown(outcome.comparison) + "\n")
    return outcome.student_id, outcome.comparison, section


def _report(teacher_id, dataset_id, eval_id, info, result, latency) -> str:
    s = result.scores
    lines = [
        "# slmops quickstart report",
        "",
        f"Model `{teacher_id}` (engine {info.name}, {info.format} {info.precision}, "
        f"{info.parameters:,} parameters, {info.bytes_on_disk / 1e6:.1f} MB on disk), "
        f"evaluated on `{dataset_id}/test.jsonl` ({result.n} examples, greedy decoding). Eval artifact `{eval_id}`.",
        "",
        "## Task metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k in ["exact_match", "json_valid", "field_accuracy"] + sorted(k for k in s if k.startswith("field.")):
        if k in s:
            lines.append(f"| {k} | {s[k]:.4f} |")
    lines += [
        "",
        "## Speed (one request at a time, this machine)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| median latency per answer | {latency['median_latency_s'] * 1000:.1f} ms |",
        f"| median time to first token | {latency['median_ttft_s'] * 1000:.1f} ms |",
        f"| median decode tokens/s | {latency['median_decode_tok_s']:.1f} |",
        f"| batched answers/s | {result.answers_per_s:.1f} |",
        "",
    ]
    wrong = [e for e in result.examples if not e["exact_match"]][:5]
    if wrong:
        lines += ["## Some misses", ""]
        for e in wrong:
            lines += [f"- prompt: {e['prompt']}", f"  - expected: `{e['reference']}`",
                      f"  - got: `{e['prediction']}`"]
        lines.append("")
    return "\n".join(lines)
