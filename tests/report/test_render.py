"""The written report: markdown tables with every metric and interval, PNG plots, a self-contained HTML page,
missing data handled, and the CLI."""

from __future__ import annotations

import base64
import json
import re

from slmops.cli.app import run
from slmops.report import build_report, collect, write_report
from slmops.report.collect import PARITY_KEYS

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_markdown_has_every_metric_with_its_interval(lifecycle_ws, tmp_path):
    ws, ids = lifecycle_ws
    data = collect(ws, title="Demo life cycle")
    files = write_report(data, tmp_path / "out" / "report.html")
    md = files.markdown.read_text()
    assert files.markdown == tmp_path / "out" / "report.md"
    assert md.startswith("# Demo life cycle")
    for v in data.variants:
        for table in v.quality.values():
            for m in table.values():
                assert m.fmt() in md, (v.name, m.name)
                if m.low is not None:
                    assert re.search(rf"{re.escape(m.fmt())}", md)
        for m in v.bench.values():
            if m.name != "bytes_on_disk":
                assert m.fmt() in md, (v.name, m.name)
    assert "1 [0.99, 1]" in md                          # teacher exact match with its bootstrap interval
    assert "0.8765 [0.84, 0.91]" in md
    # gates: pass and fail with the reason
    assert "| model-q4_k_m | test | exact_match>=0.9 | 0.8765 | 0.9 | FAIL | exact_match 0.8765 < 0.9 (short by 0.0235) |" in md
    assert "| PASS |" in md
    # export parity and what the stages recorded
    assert "## Export parity" in md and "0.0063" in md and "0.9892" in md and "ppl ratio" in md
    assert "train_loss" in md and "0.0021" in md and "filters.kept" in md and "tokens_per_s" in md
    # the adapter has no bench numbers: still in the tables, left out of the plots with a note
    assert "| student-lora-gifts | adapter |" in md
    assert "No bench numbers for: student-lora-gifts" in md
    assert "not in the quality vs latency plot (no exact_match on test and no bench numbers: student-lora-gifts)" in md
    # plots are linked as files beside the markdown; the machine line is in the footer
    for name in ("lineage", "quality_latency", "quality_size", "throughput", "memory"):
        assert f"](report_files/{name}.png)" in md
    from slmops.bench.results import machine_line

    assert machine_line() in md


def test_plots_are_pngs(lifecycle_ws, tmp_path):
    ws, _ = lifecycle_ws
    files = build_report(ws, tmp_path / "r.html", markdown=tmp_path / "md" / "summary.md")
    assert files.markdown == tmp_path / "md" / "summary.md"
    assert "](../r_files/lineage.png)" in files.markdown.read_text()
    names = sorted(p.name for p in files.plots)
    assert names == ["lineage.png", "memory.png", "quality_latency.png", "quality_size.png", "throughput.png"]
    assert files.not_drawn == {}
    for p in files.plots:
        assert p.parent == tmp_path / "r_files"
        w, h = _png_size(p.read_bytes())
        assert w >= 400 and h >= 150, (p.name, w, h)
        import matplotlib.image as mpimg

        img = mpimg.imread(p)
        assert img.std() > 0.05, p.name   # not blank


def test_html_is_self_contained(lifecycle_ws, tmp_path):
    ws, _ = lifecycle_ws
    files = build_report(ws, tmp_path / "r.html", title="Self <contained>")
    html = files.html.read_text()
    assert "<title>Self &lt;contained&gt;</title>" in html
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", html)
    assert "<link" not in html and "@import" not in html
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(srcs) == 5
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        _png_size(base64.b64decode(s.split(",", 1)[1]))
    for heading in ("Lineage", "Quality vs speed and size", "Variants", "Quality gates", "Quality metrics",
                    "Speed and memory", "Export parity", "Recorded by each stage"):
        assert f"<h2>{heading}</h2>" in html
    assert '<td class="fail">FAIL</td>' in html and '<td class="pass">PASS</td>' in html


def test_missing_bench_data_everywhere(tmp_path, result_files):
    ev, _ = result_files
    files = build_report(None, tmp_path / "only-eval.html", eval_files=[ev])
    assert files.variants == 2
    # no workspace, no bench: only tables (sizes are unknown too)
    assert set(files.not_drawn) == {"lineage", "quality_latency", "quality_size", "throughput", "memory"}
    html = files.html.read_text()
    assert "Not drawn: no variant has bench numbers" in html
    assert "0.9312 [0.918, 0.944]" in html


def test_cli_report(lifecycle_ws, result_files, tmp_path, capsys):
    ws, ids = lifecycle_ws
    ev, bench = result_files
    out = tmp_path / "cli" / "page.html"
    assert run(["-w", str(ws.root), "report", "--out", str(out), "--title", "CLI report", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["html"] == str(out) and res["variants"] == 5 and res["gates_failed"] == 1 and len(res["plots"]) == 5
    assert (tmp_path / "cli" / "page.md").exists() and (tmp_path / "cli" / "page_files" / "lineage.png").exists()
    rc = run(["-w", str(ws.root), "report", "--out", str(tmp_path / "f.html"), "--eval", str(ev), "--bench",
              str(bench), "--artifact", ids["gguf"], "--quality", "rouge_l"])
    assert rc == 0
    text = capsys.readouterr()
    assert "wrote" in text.out and "3 variants" in text.out
    md = (tmp_path / "f.md").read_text()
    assert "rouge_l (hard)" in md and "2.178" in md and "| 4 |" in md
    # the files' machine is named, and differs from this one: flagged
    assert "measured on: Test CPU 9000, 2 cores, 7.7 GiB" in md and "more than one machine" in md
    assert run(["-w", str(ws.root), "report", "--artifact", "nope", "--out", str(tmp_path / "x.html")]) == 2
    assert run(["-w", str(tmp_path / "nowhere"), "report", "--out", str(tmp_path / "y.html")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert run(["-w", str(ws.root), "report", "--eval", str(tmp_path / "nope.json"), "--out", str(tmp_path / "z.html")]) == 2


def test_parity_keys_cover_the_parity_report():
    from slmops.export.parity import ParityReport

    fields = set(ParityReport.__dataclass_fields__) - {"notes", "size_bytes", "source_fp16_bytes", "n_texts"}
    assert fields <= set(PARITY_KEYS)


def test_result_files_only_variants_still_get_sizes_from_their_artifacts(lifecycle_ws, tmp_path, result_files):
    ws, ids = lifecycle_ws
    ev, _ = result_files
    files = build_report(ws, tmp_path / "sizes.html", eval_files=[ev])
    assert "quality_size" not in files.not_drawn        # the student's size comes from its manifest
    md = files.markdown.read_text()
    assert "2.00 MB (bench)" in md                      # its manifest bench numbers, not the file's (none given)
