"""Collect, plot and write: report.html (self-contained), report.md and report_files/*.png."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.report.collect import ReportData, collect


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)
    not_drawn: dict[str, str] = field(default_factory=dict)   # plot name -> why
    variants: int = 0
    gates_failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"html": str(self.html), "markdown": str(self.markdown), "plots": [str(p) for p in self.plots],
                "not_drawn": self.not_drawn, "variants": self.variants, "gates_failed": self.gates_failed}


def _machine_line(m: dict[str, Any] | None = None) -> str:
    from slmops.bench.results import machine_line

    try:
        return machine_line(m)
    except (KeyError, TypeError, AttributeError):
        return ", ".join(f"{k} {v}" for k, v in (m or {}).items() if not isinstance(v, dict))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(data: ReportData, out: str | Path, *, quality: str | None = None,
                 markdown: str | Path | None = None) -> ReportFiles:
    """Write `out` (HTML), the markdown beside it (same stem, .md, or `markdown`) and the plots into
    `<stem>_files/`."""
    from slmops.report.html import render_html
    from slmops.report.markdown import render_markdown
    from slmops.report.plots import make_plots
    from slmops.report.sections import build_sections

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "report.html" if out.is_dir() or not out.suffix else out.with_suffix(".html")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = out.parent / f"{out.stem}_files"
    plots = make_plots(data, plot_dir, quality)
    sections = build_sections(data, plots, quality)
    failed = sum(1 for v in data.variants for g in v.gates if not g.passed)
    gated = sum(1 for v in data.variants if v.gates or v.gates_passed is not None)
    meta = [f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')} from {'; '.join(data.sources) or 'nothing'}.",
            f"{len(data.variants)} variants, {len(data.nodes)} artifacts in the lineage graph; "
            + (f"gates: {gated} variants gated, failed gate checks: {failed}." if gated else "no gates recorded.")]
    here = _machine_line()
    footer = [f"Report generated on: {here}."]
    lines = {here}
    for source, m in data.machines:
        line = _machine_line(m)
        lines.add(line)
        footer.append(f"Numbers in {source} measured on: {line}.")
    if data.nodes:
        footer.append("Numbers stored in workspace manifests were measured by the stage that wrote them, on the "
                      "machine that ran it.")
    if len(lines) > 1:
        footer.append("Warning: these numbers come from more than one machine; compare speed only between "
                      "numbers from the same machine.")
    md_path = Path(markdown) if markdown is not None else out.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, render_html(data.title, meta, sections, footer))
    _write_atomic(md_path, render_markdown(data.title, meta, sections, footer, md_path))
    return ReportFiles(out, md_path, [p.path for p in plots if p.path is not None],
                       {p.name: p.reason for p in plots if p.path is None}, len(data.variants), failed)


def build_report(ws, out: str | Path = "report.html", *, artifacts: list[str] | None = None,
                 eval_files: list[str | Path] = (), bench_files: list[str | Path] = (), title: str = "slmops report",
                 quality: str | None = None, use_workspace: bool | None = None,
                 markdown: str | Path | None = None) -> ReportFiles:
    """Collect from the workspace `ws` (may be None) and result files, then write the report."""
    data = collect(ws, artifacts=artifacts, eval_files=list(eval_files), bench_files=list(bench_files), title=title,
                   use_workspace=use_workspace)
    return write_report(data, out, quality=quality, markdown=markdown)
