"""The HTML report in a real headless browser (Chromium): every plot decodes, the key elements exist after
rendering, and the screenshot shows the plots (not a blank page) where the page put them.

Needs a Chromium binary (Debian: `apt-get install chromium`; or set SLMOPS_CHROMIUM to one); skipped without.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from slmops.report import build_report

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _chromium() -> str | None:
    env = os.environ.get("SLMOPS_CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary on PATH (install Debian's `chromium` package, or set SLMOPS_CHROMIUM=/path/to/chrome)")

# the colours each plot must show (see slmops.report.plots): lineage box fills, scatter markers, bars
EXPECTED_COLOURS = {
    "lineage": ["#fee6ce", "#deebf7", "#efedf5"],        # model, dataset, export boxes
    "quality_latency": ["#fd8d3c", "#9e9ac8"],          # model and export markers
    "quality_size": ["#fd8d3c", "#9e9ac8"],
    "throughput": ["#3182bd", "#9ecae1"],               # decode and prefill bars
    "memory": ["#e6550d"],
}


def _browser(tmp_path: Path, *args: str, height: int = 3000) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size=1280,{height}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def _near(pixels, colour: str, tol: int = 10) -> int:
    import numpy as np

    return int((np.abs(pixels[..., :3].astype(int) - np.array(_hex(colour))).max(axis=-1) <= tol).sum())


def test_report_renders_in_headless_chromium(lifecycle_ws, tmp_path):
    import numpy as np
    from PIL import Image

    ws, _ = lifecycle_ws
    files = build_report(ws, tmp_path / "report.html", title="Browser check")
    url = files.html.resolve().as_uri()

    # 1. the DOM after rendering: title, sections, every image decoded (set by the page's own onload script)
    res = _browser(tmp_path, "--virtual-time-budget=10000", "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert "<title>Browser check</title>" in dom
    for heading in ("Lineage", "Quality vs speed and size", "Tokens per second and memory", "Variants",
                    "Quality gates", "Quality metrics", "Speed and memory", "Export parity"):
        assert f"<h2>{heading}</h2>" in dom, heading
    body = re.search(r"<body([^>]*)>", dom).group(1)
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    ok = int(re.search(r'data-images-ok="(\d+)"', body).group(1))
    height = int(re.search(r'data-height="(\d+)"', body).group(1))
    assert total == ok == 5, (ok, total)
    imgs = re.findall(r"<img([^>]*)>", dom)
    boxes = {}
    for attrs in imgs:
        src = re.search(r'src="([^"]*)"', attrs).group(1)
        assert src.startswith("data:image/png;base64,") and len(src) > 1000
        alt = unescape(re.search(r'alt="([^"]*)"', attrs).group(1))
        x, y, w, h = map(int, re.search(r'data-box="([^"]+)"', attrs).group(1).split(","))
        assert w > 200 and h > 100, (alt, w, h)
        boxes[alt] = (x, y, w, h)
    assert set(boxes) == {"Lineage", "Quality vs latency", "Quality vs size", "Tokens per second", "Memory"}
    assert "FAIL" in dom and "exact_match 0.8765 &lt; 0.9 (short by 0.0235)" in dom

    # 2. the screenshot of the whole page, looked at
    shot = tmp_path / "report.png"
    height = min(height + 40, 16000)
    res = _browser(tmp_path, f"--screenshot={shot}", url, height=height)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[1] == 1280 and img.shape[0] >= height - 50
    assert img.std() > 20                                       # not a blank page
    assert len(np.unique(img.reshape(-1, 3) // 8, axis=0)) > 100   # many colours: plots, not only text
    names = {"Lineage": "lineage", "Quality vs latency": "quality_latency", "Quality vs size": "quality_size",
             "Tokens per second": "throughput", "Memory": "memory"}
    for alt, (x, y, w, h) in boxes.items():
        region = img[y:y + h, x:x + w]
        assert region.shape[0] > 100 and region.std() > 10, alt          # the plot is painted there
        for colour in EXPECTED_COLOURS[names[alt]]:
            assert _near(region, colour) >= 20, (alt, colour)             # its colours, in its box
        # and white margins around the figure: the plot is inside the box, not spilling over the page
        assert (region[2:-2, 2:-2] > 245).all(axis=-1).mean() > 0.3, alt
