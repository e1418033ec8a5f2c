"""The quickstart: the whole life of a model, offline, on the bundled demo task and teacher.

`slmops quickstart` is the pipeline ``slmops/demo/quickstart.yaml`` (``examples/quickstart.yaml`` links to it)
run through :mod:`slmops.pipeline` in ``WORKDIR/.slmops``, then one report over its five variants:

demo data -> the bundled teacher (evaluated) -> the teacher labels the unlabeled prompts -> a student a
quarter of its size or less (evaluated) -> a LoRA adapter on the student for two intents it has never seen
(the student evaluated on them before, the adapter after, on both tasks) -> ONNX int4 and GGUF q4_k_m with
the adapter merged (parity against the source, evaluated on both tasks) -> a bench of all five variants ->
a gate on the ONNX model -> promotion. ``WORKDIR/report.md`` starts with a short summary (teacher vs student,
LoRA before/after, exports) followed by the tables of ``WORKDIR/report.html`` (slmops.report): lineage,
quality-vs-latency and quality-vs-size scatters, tokens/s and memory bars, every metric with its bootstrap
interval, gate outcomes.

The command's options become pipeline overrides (``--set vars.NAME=V``); skipping a stage runs a variant of
the pipeline without those steps. Every step is cached by the pipeline runner, so a second run with the same
options recomputes nothing and only rewrites the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import GateFailedError, NotFoundError
from slmops.workspace import Workspace, hash_folder

PIPELINE_FILE = Path(__file__).resolve().parent / "demo" / "quickstart.yaml"
# the five variants the report covers: step -> label
VARIANT_STEPS = {"teacher": "teacher", "distill": "student", "finetune": "fine-tuned (student + LoRA)",
                 "export-onnx": "ONNX int4", "export-gguf": "GGUF q4_k_m"}
BASE_DATA, NEW_DATA = "triage-test", "gifts-test"  # the eval steps' data_name values


@dataclass
class QuickstartResult:
    workdir: Path
    report_path: Path
    html_path: Path
    outputs: dict[str, str]                      # step -> output artifact
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # step -> why it is not part of this run
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)          # the summary, one line per stage
    gate_error: str | None = None

    @property
    def teacher_id(self) -> str:
        return self.outputs["teacher"]

    @property
    def student_id(self) -> str | None:
        return self.outputs.get("distill")

    @property
    def adapter_id(self) -> str | None:
        return self.outputs.get("finetune")

    @property
    def all_cached(self) -> bool:
        return not self.ran and bool(self.cached)

    def summary(self) -> str:
        n = len(self.ran) + len(self.cached)
        if self.gate_error:
            head = f"pipeline quickstart stopped at its gate ({self.seconds:.1f} s): {n} steps finished"
        else:
            head = (f"pipeline quickstart: {n} steps, {len(self.ran)} ran, {len(self.cached)} cached "
                    f"({self.seconds:.1f} s)" + ("; every step cached, nothing was recomputed" if self.all_cached
                                                 else ""))
        return "\n".join([head, *self.lines])


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


def quickstart_pipeline(ws: Workspace, *, seed: int = 0, limit: int | None = None, distill_steps: int = 1200,
                        prompts: int | None = None, finetune_steps: int = 300, export: bool = True,
                        gguf: bool | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """The quickstart pipeline with the command's options applied: (pipeline, overrides, skipped steps and
    why). `gguf=None` exports GGUF only when llama-cpp-python is installed."""
    from slmops.pipeline import load_pipeline

    sets = [f"vars.seed={seed}"]
    if limit:
        sets += [f"vars.eval_limit={limit}", f"vars.parity_limit={limit}", f"vars.finetune_test={limit}"]
    if prompts:
        sets.append(f"vars.prompts={prompts}")
    if distill_steps > 0:
        sets.append(f"vars.distill_steps={distill_steps}")
    if finetune_steps > 0:
        sets += [f"vars.finetune_steps={finetune_steps}", f"vars.finetune_eval_every={max(1, finetune_steps // 3)}"]
    sets += list(overrides)  # the caller's --set wins
    pipe = load_pipeline(PIPELINE_FILE, overrides=sets, workspace=ws)
    skip: dict[str, str] = {}
    rewire: dict[str, str] = {}
    if distill_steps <= 0:  # no student: the teacher is fine-tuned and exported
        skip.update(dict.fromkeys(("generate", "distill", "eval-student"), "--distill-steps 0"))
        rewire["distill"] = "teacher"
    if finetune_steps <= 0:  # no adapter: the (distilled) model is exported as it is
        skip.update(dict.fromkeys(("finetune", "eval-student-new"), "--finetune-steps 0"))
    if not export:
        skip.update(dict.fromkeys(("export-onnx", "export-gguf"), "--no-export"))
    if gguf is None:
        from slmops.export.llamacpp import llama_cpp_available

        gguf = llama_cpp_available()
    if not gguf and "export-gguf" not in skip:
        skip["export-gguf"] = "llama-cpp-python is not installed (`make llama-cpp` builds it)"
    variant = pipe.variant(set(skip), rewire)
    # what the skipped steps took with them, and data nobody reads any more
    kept = set(variant.names)
    for s in pipe.steps:
        if s.name not in kept and s.name not in skip:
            skip[s.name] = "needs " + ", ".join(d for d in s.deps if d in skip or d not in kept)
    unused = {s.name for s in variant.steps if s.kind == "demo-data"
              and not any(s.name in o.deps for o in variant.steps)}
    if unused:
        for name in unused:
            skip[name] = "nothing reads it"
        variant = variant.variant(unused)
    return variant, sets, skip


def run_quickstart(workdir: str | Path, workspace: str | Path | None = None, seed: int = 0,
                   limit: int | None = None, progress: Callable | None = None, distill_steps: int = 1200,
                   prompts: int | None = None, log: Callable[[str], None] = lambda _m: None,
                   finetune_steps: int = 300, export: bool = True, overrides: list[str] | tuple[str, ...] = (),
                   gguf: bool | None = None, raise_on_gate: bool = True) -> QuickstartResult:
    """Run the quickstart pipeline in the workspace `workspace` (default ``WORKDIR/.slmops``) and write
    ``WORKDIR/report.md`` and ``WORKDIR/report.html``.

    `limit`: evaluate (and measure export parity) on the first N test examples; `prompts`: the teacher labels
    only the first N prompts; `distill_steps=0` skips distillation (the teacher is fine-tuned and exported);
    `finetune_steps=0` skips the LoRA stage (the model is exported without an adapter); `export=False` skips
    the ONNX int4 and GGUF q4_k_m exports and what depends on them; `overrides`: more ``--set`` items
    (``vars.NAME=V``, ``STEP.OPTION=V``). A failing gate still writes the report, then raises
    GateFailedError (exit 3), or with `raise_on_gate=False` returns with `gate_error` set."""
    from slmops.pipeline import run_pipeline

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(workspace or workdir / ".slmops")
    pipe, _sets, skipped = quickstart_pipeline(ws, seed=seed, limit=limit, distill_steps=distill_steps,
                                                prompts=prompts, finetune_steps=finetune_steps, export=export,
                                                gguf=gguf, overrides=overrides)
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        log(f"quickstart: not run ({why}): {', '.join(names)}")
    log(f"pipeline {pipe.name} ({PIPELINE_FILE}): {len(pipe.steps)} steps, workspace {ws.root}")
    gate_error = None
    t0 = time.perf_counter()
    try:
        res = run_pipeline(pipe, ws, log=log, progress=progress)
    except GateFailedError as exc:
        gate_error = exc
        res = run_pipeline(pipe, ws, dry_run=True)  # the outputs of the steps that finished
        res.steps = [s for s in res.steps if s.action == "cached"]
    outputs = {s.name: s.output for s in res.steps if s.output}
    result = QuickstartResult(workdir, workdir / "report.md", workdir / "report.html", outputs,
                              ran=res.ran if gate_error is None else [], cached=res.cached, skipped=skipped,
                              seconds=time.perf_counter() - t0, gate_error=gate_error.message if gate_error else None)
    log("writing the report")
    write_quickstart_report(ws, result)
    if gate_error is not None and raise_on_gate:
        raise gate_error
    return result


# --- the report ----------------------------------------------------------------------------------------------


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, int | float) else "–"


def _ci(entry: dict | None, metric: str = "exact_match") -> str:
    """``97.0% [95.3%, 98.3%]`` from a manifest's metrics.eval entry."""
    if not entry or not isinstance(entry.get(metric), int | float):
        return "–"
    ci = entry.get(f"{metric}_ci")
    s = _pct(entry[metric])
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(isinstance(x, int | float) for x in ci):
        s += f" [{ci[0]:.1%}, {ci[1]:.1%}]"
    return s


def _num(v: Any, fmt: str = ",.0f") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "–"


class _Facts:
    """What the summary reads: manifests of the variants, their eval entries, and the bench rows."""

    def __init__(self, ws: Workspace, outputs: dict[str, str]):
        self.ws = ws
        self.ids = {step: outputs[step] for step in VARIANT_STEPS if step in outputs}
        self.metrics = {step: ws.manifest(art).metrics for step, art in self.ids.items()}
        self.bench: dict[str, dict[str, Any]] = {}
        self.bench_file: Path | None = None
        if "bench" in outputs:
            f = ws.resolve(outputs["bench"]) / "bench.json"
            if f.is_file():
                self.bench_file = f
                payload = json.loads(f.read_text(encoding="utf-8"))
                by_art = {r.get("artifact"): r for r in payload.get("rows", [])}
                self.bench = {step: by_art[art] for step, art in self.ids.items() if art in by_art}

    def ev(self, step: str, data: str) -> dict | None:
        e = (self.metrics.get(step) or {}).get("eval")
        return e.get(data) if isinstance(e, dict) else None

    def score(self, step: str, data: str, metric: str = "exact_match") -> float | None:
        e = self.ev(step, data)
        v = e.get(metric) if e else None
        return v if isinstance(v, int | float) else None

    def b(self, step: str, key: str) -> float | None:
        v = self.bench.get(step, {}).get(key)
        return v if isinstance(v, int | float) else None


def write_quickstart_report(ws: Workspace, result: QuickstartResult) -> None:
    """report.html (slmops.report over the five variants) and report.md (a short summary of each stage,
    then the report's tables); fills `result.lines`."""
    from slmops.report import build_report

    f = _Facts(ws, result.outputs)
    html = result.html_path
    build_report(ws, html, artifacts=list(f.ids.values()), bench_files=[f.bench_file] if f.bench_file else [],
                 use_workspace=True, title="slmops quickstart", markdown=result.report_path)
    body = result.report_path.read_text(encoding="utf-8")
    summary, lines = _summary(f, result)
    result.lines = lines
    cut = body.find("\n## ")
    head, tail = (body[:cut + 1], body[cut + 1:]) if cut >= 0 else (body + "\n", "")
    intro = ("The quickstart pipeline (`slmops/demo/quickstart.yaml`, also `examples/quickstart.yaml`) on the "
             "bundled demo task and teacher; the summary first, then every table of the report. The same report "
             f"with its plots (lineage, quality vs latency and size, tokens/s, memory): `{html.name}`.\n\n")
    result.report_path.write_text(head + intro + summary + "\n" + tail, encoding="utf-8")


def _summary(f: _Facts, r: QuickstartResult) -> tuple[str, list[str]]:
    md: list[str] = []
    lines: list[str] = []
    o = r.outputs
    # the pipeline
    md += ["## Pipeline", "",
           (f"Stopped at the gate after {len(r.cached)} finished steps" if r.gate_error else
            f"{len(r.ran) + len(r.cached)} steps: {len(r.ran)} ran, {len(r.cached)} cached")
           + (" (every step cached: nothing was recomputed)" if r.all_cached else "") + "."
           + (" Not part of this run: " + "; ".join(f"`{k}` ({v})" for k, v in r.skipped.items()) + "."
              if r.skipped else ""), ""]
    if r.gate_error:
        md += [f"**The gate failed**, nothing was promoted: {' '.join(r.gate_error.split())}", ""]
    elif "promote" in o:
        gates = f.metrics.get("export-onnx", {}).get("gates") or {}
        checks = ", ".join(f"`{c.get('expr')}` ({c['value']:.3f}, {'pass' if c.get('passed') else 'FAIL'})"
                           if isinstance(c.get("value"), int | float) else f"`{c.get('expr')}`"
                           for c in gates.get("checks", [])) if isinstance(gates, dict) else ""
        md += [f"Gate on the ONNX int4 model: {checks or 'passed'}; `{o['promote']}` promoted to production.", ""]
    # teacher (and student)
    t_ev = f.ev("teacher", BASE_DATA)
    if t_ev:
        lat, dec = f.b("teacher", "latency_s"), f.b("teacher", "decode_tok_s")
        lines.append(f"teacher {o['teacher']} on {t_ev.get('n')} test examples: exact match {_pct(t_ev.get('exact_match'))}, "
                     f"JSON valid {_pct(t_ev.get('json_valid'))}, field accuracy {_pct(t_ev.get('field_accuracy'))}"
                     + (f"; median latency {lat * 1000:.0f} ms, decode {dec:.0f} tok/s" if lat and dec else ""))
    if "distill" in f.ids:
        t_em, s_em = f.score("teacher", BASE_DATA), f.score("distill", BASE_DATA)
        t_p, s_p = f.metrics["teacher"].get("parameters"), f.metrics["distill"].get("parameters")
        ratio = s_p / t_p if isinstance(s_p, int | float) and t_p else None
        t_dec, s_dec = f.b("teacher", "decode_tok_s"), f.b("distill", "decode_tok_s")
        speedup = s_dec / t_dec if s_dec and t_dec else None
        retention = s_em / t_em if s_em is not None and t_em else None
        md += ["## Distillation: teacher vs student", "",
               f"The teacher labelled the unlabeled prompts ({f.metrics['distill'].get('train_rows', '?')} training "
               f"rows kept); a `demo-student` trained {f.metrics['distill'].get('steps', '?')} steps on them "
               "(sequence-level: it beat logit-level KD at equal steps in benchmarks/distill.py).", "",
               f"| model | artifact | parameters | exact match on {BASE_DATA} [95% CI] | JSON valid | retention | "
               "decode tokens/s | median latency |", "|---|---|---|---|---|---|---|---|"]
        for step, name in (("teacher", "teacher"), ("distill", "student")):
            em = f.score(step, BASE_DATA)
            lat = f.b(step, "latency_s")
            md.append(f"| {name} | `{f.ids[step]}` | {_num(f.metrics[step].get('parameters'))} | "
                      f"{_ci(f.ev(step, BASE_DATA))} | {_pct(f.score(step, BASE_DATA, 'json_valid'))} | "
                      f"{_pct(em / t_em) if em is not None and t_em else '–'} | {_num(f.b(step, 'decode_tok_s'), ',.1f')} | "
                      f"{f'{lat * 1000:.1f} ms' if lat else '–'} |")
        md += ["", f"The student has {_pct(ratio)} of the teacher's parameters"
               + (f" and {speedup:.1f}x its decode tokens/s (bench, interleaved runs on this machine)" if speedup else "")
               + ".", ""]
        lines.append(f"student {f.ids['distill']}: exact match {_pct(s_em)} (retention {_pct(retention)}), "
                     f"{_pct(ratio)} of the teacher's parameters" + (f", {speedup:.1f}x its decode tokens/s" if speedup else ""))
    # fine-tuning
    if "finetune" in f.ids:
        base = "distill" if "distill" in f.ids else "teacher"
        role = "student" if base == "distill" else "teacher"
        fm = f.metrics["finetune"]
        b_new, a_new = f.score(base, NEW_DATA), f.score("finetune", NEW_DATA)
        b_base, a_base = f.score(base, BASE_DATA), f.score("finetune", BASE_DATA)
        n_new = (f.ev("finetune", NEW_DATA) or {}).get("n", "?")
        n_base = (f.ev("finetune", BASE_DATA) or {}).get("n", "?")
        intents = "gift_card, price_match"
        md += ["## Fine-tuning: a LoRA adapter for new intents", "",
               f"The {role} (`{f.ids[base]}`) never saw the intents {intents}. A LoRA adapter (`{f.ids['finetune']}`, "
               f"{_num(fm.get('trainable_parameters'))} trainable parameters = {_pct(fm.get('trainable_share'))} of "
               f"{_num(fm.get('parameters'))}) trained {fm.get('steps', '?')} steps on the new intents plus 25% "
               f"replayed original-task examples, at {_num(fm.get('tokens_per_s'))} tokens/s.", "",
               f"| exact match [95% CI] | before ({role}) | after ({role} + adapter) |", "|---|---|---|",
               f"| new intents ({n_new} examples of {NEW_DATA}) | {_ci(f.ev(base, NEW_DATA))} | "
               f"{_ci(f.ev('finetune', NEW_DATA))} |",
               f"| original task ({n_base} examples of {BASE_DATA}) | {_ci(f.ev(base, BASE_DATA))} | "
               f"{_ci(f.ev('finetune', BASE_DATA))} |", ""]
        lines.append(f"LoRA adapter {f.ids['finetune']} on the {role} for the new intents ({intents}): exact match "
                     f"{_pct(b_new)} -> {_pct(a_new)} on them, {_pct(b_base)} -> {_pct(a_base)} on the original task")
    # exports
    exports = [s for s in ("export-onnx", "export-gguf") if s in f.ids]
    if exports:
        src = "fine-tuned model (adapter merged)" if "finetune" in f.ids else "model"
        md += ["## Export: ONNX int4 and GGUF q4_k_m", "",
               f"The {src} exported and measured against its source (parity on the new-intents data), then "
               "evaluated like every other variant.", "",
               f"| export | artifact | size | smaller than fp16 | exact match on {NEW_DATA} | exact match on "
               f"{BASE_DATA} | parity: exact match kept | top-1 agreement | perplexity ratio |",
               "|---|---|---|---|---|---|---|---|---|"]
        parts = []
        for step in exports:
            m = f.metrics[step]
            par = m.get("parity") if isinstance(m.get("parity"), dict) else m
            size = m.get("size_bytes") or m.get("bytes")
            ratio = m.get("size_ratio_vs_fp16")
            smaller = 1 - ratio if isinstance(ratio, int | float) else None
            ret = par.get("exact_match_retention")
            md.append(f"| {VARIANT_STEPS[step]} | `{f.ids[step]}` | {_num(size / 1e6 if size else None, '.2f')} MB | "
                      f"{_pct(smaller)} | {_ci(f.ev(step, NEW_DATA))} | {_ci(f.ev(step, BASE_DATA))} | {_pct(ret)} | "
                      f"{_pct(par.get('top1_agreement'))} | {_num(par.get('ppl_ratio'), '.3f')} |")
            label = "onnx-int4" if step == "export-onnx" else "gguf-q4_k_m"
            parts.append(f"{label} {_pct(smaller)} smaller than fp16" + (f", {ret:.1%} of the exact match kept"
                                                                         if isinstance(ret, int | float) else ""))
        md.append("")
        lines.append("exports: " + "; ".join(parts))
    if r.gate_error:
        lines.append(f"gate FAILED, nothing promoted: {' '.join(r.gate_error.split())}")
    elif "promote" in o:
        lines.append(f"gate passed; {o['promote']} promoted to production")
    return "\n".join(md) + "\n", lines
