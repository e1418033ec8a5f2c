"""Gather everything a report shows into typed records.

Sources, merged per variant (a model that can be run: a ``model``, ``adapter`` or ``export`` artifact, or a
model named in a result file):

- the workspace: every artifact (or the chosen ones, with their ancestors for the lineage graph), their
  parents (the lineage DAG) and their manifest metrics. ``slmops eval`` stores ``metrics["eval"][DATA] =
  {METRIC: v, METRIC_ci: [lo, hi], "n": N, "template": T}`` and ``metrics["gates"]``; ``slmops bench``
  stores ``metrics["bench"]``; training, distillation and export record their own numbers (training loss,
  tokens/s, retention, parity: size ratio, perplexity ratio, KL, top-1 agreement, exact-match retention).
  ``eval`` artifacts (the quickstart's) add their scores and latency to the model they evaluated.
- ``eval.json`` files written by ``slmops eval --out DIR`` and ``bench.json`` files written by
  ``slmops bench --out DIR``; a model that is a workspace artifact is merged with it, others become
  variants of their own. Values from files win over the same values in manifests.

Nothing here imports matplotlib: collecting is cheap and testable on its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError

VARIANT_KINDS = ("model", "adapter", "export")
BENCH_KEYS = ("decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s", "peak_rss_mb", "rss_growth", "cpu_util",
              "bytes_on_disk", "load_s")
PARITY_KEYS = ("size_ratio_vs_fp16", "ppl_source", "ppl_candidate", "ppl_ratio", "mean_kl", "top1_agreement",
               "exact_match_source", "exact_match_candidate", "exact_match_retention", "n_records", "n_kl_tokens")
# manifest metrics that are a task score of the artifact itself (data unknown: "recorded")
RECORDED_QUALITY = ("exact_match", "json_valid", "field_accuracy", "exact_match_new_task",
                    "exact_match_original_task")
# where the recorded quality of an export comes from (its parity run)
EXPORT_QUALITY = {"exact_match_candidate": "exact_match"}
# latency keys from a quickstart `eval` artifact -> bench keys (used only when no bench numbers exist)
EVAL_LATENCY = {"latency.median_latency_s": "latency_s", "latency.median_ttft_s": "ttft_s",
                "latency.median_decode_tok_s": "decode_tok_s"}


@dataclass
class Metric:
    """One number with its interval (bootstrap CI for quality, p25..p75 spread for speed) where known."""

    name: str
    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None

    def fmt(self, digits: int = 4) -> str:
        """``value [low, high]`` (or just the value)."""
        s = fmt_number(self.value, digits)
        if self.low is not None and self.high is not None:
            s += f" [{fmt_number(self.low, digits)}, {fmt_number(self.high, digits)}]"
        return s


@dataclass
class GateCheck:
    expr: str
    passed: bool
    metric: str | None = None
    value: float | None = None
    threshold: float | None = None
    reason: str = ""
    data: str | None = None


@dataclass
class Variant:
    """A model version as the report sees it."""

    key: str                             # artifact id, or the model reference of a result file
    name: str
    kind: str | None = None              # artifact kind, None outside the workspace
    artifact_id: str | None = None
    aliases: list[str] = field(default_factory=list)
    engine: str | None = None
    format: str | None = None
    precision: str | None = None
    parameters: int | None = None
    bytes_on_disk: int | None = None
    size_note: str = ""                   # how bytes_on_disk was found
    quality: dict[str, dict[str, Metric]] = field(default_factory=dict)   # data name -> metric -> Metric
    templates: dict[str, str] = field(default_factory=dict)              # data name -> prompt template
    bench: dict[str, Metric] = field(default_factory=dict)
    bench_source: str = ""
    by_prompt_tokens: dict[str, dict[str, float]] = field(default_factory=dict)
    gates: list[GateCheck] = field(default_factory=list)
    gates_passed: bool | None = None
    parity: dict[str, float] = field(default_factory=dict)
    recorded: dict[str, float] = field(default_factory=dict)   # every other numeric manifest metric, flattened

    @property
    def label(self) -> str:
        """Short label for plots: the name, plus the alias when there is one."""
        return self.aliases[0] if self.aliases else self.name


@dataclass
class Node:
    """An artifact in the lineage graph."""

    id: str
    kind: str
    name: str
    parents: list[str]
    aliases: list[str] = field(default_factory=list)
    selected: bool = True    # False for ancestors drawn only for context
    metrics: dict[str, float] = field(default_factory=dict)   # the manifest's numeric metrics, flattened
    created: str = ""


@dataclass
class ReportData:
    title: str
    variants: list[Variant]
    nodes: list[Node]
    machines: list[tuple[str, dict[str, Any]]] = field(default_factory=list)   # (source, fingerprint)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    concurrency: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    workspace: str | None = None

    def variant(self, key: str) -> Variant | None:
        return next((v for v in self.variants if v.key == key or v.artifact_id == key or key in v.aliases), None)


def fmt_number(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e15 or abs(v) < 1e-3):
            return f"{v:.{max(digits - 1, 1)}e}"
        if v.is_integer():
            return f"{int(v):,}" if abs(v) >= 10000 else str(int(v))
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        return f"{v:.{digits}g}"
    return str(v)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif _num(v) is not None:
            out[key] = float(v)
    return out


def _interval(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, list | tuple) and len(v) == 2 and all(_num(x) is not None for x in v):
        return float(v[0]), float(v[1])
    return None, None


def _folder_bytes(folder: Path, files: dict[str, str]) -> int | None:
    total = 0
    for rel in files:
        try:
            total += (folder / rel).stat().st_size
        except OSError:
            return None
    return total or None


def result_path(path: str | Path, what: str) -> Path:
    """`path`, or `path/<what>.json` when it is a folder (as `slmops eval/bench --out DIR` writes)."""
    path = Path(path)
    return path / f"{what}.json" if path.is_dir() else path


def _read_json(path: Path, what: str) -> dict[str, Any]:
    path = result_path(path, what)
    if not path.exists():
        raise BadInputError(f"{what} file not found: {path}", f"write it with `slmops {what} --out DIR`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{path} is not a {what}.json object")
    return data


# --- manifest metrics -> variant -----------------------------------------------------------------------------

def apply_eval_metrics(v: Variant, ev: dict[str, Any]) -> None:
    """``metrics["eval"]``: {DATA: {METRIC: v, METRIC_ci: [lo, hi], n, template}}."""
    for data, scores in ev.items():
        if not isinstance(scores, dict):
            continue
        n = scores.get("n")
        n = int(n) if _num(n) is not None else None
        if isinstance(scores.get("template"), str):
            v.templates[data] = scores["template"]
        table = v.quality.setdefault(data, {})
        for k, val in scores.items():
            if k in ("n", "template") or k.endswith("_ci") or _num(val) is None:
                continue
            lo, hi = _interval(scores.get(f"{k}_ci"))
            table[k] = Metric(k, float(val), lo, hi, n)


def apply_gates(v: Variant, gates: Any, data: str | None = None) -> None:
    """``metrics["gates"]`` ({passed, data, checks}) or a list of check dicts (eval.json)."""
    checks = gates
    if isinstance(gates, dict):
        data = gates.get("data", data)
        checks = gates.get("checks", [])
        if isinstance(gates.get("passed"), bool):
            v.gates_passed = gates["passed"]
    if not isinstance(checks, list):
        return
    for c in checks:
        if not isinstance(c, dict):
            continue
        v.gates.append(GateCheck(expr=str(c.get("expr", c.get("metric", "?"))), passed=bool(c.get("passed")),
                                 metric=c.get("metric"), value=_num(c.get("value")),
                                 threshold=_num(c.get("threshold")), reason=str(c.get("reason", "")),
                                 data=c.get("data", data)))
    if v.gates and not isinstance(gates, dict):
        v.gates_passed = all(g.passed for g in v.gates)


def apply_bench(v: Variant, bench: dict[str, Any], source: str, spread: dict[str, Any] | None = None) -> None:
    spread = spread or {}
    got = False
    for k, val in bench.items():
        if _num(val) is None or k in ("repeats",):
            continue
        lo, hi = _interval(spread.get(k))
        v.bench[k] = Metric(k, float(val), lo, hi)
        got = True
    if got:
        v.bench_source = source
    if _num(bench.get("bytes_on_disk")):
        v.bytes_on_disk = int(bench["bytes_on_disk"])
        v.size_note = "bench"


def apply_manifest(v: Variant, metrics: dict[str, Any]) -> None:
    """Route every manifest metric to its place: eval, gates, bench, parity, or `recorded`."""
    for key, val in metrics.items():
        if key == "eval" and isinstance(val, dict):
            apply_eval_metrics(v, val)
        elif key == "gates":
            apply_gates(v, val)
        elif key == "bench" and isinstance(val, dict):
            apply_bench(v, val, "workspace (slmops bench)", val.get("spread") if isinstance(val.get("spread"), dict)
                        else None)
        elif key == "parity" and isinstance(val, dict):   # gguf exports keep parity in a sub-dict
            v.parity.update({k: float(x) for k, x in val.items() if k in PARITY_KEYS and _num(x) is not None})
        elif v.kind == "export" and key in PARITY_KEYS and _num(val) is not None:
            v.parity[key] = float(val)
        elif isinstance(val, dict):
            v.recorded.update(_flatten(val, key + "."))
        elif _num(val) is not None or isinstance(val, bool):
            v.recorded[key] = float(val)
    if _num(metrics.get("parameters")):
        v.parameters = int(metrics["parameters"])
    # task scores the stages recorded themselves (data not named): shown as data "recorded"
    recorded_q = {k: v.recorded[k] for k in RECORDED_QUALITY if k in v.recorded}
    if recorded_q:
        table = v.quality.setdefault("recorded", {})
        for k, val in recorded_q.items():
            table.setdefault(k, Metric(k, val))
    # an export's own exact match, from its parity run against the source (data: the export's eval file)
    parity_q = {dst: v.parity[src] for src, dst in EXPORT_QUALITY.items() if src in v.parity}
    if parity_q:
        n = int(v.parity["n_records"]) if "n_records" in v.parity else None
        table = v.quality.setdefault("parity", {})
        for k, val in parity_q.items():
            table.setdefault(k, Metric(k, val, n=n))


# --- the workspace ---------------------------------------------------------------------------------------------

def _workspace_exists(ws) -> bool:
    return ws is not None and (Path(ws.root) / "registry.sqlite").exists()


def collect_workspace(ws, artifacts: list[str] | None = None) -> tuple[list[Variant], list[Node], list[str]]:
    """Variants and lineage nodes from a workspace: all artifacts, or `artifacts` (ids or aliases) plus their
    ancestors (drawn for context, not reported as variants)."""
    notes: list[str] = []
    reg = ws.registry
    rows = {r["id"]: r for r in reg.list()}
    if artifacts:
        chosen: list[str] = []
        for ref in artifacts:
            art = ws.artifact_id(ref)
            if art is None or art not in rows:
                raise BadInputError(f"{ref!r} is not a workspace artifact", "see `slmops models list`")
            if art not in chosen:
                chosen.append(art)
        wanted = list(chosen)
        for art in chosen:
            wanted += [a for a in reg.lineage(art)["ancestors"] if a not in wanted and a in rows]
    else:
        chosen = list(rows)
        wanted = list(rows)
    manifests = {i: json.loads(reg.get(i)["manifest"]) for i in wanted}
    nodes = [Node(i, rows[i]["kind"], rows[i]["name"], [p for p in manifests[i].get("parents", []) if p in manifests],
                  rows[i]["aliases"], selected=i in chosen, metrics=_flatten(manifests[i].get("metrics", {})),
                  created=manifests[i].get("created", "")) for i in wanted]
    depth = _depths({i: m.get("parents", []) for i, m in manifests.items()})
    order = {i: (depth[i], manifests[i].get("created", ""), i) for i in wanted}
    nodes.sort(key=lambda n: order[n.id])
    variants: dict[str, Variant] = {}
    for i in sorted(chosen, key=order.__getitem__):
        m = manifests[i]
        if m["kind"] not in VARIANT_KINDS and not any(k in m.get("metrics", {}) for k in ("eval", "bench")):
            continue
        v = Variant(key=i, name=m["name"], kind=m["kind"], artifact_id=i, aliases=rows[i]["aliases"])
        cfg = m.get("config") or {}
        if m["kind"] == "export":
            v.format = "gguf" if any(f.endswith(".gguf") for f in m.get("files", {})) else "onnx"
            v.precision = cfg.get("precision") or cfg.get("quant")
        else:
            _hf_format(v, Path(rows[i]["path"]), m.get("files", {}))
        apply_manifest(v, m.get("metrics", {}))
        if v.bytes_on_disk is None:
            _size_from_manifest(v, m, rows, manifests, reg)
        variants[i] = v
    # quickstart-style `eval` artifacts: scores (and latency) of the model they evaluated
    for i, m in manifests.items():
        if m["kind"] != "eval" or i not in chosen:
            continue
        target = (m.get("config") or {}).get("model")
        v = variants.get(target) if isinstance(target, str) else None
        if v is None:
            continue
        data = Path(str((m.get("config") or {}).get("data") or "eval")).stem
        flat = _flatten(m.get("metrics", {}))
        n = int(flat["n"]) if "n" in flat else None
        if data in v.quality:   # `slmops eval` measured this data itself: show that run (the artifact's
            continue            # numbers stay in "Recorded by each stage")
        table = v.quality.setdefault(data, {})
        for k, val in flat.items():
            if k == "n" or k.startswith("latency.") or k == "answers_per_s":
                continue
            table.setdefault(k, Metric(k, val, n=n))
        if not v.bench:
            lat = {dst: flat[src] for src, dst in EVAL_LATENCY.items() if src in flat}
            if lat:
                apply_bench(v, lat, f"eval artifact {i} (single requests, no spread)")
    return list(variants.values()), nodes, notes


def _hf_format(v: Variant, folder: Path, files: dict[str, str]) -> None:
    """Format and precision of a Hugging Face model folder or PEFT adapter, from its JSON config."""
    for name, fmt in (("adapter_config.json", "peft"), ("config.json", "hf")):
        if name not in files:
            continue
        try:
            conf = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        v.format = f"{fmt} {str(conf.get('peft_type', '')).lower()}".strip() if fmt == "peft" else fmt
        dtype = conf.get("dtype") or conf.get("torch_dtype")
        if isinstance(dtype, str):
            v.precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
        return


def _depths(parents: dict[str, list[str]]) -> dict[str, int]:
    """Generation of each artifact: 0 without parents (among those given), else 1 + its deepest parent's."""
    depth: dict[str, int] = {}

    def d(i: str, stack: frozenset = frozenset()) -> int:
        if i not in depth:
            ps = [p for p in parents.get(i, []) if p in parents and p not in stack]
            depth[i] = 0 if not ps else 1 + max(d(p, stack | {i}) for p in ps)
        return depth[i]

    for i in parents:
        d(i)
    return depth


def _size_from_manifest(v: Variant, m: dict, rows: dict, manifests: dict, reg) -> None:
    metrics = m.get("metrics", {})
    for k in ("size_bytes", "bytes"):
        if _num(metrics.get(k)):
            v.bytes_on_disk, v.size_note = int(metrics[k]), "export"
            return
    files = {f: h for f, h in m.get("files", {}).items() if not f.startswith(("runs/", "checkpoints/"))}
    size = _folder_bytes(Path(rows[m["id"]]["path"]), files)
    if size is None:
        return
    v.bytes_on_disk, v.size_note = size, "files"
    if m["kind"] == "adapter":
        base = next((p for p in m.get("parents", []) if rows.get(p, {}).get("kind") == "model"), None)
        if base is not None:
            bm = manifests.get(base) or json.loads(reg.get(base)["manifest"])
            bsize = _folder_bytes(Path(rows[base]["path"]), bm.get("files", {}))
            if bsize:
                v.bytes_on_disk, v.size_note = size + bsize, "base + adapter files"


# --- result files ------------------------------------------------------------------------------------------------

def _variant_for(ref: str, name: str | None, variants: dict[str, Variant], ws, artifact: Any = None) -> Variant:
    """The variant a result-file row is about: its artifact (the row's `artifact`, else `ref` resolved in the
    workspace) or, outside the workspace, the reference itself."""
    key = ref
    if _workspace_exists(ws):
        if isinstance(artifact, str) and ws.registry.get(artifact) is not None:
            key = artifact
        else:
            try:
                key = ws.artifact_id(ref) or ref
            except Exception:  # a URL or a path that no longer exists: keep the reference
                key = ref
    for v in variants.values():
        if key in (v.key, v.artifact_id) or ref in v.aliases:
            return v
    v = Variant(key=key, name=name or Path(ref).name or ref)
    if _workspace_exists(ws):
        row = ws.registry.get(key)
        if row:
            m = json.loads(row["manifest"])
            v.kind, v.artifact_id, v.name = m["kind"], key, name or m["name"]
            v.aliases = sorted(a for a, i in ws.registry.aliases().items() if i == key)
            apply_manifest(v, m.get("metrics", {}))
            if m["kind"] != "export":
                _hf_format(v, Path(row["path"]), m.get("files", {}))
            if v.bytes_on_disk is None:
                rows = {r["id"]: r for r in ws.registry.list()}
                _size_from_manifest(v, m, rows, {key: m}, ws.registry)
    variants[v.key] = v
    return v


def apply_eval_file(path: Path, variants: dict[str, Variant], ws) -> dict[str, Any] | None:
    data = _read_json(path, "eval")
    models = data.get("models")
    if not isinstance(models, list):
        raise BadInputError(f"{path} has no 'models' list: it is not an eval.json from `slmops eval --out`")
    data_name = str(data.get("data_name") or Path(str(data.get("data") or path.parent.name)).stem)
    for row in models:
        if not isinstance(row, dict) or "model" not in row:
            continue
        v = _variant_for(str(row["model"]), row.get("name"), variants, ws, row.get("artifact"))
        for k in ("engine", "format", "precision"):
            if row.get(k):
                setattr(v, k, row[k])
        if row.get("template"):
            v.templates[data_name] = str(row["template"])
        table = v.quality.setdefault(data_name, {})
        for metric, s in (row.get("scores") or {}).items():
            if isinstance(s, dict) and _num(s.get("value")) is not None:
                n = s.get("n")
                table[metric] = Metric(metric, float(s["value"]), _num(s.get("low")), _num(s.get("high")),
                                       int(n) if _num(n) is not None else None)
            elif _num(s) is not None:
                table[metric] = Metric(metric, float(s))
        if row.get("gates"):
            v.gates = [g for g in v.gates if g.data != data_name]
            apply_gates(v, row["gates"], data_name)
    return data.get("machine") if isinstance(data.get("machine"), dict) else None


def apply_bench_file(path: Path, variants: dict[str, Variant], ws, out: ReportData) -> dict[str, Any] | None:
    data = _read_json(path, "bench")
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise BadInputError(f"{path} has no 'rows' list: it is not a bench.json from `slmops bench --out`")
    for row in rows:
        if not isinstance(row, dict) or "model" not in row:
            continue
        v = _variant_for(str(row["model"]), row.get("name"), variants, ws, row.get("artifact"))
        for k in ("engine", "format", "precision"):
            if row.get(k):
                setattr(v, k, row[k])
        v.bench = {}
        apply_bench(v, {k: row[k] for k in BENCH_KEYS if k in row}, f"{path}", row.get("spread"))
        if isinstance(row.get("by_prompt_tokens"), dict):
            v.by_prompt_tokens = {str(k): {m: float(x) for m, x in d.items() if _num(x) is not None}
                                  for k, d in row["by_prompt_tokens"].items() if isinstance(d, dict)}
    if isinstance(data.get("ratios"), dict):
        for pair, r in data["ratios"].items():
            if isinstance(r, dict):
                out.ratios[pair] = {k: float(x) for k, x in r.items() if _num(x) is not None}
    if isinstance(data.get("concurrency"), list):
        out.concurrency += [r for r in data["concurrency"] if isinstance(r, dict)]
    return data.get("machine") if isinstance(data.get("machine"), dict) else None


def collect(ws=None, *, artifacts: list[str] | None = None, eval_files: list[str | Path] = (),
            bench_files: list[str | Path] = (), title: str = "slmops report",
            use_workspace: bool | None = None) -> ReportData:
    """Everything the report shows.

    Without result files or `artifacts`, the whole workspace is reported. With result files, the variants are
    the models in those files (merged with their artifacts when they are in the workspace) plus `artifacts`;
    `use_workspace=True` adds every workspace artifact as well."""
    has_ws = _workspace_exists(ws)
    if artifacts and not has_ws:
        raise BadInputError(f"no workspace at {ws.root if ws else '(none)'} to find {', '.join(artifacts)} in",
                            "pass --workspace DIR, or give result files with --eval/--bench")
    if use_workspace is None:
        use_workspace = not (eval_files or bench_files) or bool(artifacts)
    out = ReportData(title=title, variants=[], nodes=[], workspace=str(ws.root) if ws is not None else None)
    variants: dict[str, Variant] = {}
    if has_ws and use_workspace:
        vs, nodes, notes = collect_workspace(ws, artifacts if (artifacts or eval_files or bench_files) else None)
        variants = {v.key: v for v in vs}
        out.nodes, out.notes = nodes, notes
        out.sources.append(f"workspace {ws.root}")
    for f in eval_files:
        f = result_path(f, "eval")
        m = apply_eval_file(f, variants, ws)
        out.sources.append(f"eval results {f}")
        if m:
            out.machines.append((f"eval {f}", m))
    for f in bench_files:
        f = result_path(f, "bench")
        m = apply_bench_file(f, variants, ws, out)
        out.sources.append(f"bench results {f}")
        if m:
            out.machines.append((f"bench {f}", m))
    if has_ws and (eval_files or bench_files):
        _add_lineage(ws, out, variants)
    out.variants = list(variants.values())
    if not out.variants and not out.nodes:
        where = (f"workspace {ws.root} has no artifacts" if has_ws else
                 f"no workspace at {ws.root}" if ws is not None else "no workspace")
        raise BadInputError(f"nothing to report: {where} and no result files were given",
                            "run `slmops quickstart`, or pass --eval DIR/eval.json / --bench DIR/bench.json")
    return out


def _add_lineage(ws, out: ReportData, variants: dict[str, Variant]) -> None:
    """Lineage nodes for the artifacts among file-only variants (and their ancestors)."""
    have = {n.id for n in out.nodes}
    reg = ws.registry
    ids = [v.artifact_id for v in variants.values() if v.artifact_id and v.artifact_id not in have]
    for art in list(ids):
        ids += [a for a in reg.lineage(art)["ancestors"] if a not in ids and a not in have]
    aliases = reg.aliases()
    for art in ids:
        row = reg.get(art)
        if row is None:
            continue
        m = json.loads(row["manifest"])
        out.nodes.append(Node(art, m["kind"], m["name"], list(m.get("parents", [])),
                              sorted(a for a, i in aliases.items() if i == art),
                              selected=art in {v.artifact_id for v in variants.values()},
                              metrics=_flatten(m.get("metrics", {})), created=m.get("created", "")))
    depth = _depths({n.id: n.parents for n in out.nodes})
    out.nodes.sort(key=lambda n: (depth[n.id], n.created, n.id))
    known = {n.id for n in out.nodes}
    for n in out.nodes:
        n.parents = [p for p in n.parents if p in known]


# --- choices the plots and tables share ------------------------------------------------------------------------

def quality_axis(variants: list[Variant], prefer: str | None = None) -> tuple[str, str] | None:
    """The (data, metric) pair to plot as quality: `prefer` (or exact_match) on the data most variants were
    scored on, else the metric most variants have; None when no variant has any quality number."""
    counts: dict[tuple[str, str], int] = {}
    order: list[tuple[str, str]] = []
    for v in variants:
        for data, table in v.quality.items():
            for metric in table:
                if (data, metric) not in counts:
                    order.append((data, metric))
                counts[(data, metric)] = counts.get((data, metric), 0) + 1
    if not counts:
        return None
    wanted = [prefer] if prefer else ["exact_match"]

    def rank(p: tuple[str, str]) -> tuple:
        return (p[1] in wanted, counts[p], p[0] != "recorded", -order.index(p))

    best = max(counts, key=rank)
    if prefer and best[1] != prefer:
        return None
    return best


def latency_axis(variants: list[Variant]) -> str | None:
    """The bench key to plot as speed: median latency per answer, else time to first token, else decode
    tokens/s (higher is better)."""
    for key in ("latency_s", "ttft_s", "decode_tok_s"):
        if any(key in v.bench for v in variants):
            return key
    return None
