"""The same sections as markdown (report.md), with the plots linked as PNG files beside it."""

from __future__ import annotations

import os
from pathlib import Path

from slmops.report.sections import Section, Table


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_md(t: Table) -> str:
    out = []
    if t.title:
        out += [f"### {t.title}", ""]
    cols = t.columns
    out.append("| " + " | ".join(_esc(c) for c in cols) + " |")
    out.append("|" + "---|" * len(cols))
    out += ["| " + " | ".join(_esc(c) for c in r) + " |" for r in t.rows]
    if t.note:
        out += ["", t.note]
    return "\n".join(out) + "\n"


def render_markdown(title: str, meta: list[str], sections: list[Section], footer: list[str], md_path: Path) -> str:
    out = [f"# {title}", ""]
    for m in meta:
        out += [m, ""]
    for s in sections:
        out += [f"## {s.heading}", ""]
        if s.intro:
            out += [s.intro, ""]
        for p in s.plots:
            if p.path is not None:
                rel = Path(os.path.relpath(p.path, md_path.parent)).as_posix()
                out += [f"![{p.title}]({rel})", ""]
                if p.caption:
                    out += [f"*{p.title}:* {p.caption}", ""]
            else:
                out += [f"*{p.title}:* not drawn: {p.reason}.", ""]
            for sk in p.skipped_grouped():
                out += [f"- not in the {p.title.lower()} plot ({sk})"]
            if p.skipped:
                out.append("")
        for t in s.tables:
            out += [table_md(t)]
        for n in s.notes:
            out += [f"> {n}", ""]
    out += ["---", ""] + [f"{f}  " for f in footer]
    return "\n".join(out).rstrip() + "\n"
