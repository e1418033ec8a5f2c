"""One function per step kind, each a thin call into the Python API of the matching command.

Every step returns the id of its output artifact (a workspace artifact written atomically, so a killed step
never leaves something that looks finished). Steps write their working files (generation rows, training
checkpoints, export folders) into ``<workspace>/pipelines/<pipeline>/work/<step>/``, which is what lets a
killed generation or training continue from its own checkpoints (``resume``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, GateFailedError, SlmopsError
from slmops.pipeline.plan import Step
from slmops.pipeline.spec import (
    BenchOptions,
    DemoDataOptions,
    EvalOptions,
    ExportOptions,
    GateOptions,
    GenerateOptions,
    ImportOptions,
    PromoteOptions,
)


@dataclass
class StepContext:
    """What a step function gets: resolved inputs (artifact ids, or absolute paths), the artifacts among
    them (`parents`), its working folder and whether to continue an interrupted run."""

    workspace: Any
    pipeline: str
    step: Step
    inputs: dict[str, str]
    parents: list[str]
    work_dir: Path
    resume: bool = False
    log: Callable[[str], None] = lambda _m: None
    progress: Callable | None = None  # factory(description, total) -> context manager yielding advance()

    @property
    def options(self) -> dict[str, Any]:
        return self.step.options

    def default_name(self) -> str:
        return f"{self.pipeline}-{self.step.name}"

    def bar(self, description: str, total: int | None = None):
        if self.progress is None:
            return nullcontext(lambda *a, **k: None)
        return self.progress(description, total)


@dataclass
class StepOutput:
    artifact_id: str
    summary: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def expected_output(step: Step, pipeline: str) -> tuple[str, str] | None:
    """(artifact kind, name) the step registers, to recognise the output of a run killed right after it
    registered it (and before the pipeline state was written). None: the step registers nothing new or
    deduplicates by content itself."""
    name = step.options.get("name") or f"{pipeline}-{step.name}"
    kind = {"generate": "dataset", "distill": "model", "export": "export", "eval": "eval", "bench": "bench",
            "tune": "report", "bundle": "bundle"}.get(step.kind)
    if step.kind == "finetune":
        kind = "model" if step.options.get("method") == "full" else "adapter"
    return (kind, name) if kind else None


# --- data ------------------------------------------------------------------------------------------------


def _find_same(ws, kind: str, name: str, files: dict[str, str]) -> str | None:
    for row in ws.registry.list(kind):
        if row["name"] == name and json.loads(ws.registry.get(row["id"])["manifest"])["files"] == files:
            return row["id"]
    return None


def run_demo_data(ctx: StepContext) -> StepOutput:
    from slmops.demo.task import DemoSizes, FinetuneSizes, write_demo_data, write_finetune_data
    from slmops.workspace import hash_folder

    o = DemoDataOptions.model_validate(ctx.options)
    out = ctx.work_dir / "data"
    if out.exists():
        shutil.rmtree(out)
    if o.task == "triage":
        write_demo_data(out, seed=o.seed, sizes=DemoSizes(**(o.sizes or {})), hard=o.hard)
        name = o.name or f"demo-triage-seed{o.seed}"
    else:
        write_finetune_data(out, o.task, seed=o.seed, sizes=FinetuneSizes(**(o.sizes or {})), replay=o.replay,
                            hard=o.hard)
        name = o.name or f"demo-{o.task}"
    config = {"generator": "slmops.demo.task", **o.model_dump(mode="json")}
    art = _find_same(ctx.workspace, "dataset", name, hash_folder(out))
    if art is None:
        art = ctx.workspace.import_folder(out, "dataset", name, config=config).id
    counts = {p.stem: sum(1 for _ in p.open(encoding="utf-8")) for p in sorted(out.glob("*.jsonl"))}
    return StepOutput(art, ", ".join(f"{k} {v}" for k, v in counts.items()))


def run_import(ctx: StepContext) -> StepOutput:
    from slmops.workspace import hash_folder

    o = ImportOptions.model_validate(ctx.options)
    ws = ctx.workspace
    if o.bundled == "demo-teacher":
        from slmops.quickstart import register_bundled_teacher

        art = register_bundled_teacher(ws)
    else:
        src = Path(ctx.inputs["path"])
        if (src / "slmops.json").is_file():
            from slmops.workspace import Manifest

            art = Manifest.read(src).id
            if ws.registry.get(art) is None:
                raise BadInputError(f"{src} is an artifact of another workspace", "import a plain folder")
        else:
            name = o.name or src.name
            art = _find_same(ws, o.artifact_kind, name, hash_folder(src))
            if art is None:
                art = ws.import_folder(src, o.artifact_kind, name, config={"source": str(src)}).id
    if o.alias and ws.registry.aliases().get(o.alias) != art:
        ws.registry.set_alias(o.alias, art, f"pipeline {ctx.pipeline}, step {ctx.step.name}")
    return StepOutput(art)


def run_generate(ctx: StepContext) -> StepOutput:
    from slmops.data import load_dataset_file
    from slmops.distill import FilterConfig, build_dataset, generate_synthetic, open_teacher, register_dataset

    o = GenerateOptions.model_validate(ctx.options)
    prompts = load_dataset_file(ctx.inputs["prompts"], purpose="prompts").prompts()
    if o.limit:
        prompts = prompts[: o.limit]
    teacher_ref = ctx.inputs["teacher"]
    remote = teacher_ref.startswith(("http://", "https://"))
    teacher = open_teacher(teacher_ref, ctx.workspace,
                           **({"concurrency": o.concurrency} if remote else {"max_batch_size": o.batch_size}))
    out = ctx.work_dir
    try:
        with ctx.bar(f"{ctx.step.name}: teacher labelling", None) as advance:
            report = generate_synthetic([teacher], prompts, out, system_prompt=o.system_prompt,
                                        temperature=o.temperature, top_p=o.top_p, max_new_tokens=o.max_new_tokens,
                                        num_samples=o.num_samples, seed=o.seed, stop=o.stop,
                                        batch_size=o.batch_size, min_success=o.min_success, progress=advance,
                                        workspace=ctx.workspace)
    finally:
        teacher.engine.close()
    f = o.filters
    filters = FilterConfig(json_valid=f.json_valid, json_schema=f.json_schema, regex=f.regex, min_chars=f.min_chars,
                           max_chars=f.max_chars, refusals=f.refusals, drop_truncated=f.drop_truncated,
                           dedup=f.dedup, near_dup_threshold=f.near_dup_threshold, min_agreement=f.min_agreement)
    outcome = build_dataset(out, report.hashes, filters)
    if not outcome.summary["kept"]:
        raise BadInputError("the filters rejected every teacher answer; nothing to train on",
                            f"see {out / 'rejected.jsonl'}")
    parents = [teacher.artifact_id] if teacher.artifact_id else []
    manifest, _ = register_dataset(ctx.workspace, out, name=o.name or ctx.default_name(), hashes=report.hashes,
                                   parents=parents, config={"teacher": teacher.name, "prompts": ctx.inputs["prompts"],
                                                            "sampling": report.sampling, "filters": filters.to_dict(),
                                                            "pipeline": ctx.pipeline, "step": ctx.step.name})
    s = outcome.summary
    return StepOutput(manifest.id, f"{s['kept']} of {s['total']} answers kept ({report.done_before} reused, "
                      f"{report.generated} generated)")


# --- training --------------------------------------------------------------------------------------------


def _config_with_inputs(ctx: StepContext, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    data = dict(extra or {})
    data.update(ctx.options)
    for k in ("data", "teacher", "student", "tokenizer", "val_data", "model"):
        if k in ctx.inputs:
            data[k] = ctx.inputs[k]
    data.setdefault("name", ctx.default_name())
    return data


def run_distill(ctx: StepContext) -> StepOutput:
    from slmops.distill.train import StudentTrainConfig, train_student

    cfg = StudentTrainConfig.model_validate({**_config_with_inputs(ctx), "resume": ctx.resume})
    with ctx.bar(f"{ctx.step.name}: student training", cfg.max_steps) as advance:
        report = train_student(cfg, ctx.work_dir, workspace=ctx.workspace, progress=advance)
    if report.artifact_id is None:
        raise SlmopsError("student training registered no artifact")
    return StepOutput(report.artifact_id, f"{report.steps} steps, train loss {report.train_loss}, "
                      f"val loss {report.val_loss}" + (f", resumed from {Path(report.resumed_from).name}"
                                                      if report.resumed_from else ""))


def run_finetune(ctx: StepContext) -> StepOutput:
    from slmops.finetune.config import FinetuneConfig
    from slmops.finetune.train import run_finetune as _run

    base: dict[str, Any] = {}
    if "recipe" in ctx.inputs:
        import yaml

        base = yaml.safe_load(Path(ctx.inputs["recipe"]).read_text(encoding="utf-8")) or {}
        base.pop("resume", None)
    data = _config_with_inputs(ctx, base)
    cfg = FinetuneConfig.model_validate({**data, "resume": ctx.resume})
    with ctx.bar(f"{ctx.step.name}: {cfg.method} fine-tuning", cfg.max_steps) as advance:
        report = _run(cfg, ctx.work_dir, workspace=ctx.workspace, progress=advance)
    if report.artifact_id is None:
        raise SlmopsError("fine-tuning registered no artifact")
    return StepOutput(report.artifact_id, f"{cfg.method}, {report.steps} steps, train loss {report.train_loss}, "
                      f"val loss {report.val_loss}")


def run_tune(ctx: StepContext) -> StepOutput:
    from slmops.finetune.tune import TuneConfig
    from slmops.finetune.tune import run_tune as _run

    data = dict(ctx.options)
    recipe = dict(data["recipe"])
    for k in ("model", "data", "val_data"):
        if k in ctx.inputs:
            recipe[k] = ctx.inputs[k]
    data["recipe"] = recipe
    cfg = TuneConfig.model_validate(data)
    out = ctx.work_dir / "search"
    with ctx.bar(f"{ctx.step.name}: trials", cfg.n_trials) as advance:
        result = _run(cfg, out, workspace=ctx.workspace, progress=advance)
    with ctx.workspace.create_artifact("report", ctx.default_name(), parents=ctx.parents,
                                       config=cfg.model_dump(mode="json"),
                                       metrics={"objective": result.objective, "best_value": result.best_value,
                                                "best_trial": result.best_trial, "best_params": result.best_params,
                                                "n_complete": result.n_complete, "n_pruned": result.n_pruned}) as w:
        for fname in ("best.yaml", "summary.json", "trials.csv", "trials.md"):
            if (out / fname).is_file():
                shutil.copy2(out / fname, w.path / fname)
        art = w.id
    return StepOutput(art, f"best {result.objective} {result.best_value} (trial {result.best_trial}); "
                      f"recipe: {art}/best.yaml")


# --- export, eval, bench -----------------------------------------------------------------------------------


def run_export(ctx: StepContext) -> StepOutput:
    o = ExportOptions.model_validate(ctx.options)
    name = o.name or ctx.default_name()
    records = None
    if "eval_data" in ctx.inputs:
        from slmops.data import load_dataset_file

        records = load_dataset_file(ctx.inputs["eval_data"]).records[: o.eval_limit]
    log = ctx.log
    if o.format == "onnx":
        from slmops.export.onnx import export_onnx

        res = export_onnx(ctx.inputs["model"], ctx.work_dir / "onnx", precision=o.precision,
                          adapter=ctx.inputs.get("adapter"), adapter_mode=o.adapter_mode,
                          int4_block_size=o.int4_block_size, int4_symmetric=o.int4_symmetric,
                          int4_accuracy_level=o.int4_accuracy_level, execution_provider=o.execution_provider,
                          force=True, workspace=ctx.workspace, name=name, eval_records=records,
                          max_new_tokens=o.max_new_tokens, max_ppl_increase=o.max_ppl_increase,
                          min_task_retention=o.min_task_retention, progress=log)
        summary = f"onnx {o.precision}, {res.size_bytes / 1e6:.2f} MB"
    else:
        from slmops.export.gguf import export_gguf

        eval_file = ctx.inputs.get("eval_data")
        res = export_gguf(ctx.inputs["model"], ctx.work_dir / f"{name}.gguf", quant=o.quant,
                          adapter=ctx.inputs.get("adapter"), adapter_mode="merge" if o.adapter_mode == "merge"
                          else "lora", force=True, workspace=ctx.workspace, name=name, eval_file=eval_file,
                          measure=eval_file is not None, max_ppl_increase=o.max_ppl_increase,
                          min_task_retention=o.min_task_retention, max_new_tokens=o.max_new_tokens,
                          eval_limit=o.eval_limit, modelfile=o.modelfile, pad_ffn=o.pad_ffn,
                          token_embedding_type=o.token_embedding_type, progress=log)
        summary = f"gguf {o.quant}, {res.bytes / 1e6:.2f} MB"
    if res.artifact_id is None:
        raise SlmopsError("the export registered no artifact")
    if res.size_ratio_vs_fp16 is not None:
        summary += f" ({1 - res.size_ratio_vs_fp16:.0%} smaller than fp16)"
    return StepOutput(res.artifact_id, summary)


def _artifact_of(ws, ref: str) -> str | None:
    try:
        return ws.artifact_id(ref)
    except SlmopsError:
        return None


def run_eval(ctx: StepContext) -> StepOutput:
    from slmops.evaluate.suite import run_evaluation

    o = EvalOptions.model_validate(ctx.options)
    ws = ctx.workspace
    out = ctx.work_dir / "out"
    if out.exists():
        shutil.rmtree(out)
    model = ctx.inputs["model"]

    def factory(desc: str, total: int | None):
        return ctx.bar(f"{ctx.step.name}: {desc}", total)

    data: Any = ctx.inputs["data"]
    if o.data_name:
        from slmops.evaluate.suite import load_eval_data

        data = load_eval_data(data, limit=o.limit)
        data.label = o.data_name
    run = run_evaluation([model], data, metrics=o.metrics, reference=ctx.inputs.get("reference"),
                         baseline=ctx.inputs.get("baseline"), workspace=ws, out=out, limit=o.limit,
                         max_new_tokens=o.max_new_tokens, batch_size=o.batch_size, label_field=o.label_field,
                         resamples=o.resamples, confidence=o.confidence, seed=o.seed, record=o.record,
                         progress=factory)
    m = run.models[0]
    scores = {k: s.value for k, s in m.scores.items()}
    cis = {k: s.ci() for k, s in m.scores.items()}
    subject = _artifact_of(ws, model)
    metrics = {"model": subject or model, "data": run.data_name, "n": m.n, "scores": scores, "ci": cis}
    if run.baseline is not None:
        metrics["baseline"] = {k: s.value for k, s in run.baseline.scores.items()}
    with ws.create_artifact("eval", o.name or ctx.default_name(), parents=ctx.parents,
                            config={"model": subject or model, "data": ctx.inputs["data"],
                                    **o.model_dump(mode="json")}, metrics=metrics) as w:
        for p in sorted(out.iterdir()):
            if p.is_file():
                shutil.copy2(p, w.path / p.name)
        art = w.id
    main = [k for k in scores if not k.startswith(("field.", "check."))]
    shown = ", ".join(f"{k} {scores[k]:.3f}" for k in main if isinstance(scores[k], int | float))
    return StepOutput(art, f"{m.n} examples of {run.data_name}: {shown}", metrics)


def run_bench(ctx: StepContext) -> StepOutput:
    from slmops.bench.run import BenchConfig, write_bench
    from slmops.bench.run import run_bench as _run

    o = BenchOptions.model_validate(ctx.options)
    # model first (ratios are model / each other one), then baseline, then any further model inputs;
    # a model named twice is measured once
    refs = [ctx.inputs["model"]] + ([ctx.inputs["baseline"]] if "baseline" in ctx.inputs else [])
    refs += [v for k, v in ctx.inputs.items() if k not in ("model", "baseline")]
    models = list(dict.fromkeys(refs))
    cfg = BenchConfig(models=models, prompt_tokens=o.prompt_tokens, max_new_tokens=o.max_new_tokens,
                      repeats=o.repeats, warmup=o.warmup, concurrency=o.concurrency, ignore_eos=o.ignore_eos,
                      memory=o.memory, threads=o.threads, seed=o.seed)
    payload = _run(cfg, workspace=ctx.workspace, progress=ctx.bar, log=ctx.log)
    out = ctx.work_dir / "out"
    write_bench(payload, out)
    rows = payload.get("rows") or []
    first = {k: rows[0].get(k) for k in ("decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s", "peak_rss_mb",
                                         "bytes_on_disk", "load_s")} if rows else {}
    with ctx.workspace.create_artifact("bench", o.name or ctx.default_name(), parents=ctx.parents,
                                       config=o.model_dump(mode="json"), metrics={"bench": first}) as w:
        for p in sorted(out.iterdir()):
            if p.is_file():
                shutil.copy2(p, w.path / p.name)
        art = w.id
    dt = first.get("decode_tok_s")
    return StepOutput(art, f"decode {dt:.1f} tok/s" if isinstance(dt, int | float) else "")


# --- gate, promote, bundle ---------------------------------------------------------------------------------


def run_gate(ctx: StepContext) -> StepOutput:
    from slmops.evaluate.gates import check_gates, parse_gate

    o = GateOptions.model_validate(ctx.options)
    ws = ctx.workspace
    ev = ws.manifest(ctx.inputs["eval"])
    scores = ev.metrics.get("scores") or {}
    subject = ev.metrics.get("model")
    results = check_gates(scores, [parse_gate(e) for e in o.checks], model=subject)
    passed = all(r.passed for r in results)
    target = _artifact_of(ws, subject) if subject else None
    if o.record and target is not None:
        ws.update_metrics(target, {"gates": {"passed": passed, "data": ev.metrics.get("data"),
                                             "checks": [r.to_dict() for r in results], "eval": ev.id}})
    if not passed:
        reasons = "; ".join(r.reason for r in results if not r.passed)
        raise GateFailedError(f"step {ctx.step.name}: {reasons}")
    if target is None:
        raise BadInputError(f"step {ctx.step.name}: the evaluated model {subject!r} is not a workspace artifact, "
                            "so there is nothing to pass on")
    return StepOutput(target, "; ".join(r.reason for r in results))


def promote_target(ws, art_id: str, to: str) -> str:
    """The alias a promotion sets: ``NAME@ALIAS`` (the artifact's name) with the registry's model aliases."""
    try:
        from slmops.registry import model_alias
    except ImportError:  # a registry without model aliases: plain aliases
        return to
    return model_alias(ws.manifest(art_id).name, to)


def run_promote(ctx: StepContext) -> StepOutput:
    """Gate-checked promotion (`slmops registry promote`): refused (exit 3) unless the artifact's recorded
    gates passed, or `force` with a reason; logged as a registry event."""
    o = PromoteOptions.model_validate(ctx.options)
    ws = ctx.workspace
    art = _artifact_of(ws, ctx.inputs["artifact"])
    if art is None or ws.registry.get(art) is None:
        raise BadInputError(f"{ctx.inputs['artifact']} is not a workspace artifact; only artifacts are promoted")
    reason = o.reason or f"pipeline {ctx.pipeline}, step {ctx.step.name}"
    target = promote_target(ws, art, o.to)
    try:
        from slmops.registry import promote
    except ImportError:
        promote = None
    if promote is not None:
        res = promote(ws, art, o.to, force=o.force, reason=reason)
        return StepOutput(art, f"{target} -> {art}" + ("" if res.changed else " (already)"))
    gates = ws.manifest(art).metrics.get("gates")
    passed = isinstance(gates, dict) and gates.get("passed") is True
    if not passed and not o.force:
        raise GateFailedError(f"step {ctx.step.name}: refusing to promote {art} to {o.to}: "
                              + ("gate failed" if isinstance(gates, dict) else "no quality gates recorded"),
                              "add eval and gate steps before promote, or set force: true with a reason")
    if ws.registry.aliases().get(target) != art:
        ws.registry.set_alias(target, art, reason + (" (forced)" if o.force and not passed else ""))
    return StepOutput(art, f"{target} -> {art}")


def run_bundle(ctx: StepContext) -> StepOutput:
    """`slmops bundle` for the blueprint's profiles; inputs other than `blueprint` replace the variant model
    of the profile they name (e.g. ``cpu-avx2-8gb: ${steps.export-onnx.output}``). The bundles of this
    version are registered together as one `bundle` artifact (its folder is what `slmops rollout publish`
    takes)."""
    from slmops.pipeline.spec import BundleOptions
    from slmops.rollout.blueprint import load_blueprint
    from slmops.rollout.bundle import build_bundles

    o = BundleOptions.model_validate(ctx.options)
    bp = load_blueprint(ctx.inputs["blueprint"])
    for profile, ref in ctx.inputs.items():
        if profile != "blueprint":
            bp.profiles[profile].variant.model = ref
    out = ctx.work_dir / "bundles"
    results = build_bundles(bp, o.version, out, workspace=ctx.workspace, profiles=o.profiles, force=True)
    metrics = {"version": o.version, "profiles": {r.profile: {"bundle_sha256": r.bundle_sha256, "files": r.files,
                                                              "size_bytes": r.size_bytes} for r in results}}
    with ctx.workspace.create_artifact("bundle", o.name or ctx.default_name(), parents=ctx.parents,
                                       config={"blueprint": ctx.inputs["blueprint"], **o.model_dump(mode="json")},
                                       metrics=metrics) as w:
        shutil.copytree(out / o.version, w.path / o.version)
        art = w.id
    return StepOutput(art, f"{len(results)} bundle(s) {o.version}: " + ", ".join(r.profile for r in results))


RUNNERS: dict[str, Callable[[StepContext], StepOutput]] = {
    "demo-data": run_demo_data, "import": run_import, "generate": run_generate, "distill": run_distill,
    "finetune": run_finetune, "tune": run_tune, "export": run_export, "eval": run_eval, "bench": run_bench,
    "gate": run_gate, "promote": run_promote, "bundle": run_bundle,
}
