"""The report's content as plain sections and tables, rendered to HTML (html.py) and markdown (markdown.py)
from the same objects, so both always show the same numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

from slmops.report.collect import (
    BENCH_KEYS,
    PARITY_KEYS,
    Metric,
    ReportData,
    Variant,
    fmt_number,
    latency_axis,
    quality_axis,
)
from slmops.report.plots import Plot

MISSING = "–"
PASS, FAIL = "PASS", "FAIL"

BENCH_LABELS = {
    "decode_tok_s": "decode tok/s", "prefill_tok_s": "prefill tok/s", "ttft_s": "TTFT (s)",
    "latency_s": "latency/answer (s)", "peak_rss_mb": "peak RSS (MB)", "rss_growth": "RSS growth",
    "cpu_util": "CPU util", "bytes_on_disk": "bytes on disk", "load_s": "load (s)",
}
PARITY_LABELS = {
    "size_ratio_vs_fp16": "size vs fp16", "ppl_source": "ppl source", "ppl_candidate": "ppl export",
    "ppl_ratio": "ppl ratio", "mean_kl": "mean KL", "top1_agreement": "top-1 agreement",
    "exact_match_source": "exact match source", "exact_match_candidate": "exact match export",
    "exact_match_retention": "retention", "n_records": "records", "n_kl_tokens": "KL tokens",
}


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    title: str = ""
    note: str = ""
    kind: str = ""          # "kv" for metric/value pair tables


@dataclass
class Section:
    id: str
    heading: str
    intro: str = ""
    plots: list[Plot] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _size(b: int | None) -> str:
    if not b:
        return MISSING
    return f"{b / 1e6:.2f} MB" if b < 1e9 else f"{b / 1e9:.2f} GB"


def _m(m: Metric | None) -> str:
    return m.fmt() if m is not None else MISSING


def _variant_id(v: Variant) -> str:
    return v.artifact_id or v.key


def gate_summary(v: Variant) -> str:
    if not v.gates and v.gates_passed is None:
        return MISSING
    failed = [g for g in v.gates if not g.passed]
    ok = v.gates_passed if v.gates_passed is not None else not failed
    if not v.gates:
        return PASS if ok else FAIL
    return (f"{PASS} ({len(v.gates)} check{'s' if len(v.gates) > 1 else ''})" if ok
            else f"{FAIL} ({len(failed)} of {len(v.gates)} failed)")


def overview(data: ReportData, quality: str | None) -> Section:
    axis = quality_axis(data.variants, quality)
    lat = latency_axis(data.variants)
    lat = lat if lat in ("latency_s", "ttft_s") else "latency_s"   # decode tok/s has its own column
    qcol = f"{axis[1]} ({axis[0]})" if axis else "quality"
    cols = ["variant", "kind", "id", "engine / format / precision", "parameters", "size on disk", qcol,
            BENCH_LABELS[lat], "decode tok/s", "peak RSS (MB)", "gates"]
    rows = []
    for v in data.variants:
        q = v.quality.get(axis[0], {}).get(axis[1]) if axis else None
        efp = " / ".join(x for x in (v.engine, v.format, v.precision) if x) or MISSING
        rows.append([v.name + (f" (@{', @'.join(v.aliases)})" if v.aliases else ""), v.kind or "result file",
                     _variant_id(v), efp, fmt_number(v.parameters) or MISSING,
                     _size(v.bytes_on_disk) + (f" ({v.size_note})" if v.size_note and v.bytes_on_disk else ""),
                     _m(q), _m(v.bench.get(lat)), _m(v.bench.get("decode_tok_s")),
                     _m(v.bench.get("peak_rss_mb")), gate_summary(v)])
    intro = (f"{len(data.variants)} variants. Intervals are written value [low, high]: bootstrap confidence "
             "intervals for quality metrics, p25..p75 over repeats for speed.")
    return Section("variants", "Variants", intro, tables=[Table(cols, rows)])


def quality_section(data: ReportData) -> Section:
    datas: list[str] = []
    for v in data.variants:
        for d in v.quality:
            if d not in datas:
                datas.append(d)
    tables = []
    for d in datas:
        metrics: list[str] = []
        for v in data.variants:
            for k in v.quality.get(d, {}):
                if k not in metrics:
                    metrics.append(k)
        have = [v for v in data.variants if d in v.quality]
        rows = []
        for v in have:
            ns = {m.n for m in v.quality[d].values() if m.n is not None}
            rows.append([v.label, ", ".join(str(n) for n in sorted(ns)) or MISSING, v.templates.get(d, MISSING)]
                        + [_m(v.quality[d].get(k)) for k in metrics])
        label = {"recorded": "recorded by the stage that made the artifact (data not named)",
                 "parity": "the export's parity run against its source model (its --eval-file)"}.get(d, f"data `{d}`")
        tables.append(Table(["variant", "n", "prompt template"] + metrics, rows, title=f"Quality on {label}"))
    missing = [v.label for v in data.variants if not v.quality]
    notes = [f"No quality numbers for: {', '.join(missing)} (run `slmops eval --model ID --data FILE`)."] if missing else []
    return Section("quality", "Quality metrics", "Every quality metric of every variant, per data file.",
                   tables=tables, notes=notes)


def speed_section(data: ReportData) -> Section:
    keys = [k for k in BENCH_KEYS if any(k in v.bench for v in data.variants)]
    extra = sorted({k for v in data.variants for k in v.bench if k not in BENCH_KEYS})
    keys += extra
    tables, notes = [], []
    have = [v for v in data.variants if v.bench]
    if have:
        rows = [[v.label] + [_m(v.bench.get(k)) if k != "bytes_on_disk" else
                             (fmt_number(int(v.bench[k].value)) if k in v.bench else MISSING) for k in keys]
                + [v.bench_source] for v in have]
        tables.append(Table(["variant"] + [BENCH_LABELS.get(k, k) for k in keys] + ["source"], rows))
    missing = [v.label for v in data.variants if not v.bench]
    if missing:
        notes.append(f"No bench numbers for: {', '.join(missing)} (run `slmops bench --model ID`); they are "
                     "left out of the speed and memory plots.")
    lengths = [v for v in data.variants if v.by_prompt_tokens]
    if lengths:
        rows = []
        for v in lengths:
            for n, d in sorted(v.by_prompt_tokens.items(), key=lambda kv: float(kv[0]) if kv[0].replace(".", "").isdigit() else 0):
                rows.append([v.label, n, fmt_number(d.get("ttft_s")) or MISSING,
                             fmt_number(d.get("latency_s")) or MISSING, fmt_number(d.get("decode_tok_s")) or MISSING])
        tables.append(Table(["variant", "prompt tokens", "TTFT (s)", "latency/answer (s)", "decode tok/s"], rows,
                            title="By prompt length"))
    if data.ratios:
        keys_r = sorted({k for r in data.ratios.values() for k in r})
        rows = [[pair] + [fmt_number(r.get(k)) or MISSING for k in keys_r] for pair, r in data.ratios.items()]
        tables.append(Table(["A / B"] + [BENCH_LABELS.get(k, k) for k in keys_r], rows,
                            title="Ratios (interleaved runs, A B A B)"))
    if data.concurrency:
        cols = ["model", "concurrency", "tok_s", "ttft_p50_s", "ttft_p95_s"]
        rows = [[fmt_number(r.get(c)) or MISSING for c in cols] for r in data.concurrency]
        tables.append(Table(cols, rows, title="Concurrency"))
    return Section("speed", "Speed and memory", "Medians over repeats, with p25..p75 where the bench recorded "
                   "them.", tables=tables, notes=notes)


def gates_section(data: ReportData) -> Section:
    rows = []
    for v in data.variants:
        for g in v.gates:
            rows.append([v.label, g.data or MISSING, g.expr, fmt_number(g.value) or MISSING,
                         fmt_number(g.threshold) or MISSING, PASS if g.passed else FAIL, g.reason or MISSING])
        if not v.gates and v.gates_passed is not None:
            rows.append([v.label, MISSING, "(no checks recorded)", MISSING, MISSING,
                         PASS if v.gates_passed else FAIL, MISSING])
    tables = [Table(["variant", "data", "gate", "value", "threshold", "outcome", "reason"], rows)] if rows else []
    failed = sum(1 for r in rows if r[5] == FAIL)
    intro = (f"{len(rows)} gate checks, {failed} failed." if rows else
             "No gates recorded. `slmops eval --gate \"exact_match>=0.9\"` (or --baseline/--max-drop) records them.")
    return Section("gates", "Quality gates", intro, tables=tables)


def parity_section(data: ReportData) -> Section | None:
    have = [v for v in data.variants if v.parity]
    if not have:
        return None
    keys = [k for k in PARITY_KEYS if any(k in v.parity for v in have)]
    rows = [[v.label, v.precision or MISSING] + [fmt_number(v.parity.get(k)) or MISSING for k in keys] for v in have]
    return Section("parity", "Export parity", "Each export measured against its source model at export time: "
                   "size vs fp16, perplexity ratio (export / source), mean next-token KL(source || export), top-1 "
                   "agreement, and exact match kept (retention = export / source).",
                   tables=[Table(["export", "precision"] + [PARITY_LABELS.get(k, k) for k in keys], rows)])


def recorded_section(data: ReportData) -> Section | None:
    """Every other metric the stages stored in the manifests (training, distillation, datasets)."""
    shown_prefix = ("eval.", "bench.", "gates.", "parity.")
    tables = []
    parity_ids = {v.artifact_id for v in data.variants if v.parity}
    for n in data.nodes:
        items = [(k, val) for k, val in n.metrics.items() if not k.startswith(shown_prefix)
                 and not (n.id in parity_ids and k in PARITY_KEYS)]
        if not items:
            continue
        per_row = 3
        rows = []
        for i in range(0, len(items), per_row):
            chunk = items[i:i + per_row]
            row: list[str] = []
            for k, val in chunk:
                row += [k, fmt_number(val)]
            row += ["", ""] * (per_row - len(chunk))
            rows.append(row)
        tables.append(Table(["metric", "value"] * per_row, rows, title=f"{n.name} ({n.kind}, {n.id})", kind="kv"))
    if not tables:
        return None
    return Section("recorded", "Recorded by each stage", "Numbers the stages stored in each artifact's manifest "
                   "(training loss and speed, distillation retention and speed-up, data filters, ...).",
                   tables=tables)


def build_sections(data: ReportData, plots: list[Plot], quality: str | None = None) -> list[Section]:
    by = {p.name: p for p in plots}
    secs = [
        Section("lineage", "Lineage", "Which artifact was made from which (the registry's parent links).",
                plots=[by["lineage"]]),
        Section("tradeoffs", "Quality vs speed and size", "Is the smaller or faster variant still good enough?",
                plots=[by["quality_latency"], by["quality_size"]]),
        Section("speed-plots", "Tokens per second and memory", "", plots=[by["throughput"], by["memory"]]),
        overview(data, quality), gates_section(data), quality_section(data), speed_section(data),
    ]
    for extra in (parity_section(data), recorded_section(data)):
        if extra is not None:
            secs.append(extra)
    return secs
