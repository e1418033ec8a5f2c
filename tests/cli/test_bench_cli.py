"""`slmops bench` as users run it: bench.json/bench.md, manifest metrics for artifacts, refusals."""

from __future__ import annotations

import json

from slmops.cli.app import run

FAST = ["--prompt-tokens", "16,32", "--max-new-tokens", "6", "--repeats", "2", "--warmup", "1"]


def test_bench_writes_results_and_manifest_metrics(tiny_model_dir, tmp_path, capsys):
    from slmops.workspace import Workspace

    ws_dir = tmp_path / "ws"
    art = Workspace(ws_dir).import_folder(tiny_model_dir, "model", name="x")
    out = tmp_path / "bench"
    rc = run(["-q", "-w", str(ws_dir), "bench", "--model", art.id, "--model", str(tiny_model_dir), *FAST,
              "--long-run", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "decode tok/s" in printed and "Ratios" in printed

    payload = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in payload["rows"]] == [art.id, str(tiny_model_dir)]
    first, second = payload["rows"]
    assert first["name"] == "x" and first["artifact"] == art.id and "artifact" not in second
    for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s", "peak_rss_mb", "rss_growth", "cpu_util",
                "bytes_on_disk", "load_s", "model", "name", "engine", "format", "precision", "spread",
                "by_prompt_tokens", "repeats"):
        assert key in first, key
    assert first["peak_rss_mb"] > 0 and first["bytes_on_disk"] == second["bytes_on_disk"]
    assert list(payload["ratios"]) == [f"x/{tiny_model_dir.name}"]
    assert payload["machine"]["cores"] and payload["concurrency"] == []
    md = (out / "bench.md").read_text()
    assert md.startswith("# bench") and "Machine:" in md

    bench = Workspace(ws_dir).manifest(art.id).metrics["bench"]
    assert set(bench) == {"decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s", "peak_rss_mb", "rss_growth",
                          "cpu_util", "bytes_on_disk", "load_s"}
    assert bench["decode_tok_s"] == first["decode_tok_s"]
    # the plain folder outside the workspace got no manifest written into it
    assert not (tiny_model_dir / "slmops.json").exists()

    # comparing to results from this very machine works and adds new/old ratios
    out2 = tmp_path / "bench2"
    rc = run(["-q", "-w", str(ws_dir), "bench", "--model", art.id, *FAST, "--no-memory", "--out", str(out2),
              "--compare-to", str(out / "bench.json"), "--json"])
    assert rc == 0
    again = json.loads(capsys.readouterr().out)
    assert again["compared_to"]["ratios_new_over_old"]["x"]["decode_tok_s"] > 0
    assert "Compared to" in (out2 / "bench.md").read_text()


def test_compare_to_other_hardware_is_refused_before_measuring(tiny_model_dir, tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [], "machine": {"cpu": "Other CPU", "cores": 128, "memory_gib": 1024.0,
                                                       "machine": "riscv64", "torch_threads": 64, "gpu": None,
                                                       "libraries": {}}}))
    rc = run(["-w", str(tmp_path / "ws"), "bench", "--model", str(tiny_model_dir), "--compare-to", str(old)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "different machines" in err and "--force-compare" in err


def test_bad_options_exit_2(tiny_model_dir, tmp_path, capsys):
    ws = ["-w", str(tmp_path / "ws")]
    assert run([*ws, "bench", "--model", str(tiny_model_dir), "--concurrency", "1,x"]) == 2
    assert "--concurrency" in capsys.readouterr().err
    assert run([*ws, "bench", "--model", str(tiny_model_dir), "--repeats", "0"]) == 2
    assert run([*ws, "bench", "--model", str(tmp_path / "missing")]) == 2
    assert run([*ws, "bench"]) == 2  # --model is required
