"""Agent reports: where they are collected, and how `slmops rollout status` sums them up.

An agent report (JSON, one per device; the collector keeps the latest)::

    {"device_id": "dev-07", "profile": "cpu-avx2-8gb", "channel": "stable",
     "version": "v2",                 # the version it runs now (null: none yet)
     "target": "v3",                  # what the channel asked it to run
     "in_rollout": true, "bucket": 412,
     "state": "rolled_back",          # ok | updated | waiting | rolled_back | verify_failed | error | no_bundle
     "message": "smoke test failed: exact_match 0.000 < 1.000 (short by 1.000)",
     "failures": {"v3": {"stage": "smoke", "reason": "...", "time": "...Z", "retry": false}},
     "rollbacks_total": 1, "serving": false, "last_check": 1764441600.0, "time": "...Z"}

A collector is a folder (one ``<device_id>.json`` per device, written atomically) or an http(s) URL that
receives the report as a JSON POST; ``slmops rollout collect --dir DIR`` is such a receiver writing to a
folder.
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsError
from slmops.rollout.util import is_url, write_json_atomic

_SAFE = re.compile(r"[^A-Za-z0-9._@-]+")


def report_filename(device_id: str) -> str:
    return _SAFE.sub("_", device_id)[:128] + ".json"


def save_report(collector: str | Path, report: dict[str, Any], timeout: float = 10.0) -> None:
    """Deliver `report` to a collector folder (atomic file per device) or URL (JSON POST)."""
    if is_url(collector):
        import urllib.request

        req = urllib.request.Request(str(collector), data=json.dumps(report).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                resp.read()
        except OSError as exc:
            raise SlmopsError(f"POST {collector}: {getattr(exc, 'reason', exc)}") from None
        return
    write_json_atomic(Path(collector) / report_filename(str(report["device_id"])), report)


def load_reports(collector: str | Path) -> list[dict[str, Any]]:
    """Every report in a collector folder (unreadable files are skipped)."""
    folder = Path(collector)
    if not folder.is_dir():
        raise SlmopsError(f"no collector folder {folder}", "pass the folder the agents report to (--collector)")
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("device_id"):
            out.append(rec)
    return out


def summarize(reports: list[dict[str, Any]], channel: str | None = None) -> dict[str, Any]:
    """Per version and profile: devices on it; per version: failures (by stage) and devices that rolled back."""
    on: dict[tuple[str, str], int] = defaultdict(int)
    failed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    failed_devices: dict[str, list[str]] = defaultdict(list)
    states: dict[str, int] = defaultdict(int)
    rolled_back = 0
    n = 0
    for r in reports:
        if channel and r.get("channel") not in (None, channel):
            continue
        n += 1
        on[(r.get("version") or "(none)", r.get("profile") or "?")] += 1
        states[r.get("state") or "?"] += 1
        rolled_back += 1 if r.get("rollbacks_total") else 0
        for v, f in (r.get("failures") or {}).items():
            failed[v][f.get("stage") or "?"] += 1
            failed_devices[v].append(r["device_id"])
    versions = sorted({v for v, _ in on} | set(failed))
    return {
        "devices": n,
        "states": dict(states),
        "devices_that_rolled_back": rolled_back,
        "on": [{"version": v, "profile": p, "devices": c} for (v, p), c in sorted(on.items())],
        "failures": {v: {"devices": len(failed_devices[v]), "by_stage": dict(failed[v]),
                         "device_ids": sorted(failed_devices[v])} for v in versions if v in failed},
    }


class _Handler(BaseHTTPRequestHandler):
    folder: Path
    max_bytes = 1 << 20

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > self.max_bytes:
                raise ValueError("bad Content-Length")
            rec = json.loads(self.rfile.read(length))
            if not isinstance(rec, dict) or not isinstance(rec.get("device_id"), str):
                raise ValueError("a report is a JSON object with device_id")
            write_json_atomic(self.folder / report_filename(rec["device_id"]), rec)
        except (ValueError, json.JSONDecodeError) as exc:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(str(exc).encode())
            return
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


def collector_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8780) -> ThreadingHTTPServer:
    """An HTTP server that stores every POSTed report as ``folder/<device_id>.json`` (call serve_forever)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handler = type("CollectorHandler", (_Handler,), {"folder": folder})
    return ThreadingHTTPServer((host, port), handler)


def start_collector(folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start a collector in a background thread; returns (server, its URL)."""
    srv = collector_server(folder, host, port)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://{host}:{srv.server_address[1]}/report"


__all__ = ["collector_server", "load_reports", "report_filename", "save_report", "start_collector", "summarize"]
