"""`slmops report`: one self-contained HTML page (plus report.md and the PNG plots) over the workspace's
variants and/or eval.json / bench.json result files: lineage graph, quality vs latency and vs size, tokens/s
and memory bars, every metric with its interval, gate outcomes, export parity, and the machine line.

    from slmops.report import build_report
    files = build_report(workspace, "report.html")              # every artifact in the workspace
    files = build_report(None, "r.html", eval_files=["ev/eval.json"], bench_files=["b/bench.json"])
"""

from slmops.report.build import ReportFiles, build_report, write_report
from slmops.report.collect import GateCheck, Metric, Node, ReportData, Variant, collect

__all__ = ["GateCheck", "Metric", "Node", "ReportData", "ReportFiles", "Variant", "build_report", "collect",
           "write_report"]
