"""The report's plots, drawn with matplotlib (Agg backend) and saved as PNG files.

Every function returns a `Plot` (path, title, caption, which variants were left out and why) or a `Plot`
with ``path=None`` and the reason when there is nothing to draw, so the page can say so instead of showing
an empty chart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slmops.report.collect import Metric, Node, ReportData, Variant, fmt_number, latency_axis, quality_axis

KIND_COLOURS = {
    "dataset": "#6baed6", "model": "#fd8d3c", "adapter": "#74c476", "export": "#9e9ac8",
    "eval": "#bdbdbd", "bench": "#bdbdbd", "report": "#bdbdbd", "bundle": "#bdbdbd", None: "#e377c2",
}
KIND_FILL = {
    "dataset": "#deebf7", "model": "#fee6ce", "adapter": "#e5f5e0", "export": "#efedf5",
    "eval": "#f0f0f0", "bench": "#f0f0f0", "report": "#f0f0f0", "bundle": "#f0f0f0",
}
DPI = 110


@dataclass
class Plot:
    name: str                       # file stem, e.g. "lineage"
    title: str
    path: Path | None               # None: nothing to draw (see `reason`)
    caption: str = ""
    skipped: list[str] = field(default_factory=list)   # "variant: why it is not in the plot"
    reason: str = ""

    def skipped_grouped(self) -> list[str]:
        """`skipped` as one line per reason: "no ttft_s: a, b, c"."""
        by: dict[str, list[str]] = {}
        for s in self.skipped:
            label, _, why = s.rpartition(": ")
            by.setdefault(why, []).append(label)
        return [f"{why}: {', '.join(labels)}" for why, labels in by.items()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _short(text: str, n: int = 26) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _labels(variants: list[Variant]) -> dict[str, str]:
    """Plot labels, unique: the alias or name, with the id's tail where two would collide."""
    base = {v.key: _short(v.label, 28) for v in variants}
    counts: dict[str, int] = {}
    for lab in base.values():
        counts[lab] = counts.get(lab, 0) + 1
    return {k: (f"{lab} ({k[-6:]})" if counts[lab] > 1 else lab) for k, lab in base.items()}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --- lineage ------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """Where the lineage graph's boxes go: `pos[id] = (layer, y)`; an edge spanning more than one layer runs
    through `routes[(parent, child)]`, one waypoint per layer in between (an empty slot, never a box)."""

    pos: dict[str, tuple[int, float]]
    routes: dict[tuple[str, str], list[tuple[int, float]]]
    layers: int
    widest: int


def layered_layout(nodes: list[Node]) -> Layout:
    """Layers by depth (longest path from a root); long edges get a waypoint in every layer they cross; within a
    layer, boxes and waypoints are ordered by the mean position of their predecessors (fewer crossings)."""
    by_id = {n.id: n for n in nodes}
    depth: dict[str, int] = {}

    def d(nid: str, stack: frozenset = frozenset()) -> int:
        if nid in depth:
            return depth[nid]
        parents = [p for p in by_id[nid].parents if p in by_id and p not in stack]
        depth[nid] = 0 if not parents else 1 + max(d(p, stack | {nid}) for p in parents)
        return depth[nid]

    for n in nodes:
        d(n.id)
    layers: dict[int, list] = {}
    preds: dict = {}
    for n in nodes:   # `nodes` come in creation order
        layers.setdefault(depth[n.id], []).append(n.id)
        preds.setdefault(n.id, [])
    edges = [(p, n.id) for n in nodes for p in n.parents if p in by_id]
    for p, c in edges:
        prev = p
        for layer in range(depth[p] + 1, depth[c]):
            w = ("via", p, c, layer)
            layers.setdefault(layer, []).append(w)
            preds[w] = [prev]
            prev = w
        preds[c].append(prev)
    succs: dict = {nid: [] for nid in preds}
    for nid, ps in preds.items():
        for p in ps:
            succs[p].append(nid)
    order = _order_layers(layers, preds, succs)
    index = {nid: i - (len(ids) - 1) / 2 for ids in order.values() for i, nid in enumerate(ids)}
    widest = max(len(ids) for ids in layers.values())
    pos = {nid: (depth[nid], -index[nid]) for nid in depth}
    routes = {(p, c): [(w[3], -index[w]) for w in layers_of(p, c, depth)] for p, c in edges}
    return Layout(pos, routes, 1 + max(layers), widest)


def _crossings(order: dict[int, list], succs: dict) -> int:
    """Edge crossings between adjacent layers for this ordering."""
    total = 0
    for layer in sorted(order)[:-1]:
        pos_next = {nid: i for i, nid in enumerate(order[layer + 1])}
        pairs = [(i, pos_next[c]) for i, nid in enumerate(order[layer]) for c in succs[nid] if c in pos_next]
        total += sum(1 for a, (i1, j1) in enumerate(pairs) for i2, j2 in pairs[a + 1:] if (i1 - i2) * (j1 - j2) < 0)
    return total


def _order_layers(layers: dict[int, list], preds: dict, succs: dict, sweeps: int = 6) -> dict[int, list]:
    """Order each layer by the barycenter of its neighbours, sweeping down (parents) and up (children) a few
    times; keep the ordering with the fewest crossings (the classic Sugiyama heuristic)."""
    order = {layer: list(ids) for layer, ids in layers.items()}

    def centred(ids: list) -> dict:
        return {nid: i - (len(ids) - 1) / 2 for i, nid in enumerate(ids)}

    def sweep(layer_seq, neighbours) -> None:
        for layer in layer_seq:
            ref: dict = {}
            for other in (layer - 1, layer + 1):
                if other in order:
                    ref.update(centred(order[other]))
            ids = order[layer]
            first = {nid: i for i, nid in enumerate(ids)}
            here = centred(ids)

            def bary(nid, ref=ref, here=here) -> float:
                ns = [ref[n] for n in neighbours[nid] if n in ref]
                return sum(ns) / len(ns) if ns else here[nid]
            ids.sort(key=lambda nid, first=first: (bary(nid), first[nid]))

    top = sorted(order)
    best, best_x = {k: list(v) for k, v in order.items()}, _crossings(order, succs)
    for _ in range(sweeps):
        sweep(top[1:], preds)
        sweep(top[-2::-1], succs)
        x = _crossings(order, succs)
        if x < best_x:
            best, best_x = {k: list(v) for k, v in order.items()}, x
    return best


def layers_of(p: str, c: str, depth: dict[str, int]) -> list[tuple]:
    return [("via", p, c, layer) for layer in range(depth[p] + 1, depth[c])]


def plot_lineage(nodes: list[Node], out: Path) -> Plot:
    title = "Lineage"
    if not nodes:
        return Plot("lineage", title, None, reason="no workspace artifacts (the variants come from result files only)")
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    plt = _pyplot()
    lay = layered_layout(nodes)
    xgap, ygap, bw, bh = 3.5, 1.1, 2.5, 0.9
    fig_w = max(6.0, lay.layers * xgap * 0.95 + 0.6)
    fig_h = max(2.4, lay.widest * ygap * 0.95 + 0.8)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))

    def xy(layer: int, y: float) -> tuple[float, float]:
        return layer * xgap, y * ygap

    boxes = {}
    for n in nodes:
        x, y = xy(*lay.pos[n.id])
        box = FancyBboxPatch((x - bw / 2, y - bh / 2), bw, bh, boxstyle="round,pad=0.02,rounding_size=0.12",
                             facecolor=KIND_FILL.get(n.kind, "#ffffff"), edgecolor=KIND_COLOURS.get(n.kind, "#888888"),
                             linewidth=2.0 if n.selected else 1.0, linestyle="-" if n.selected else "--", zorder=3)
        ax.add_patch(box)
        boxes[n.id] = box
        alias = f"  @{n.aliases[0]}" if n.aliases else ""
        ax.text(x, y + 0.17, _short(n.name, 22), ha="center", va="center", fontsize=10, fontweight="bold", zorder=4)
        ax.text(x, y - 0.18, _short(f"{n.kind} …{n.id[-6:]}{alias}", 28), ha="center", va="center", fontsize=8,
                color="#333333", zorder=4)
    style = {"color": "#555555", "linewidth": 1.2, "zorder": 2}
    # every edge leaves its parent's right side and enters its child's left side, so it stays in the gaps
    # between columns (never across a box); an edge skipping columns runs straight through its empty slots
    for (p, c), via in lay.routes.items():
        x, y = xy(*lay.pos[p])
        points = [(x + bw / 2, y)]
        for layer, slot in via:
            x, y = xy(layer, slot)
            points += [(x - bw / 2, y), (x + bw / 2, y)]
        x, y = xy(*lay.pos[c])
        points.append((x - bw / 2, y))
        if len(points) > 2:
            ax.plot([q[0] for q in points[:-1]], [q[1] for q in points[:-1]], solid_joinstyle="round", **style)
        ax.add_patch(FancyArrowPatch(points[-2], points[-1], arrowstyle="-|>", mutation_scale=12, shrinkA=0,
                                     shrinkB=1, **style))
    ax.set_xlim(-bw / 2 - 0.3, (lay.layers - 1) * xgap + bw / 2 + 0.3)
    half = (lay.widest - 1) / 2 * ygap + bh / 2 + 0.3
    ax.set_ylim(-half, half)
    ax.set_aspect("equal")
    ax.axis("off")
    kinds = [k for k in KIND_FILL if any(n.kind == k for n in nodes)]
    ax.legend(handles=[Patch(facecolor=KIND_FILL[k], edgecolor=KIND_COLOURS[k], label=k) for k in kinds],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(kinds), frameon=False, fontsize=8)
    path = _save(fig, out / "lineage.png")
    context = [n for n in nodes if not n.selected]
    caption = (f"{len(nodes)} artifacts, arrows from parent to child; columns are generations (a column's "
               "artifacts were made from those to their left).")
    if context:
        caption += f" Dashed: ancestors of the chosen artifacts, shown for context ({len(context)})."
    return Plot("lineage", title, path, caption)


# --- scatters -----------------------------------------------------------------------------------------------

def _quality_of(v: Variant, axis: tuple[str, str]) -> Metric | None:
    return v.quality.get(axis[0], {}).get(axis[1])


def _scatter(variants: list[Variant], xs: dict[str, tuple[float, float | None, float | None]],
             axis: tuple[str, str], xlabel: str, out: Path, name: str, title: str, logx: bool = False) -> Path:
    plt = _pyplot()
    labels = _labels(variants)
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    lo_x, hi_x = min(x for x, _, _ in xs.values()), max(x for x, _, _ in xs.values())
    if logx:
        import math

        lo_x, hi_x = math.log10(lo_x), math.log10(hi_x)
    for v in variants:
        if v.key not in xs:
            continue
        q = _quality_of(v, axis)
        x, xlo, xhi = xs[v.key]
        xpos = x
        colour = KIND_COLOURS.get(v.kind, KIND_COLOURS[None])
        yerr = None
        if q.low is not None and q.high is not None:
            yerr = [[max(q.value - q.low, 0)], [max(q.high - q.value, 0)]]
        xerr = None
        if xlo is not None and xhi is not None:
            xerr = [[max(x - xlo, 0)], [max(xhi - x, 0)]]
        ax.errorbar([x], [q.value], yerr=yerr, xerr=xerr, fmt="o", markersize=9, color=colour,
                    markeredgecolor="#222222", ecolor=colour, elinewidth=1.5, capsize=4, zorder=3)
        if logx:
            import math

            xpos = math.log10(x)
        right = len(xs) > 1 and xpos > lo_x + 0.6 * (hi_x - lo_x)   # labels of right-hand points go to their left
        ax.annotate(labels[v.key], (x, q.value), textcoords="offset points", xytext=(-8 if right else 8, 6),
                    ha="right" if right else "left", fontsize=8.5)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    data, metric = axis
    ax.set_ylabel(f"{metric} ({data})")
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    kinds = sorted({v.kind for v in variants if v.key in xs}, key=str)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], marker="o", linestyle="", color=KIND_COLOURS.get(k, KIND_COLOURS[None]),
                              markeredgecolor="#222222", label=k or "result file") for k in kinds],
              fontsize=8, loc="best")
    return _save(fig, out / f"{name}.png")


def plot_quality_latency(data: ReportData, out: Path, quality: str | None = None) -> Plot:
    title = "Quality vs latency"
    key = latency_axis(data.variants)
    timed = [v for v in data.variants if key in v.bench]
    axis = quality_axis(timed, quality) or quality_axis(data.variants, quality)
    if axis is None:
        return Plot("quality_latency", title, None,
                    reason=f"no variant has {'the metric ' + quality if quality else 'any quality metric'}")
    if key is None:
        return Plot("quality_latency", title, None, reason="no variant has bench numbers (run `slmops bench`)")
    skipped, xs = [], {}
    vals = [v.bench[key].value for v in data.variants if key in v.bench]
    scale, unit = (1000.0, "ms") if key != "decode_tok_s" and max(vals) < 2 else (1.0, "s")
    for v in data.variants:
        q, b = _quality_of(v, axis), v.bench.get(key)
        if q is None and b is None:
            skipped.append(f"{v.label}: no {axis[1]} on {axis[0]} and no bench numbers")
        elif q is None:
            skipped.append(f"{v.label}: no {axis[1]} on {axis[0]}")
        elif b is None:
            skipped.append(f"{v.label}: no {key}")
        else:
            xs[v.key] = (b.value * scale, None if b.low is None else b.low * scale,
                         None if b.high is None else b.high * scale)
    if not xs:
        return Plot("quality_latency", title, None, skipped=skipped,
                    reason=f"no variant has both {axis[1]} on {axis[0]} and {key}")
    if key == "decode_tok_s":
        xlabel, better = "decode tokens/s (median)", "up and right is better"
    else:
        xlabel = f"{'latency per answer' if key == 'latency_s' else 'time to first token'} ({unit}, median)"
        better = "up and left is better"
    path = _scatter(data.variants, xs, axis, xlabel, out, "quality_latency", f"{title} ({better})")
    cap = (f"Quality: {axis[1]} on {axis[0]} with its bootstrap interval where measured; speed: bench "
           f"{key} (median, bars: p25..p75 where recorded).")
    return Plot("quality_latency", title, path, cap, skipped)


def plot_quality_size(data: ReportData, out: Path, quality: str | None = None) -> Plot:
    title = "Quality vs size"
    axis = quality_axis(data.variants, quality)
    if axis is None:
        return Plot("quality_size", title, None,
                    reason=f"no variant has {'the metric ' + quality if quality else 'any quality metric'}")
    skipped, xs = [], {}
    for v in data.variants:
        q = _quality_of(v, axis)
        if q is None:
            skipped.append(f"{v.label}: no {axis[1]} on {axis[0]}")
        elif not v.bytes_on_disk:
            skipped.append(f"{v.label}: size on disk unknown")
        else:
            xs[v.key] = (v.bytes_on_disk / 1e6, None, None)
    if not xs:
        return Plot("quality_size", title, None, skipped=skipped, reason="no variant has both quality and size")
    sizes = [x for x, _, _ in xs.values()]
    logx = max(sizes) / max(min(sizes), 1e-9) > 20
    path = _scatter(data.variants, xs, axis, "size on disk (MB" + (", log scale)" if logx else ")"), out,
                    "quality_size", f"{title} (up and left is better)", logx=logx)
    cap = (f"Quality: {axis[1]} on {axis[0]}; size: bytes on disk (bench, the export's file, or the artifact's "
           "files; an adapter counts with its base model).")
    return Plot("quality_size", title, path, cap, skipped)


# --- bars ---------------------------------------------------------------------------------------------------

def _bars(variants: list[Variant], series: list[tuple[str, str, str]], out: Path, name: str, title: str,
          xlabel: str) -> tuple[Path | None, list[str]]:
    """Horizontal bars, one group per variant, one bar per (bench key, label, colour) in `series`."""
    have = [v for v in variants if any(k in v.bench for k, _, _ in series)]
    skipped = [f"{v.label}: no {' / '.join(k for k, _, _ in series)}" for v in variants if v not in have]
    if not have:
        return None, skipped
    plt = _pyplot()
    labels = _labels(have)
    present = [s for s in series if any(s[0] in v.bench for v in have)]
    height = 0.8 / len(present)
    fig, ax = plt.subplots(figsize=(7.2, max(1.8, 0.55 * len(have) * len(present) + 1.0)))
    for j, (key, lab, colour) in enumerate(present):
        ys, vals, lo, hi = [], [], [], []
        for i, v in enumerate(have):
            m = v.bench.get(key)
            if m is None:
                continue
            ys.append(i + (j - (len(present) - 1) / 2) * height)
            vals.append(m.value)
            lo.append(max(m.value - m.low, 0) if m.low is not None else 0)
            hi.append(max(m.high - m.value, 0) if m.high is not None else 0)
        xerr = [lo, hi] if any(lo) or any(hi) else None
        ax.barh(ys, vals, height=height * 0.9, color=colour, label=lab, xerr=xerr, capsize=3,
                error_kw={"elinewidth": 1, "ecolor": "#333333"})
        for y, val, up in zip(ys, vals, hi, strict=True):   # the value just past the bar (or its whisker)
            ax.text(val + up, y, " " + fmt_number(val, 3), va="center", fontsize=8)
    ax.set_yticks(range(len(have)), [labels[v.key] for v in have], fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    ax.margins(x=0.18)
    if len(present) > 1:
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out / f"{name}.png"), skipped


def plot_throughput(data: ReportData, out: Path) -> Plot:
    title = "Tokens per second"
    path, skipped = _bars(data.variants, [("decode_tok_s", "decode", "#3182bd"), ("prefill_tok_s", "prefill", "#9ecae1")],
                          out, "throughput", f"{title} (higher is better)", "tokens/s (median)")
    if path is None:
        return Plot("throughput", title, None, skipped=skipped, reason="no variant has bench numbers (run `slmops bench`)")
    return Plot("throughput", title, path, "Decode and prefill tokens/s, medians over repeats; whiskers: p25..p75 "
                "where recorded.", skipped)


def plot_memory(data: ReportData, out: Path) -> Plot:
    title = "Memory"
    path, skipped = _bars(data.variants, [("peak_rss_mb", "peak RSS", "#e6550d")], out, "memory",
                          "Peak resident memory (lower is better)", "peak RSS (MB)")
    if path is None:
        return Plot("memory", title, None, skipped=skipped,
                    reason="no variant has a peak RSS measurement (run `slmops bench`)")
    return Plot("memory", title, path, "Peak resident set size of the process running the model (bench).", skipped)


def make_plots(data: ReportData, out: Path, quality: str | None = None) -> list[Plot]:
    """All plots, PNGs written into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    return [plot_lineage(data.nodes, out), plot_quality_latency(data, out, quality),
            plot_quality_size(data, out, quality), plot_throughput(data, out), plot_memory(data, out)]
