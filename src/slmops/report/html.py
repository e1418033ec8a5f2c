"""One self-contained HTML page: inline CSS, PNGs embedded as base64 data URIs, no external assets.

A few lines of inline script mark the page once every image has decoded (``data-images-ok`` and
``data-images-total`` on ``<body>``, each image's page box in ``data-box``, the page height in
``data-height``), which the browser test reads; the page does not need them to display.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from slmops.report.sections import FAIL, PASS, Section, Table

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: #1d1d1f;
       margin: 0; background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 40px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 34px 0 8px; border-bottom: 2px solid #e4e6ea; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p, li { font-size: 14px; line-height: 1.45; }
.meta { color: #555; font-size: 13px; }
nav a { margin-right: 12px; font-size: 13px; color: #2c5fa8; text-decoration: none; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e6ea; border-radius: 4px; }
figcaption { font-size: 13px; color: #444; margin-top: 4px; }
.skipped { font-size: 12.5px; color: #8a5a00; background: #fff8e6; border-left: 3px solid #f0b429;
           padding: 4px 8px; margin: 4px 0; }
.empty { font-size: 13px; color: #666; background: #f3f4f6; border: 1px dashed #c8ccd2; padding: 14px;
         border-radius: 4px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 14px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12.5px; margin: 4px 0 10px; }
th, td { border: 1px solid #dfe2e6; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
tr:nth-child(even) td { background: #fafbfc; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv td:nth-child(odd) { color: #555; }
.pass { background: #e3f6e8 !important; color: #13672b; font-weight: 600; }
.fail { background: #fde7e7 !important; color: #a11a1a; font-weight: 600; }
footer { margin-top: 36px; font-size: 12.5px; color: #555; border-top: 1px solid #e4e6ea; padding-top: 10px; }
code { background: #f3f4f6; padding: 0 3px; border-radius: 3px; }
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  imgs.forEach(function (i) {
    var r = i.getBoundingClientRect();
    i.setAttribute('data-box', [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height].map(Math.round).join(','));
  });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-ok', String(ok));
  document.body.setAttribute('data-height', String(document.documentElement.scrollHeight));
});
"""


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _cell(text: str, header: str) -> str:
    cls = ""
    if text == PASS or text.startswith(PASS + " "):
        cls = ' class="pass"'
    elif text == FAIL or text.startswith(FAIL + " "):
        cls = ' class="fail"'
    elif text[:1].isdigit() or text[:1] == "-" and text[1:2].isdigit():
        cls = ' class="num"'
    return f"<td{cls}>{_inline(text)}</td>"


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def table_html(t: Table) -> str:
    out = []
    if t.title:
        out.append(f"<h3>{_inline(t.title)}</h3>")
    cls = ' class="kv"' if t.kind == "kv" else ""
    head = "".join(f"<th>{escape(c)}</th>" for c in t.columns) if t.kind != "kv" else ""
    body = "".join("<tr>" + "".join(_cell(c, t.columns[i] if i < len(t.columns) else "") for i, c in enumerate(r))
                   + "</tr>" for r in t.rows)
    out.append(f'<div class="scroll"><table{cls}>' + (f"<thead><tr>{head}</tr></thead>" if head else "")
               + f"<tbody>{body}</tbody></table></div>")
    if t.note:
        out.append(f'<p class="meta">{_inline(t.note)}</p>')
    return "\n".join(out)


def section_html(s: Section) -> str:
    out = [f'<section id="{escape(s.id)}">', f"<h2>{escape(s.heading)}</h2>"]
    if s.intro:
        out.append(f"<p>{_inline(s.intro)}</p>")
    figs = []
    for p in s.plots:
        fig = [f'<figure id="plot-{escape(p.name)}">']
        if p.title != s.heading:
            fig.append(f"<h3>{escape(p.title)}</h3>")
        if p.path is not None:
            fig.append(f'<img alt="{escape(p.title)}" src="{data_uri(p.path)}">')
            if p.caption:
                fig.append(f"<figcaption>{_inline(p.caption)}</figcaption>")
        else:
            fig.append(f'<div class="empty">Not drawn: {_inline(p.reason)}.</div>')
        for sk in p.skipped_grouped():
            fig.append(f'<div class="skipped">Not in this plot ({_inline(sk)})</div>')
        fig.append("</figure>")
        figs.append("\n".join(fig))
    if figs:
        wrap = len(s.plots) > 1
        out.append(('<div class="plots">' if wrap else "") + "\n".join(figs) + ("</div>" if wrap else ""))
    for t in s.tables:
        out.append(table_html(t))
    for n in s.notes:
        out.append(f'<p class="skipped">{_inline(n)}</p>')
    out.append("</section>")
    return "\n".join(out)


def render_html(title: str, meta: list[str], sections: list[Section], footer: list[str]) -> str:
    nav = " ".join(f'<a href="#{escape(s.id)}">{escape(s.heading)}</a>' for s in sections)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{CSS}</style>",
        f"<script>{SCRIPT}</script>",
        "</head><body><main>",
        f"<h1>{escape(title)}</h1>",
        *[f'<p class="meta">{_inline(m)}</p>' for m in meta],
        f"<nav>{nav}</nav>",
        *[section_html(s) for s in sections],
        "<footer>" + "".join(f"<p>{_inline(f)}</p>" for f in footer) + "</footer>",
        "</main></body></html>",
    ]) + "\n"
