"""Hardware fingerprint and result writing shared by every benchmark.

Numbers from different machines are never compared as if they were one: every result file carries a
`machine` object (CPU model, cores, memory, library versions) and a one-line summary of it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_fingerprint() -> dict[str, Any]:
    from slmops.workspace import library_versions

    threads = None
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "memory_gib": _mem_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "libraries": library_versions(),
        "gpu": None,
    }


def machine_line(m: dict[str, Any] | None = None) -> str:
    m = m or machine_fingerprint()
    libs = m["libraries"]
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; python {libs.get('python')}, "
            f"torch {libs.get('torch')}, transformers {libs.get('transformers')}")


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".4g") -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, payload: dict[str, Any], markdown_body: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<out>/<name>.json` (payload + machine + time) and `<out>/<name>.md` (body + machine line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = payload.setdefault("machine", machine_fingerprint())
    payload.setdefault("generated", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    mpath.write_text(f"# {name}\n\nMachine: {machine_line(machine)}\n\nGenerated: {payload['generated']}\n\n"
                     + markdown_body)
    return jpath, mpath
