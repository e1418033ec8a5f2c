"""`run_bench` end to end on the tiny model: the contract's keys, interleaving, ratios, concurrency, memory."""

from __future__ import annotations

import shutil

import pytest

from slmops.bench.run import BENCH_KEYS, BenchConfig, bench_markdown, measure_request, run_bench, write_bench
from slmops.errors import BadInputError


@pytest.fixture(scope="module")
def two_copies(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    a, b = root / "a", root / "b"
    shutil.copytree(tiny_model_dir, a)
    shutil.copytree(tiny_model_dir, b)
    return a, b


def test_bench_two_models_interleaved(two_copies, monkeypatch, tmp_path):
    import slmops.bench.run as run_mod

    calls = []
    real = run_mod.measure_request

    def spy(engine, request):
        calls.append(id(engine))
        return real(engine, request)

    monkeypatch.setattr(run_mod, "measure_request", spy)
    a, b = two_copies
    cfg = BenchConfig(models=[str(a), str(b)], prompt_tokens=[16, 48], max_new_tokens=8, repeats=2, warmup=1,
                      memory=False)
    payload = run_bench(cfg)
    # 3 rounds x 2 lengths x 2 models, alternating engines, order reversed in the second round
    assert len(calls) == 12
    ea, eb = calls[0], calls[1]
    assert ea != eb
    assert calls == [ea, eb, ea, eb, eb, ea, eb, ea, ea, eb, ea, eb]

    rows = payload["rows"]
    assert [r["name"] for r in rows] == ["a", "b"]
    for r in rows:
        for key in BENCH_KEYS:
            assert key in r
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and 0 < r["ttft_s"] < r["latency_s"]
        assert r["cpu_util"] > 0 and r["bytes_on_disk"] > 0 and r["load_s"] > 0
        assert r["peak_rss_mb"] is None  # memory=False
        assert set(r["spread"]) == {"decode_tok_s", "prefill_tok_s", "ttft_s", "latency_s"}
        assert set(r["by_prompt_tokens"]) == {"16", "48"}
        assert r["by_prompt_tokens"]["48"]["prompt_tokens"] > r["by_prompt_tokens"]["16"]["prompt_tokens"]
        assert r["by_prompt_tokens"]["16"]["completion_tokens"] == 8  # end-of-text ignored: always 8
        assert r["repeats"] == 2 and r["samples"] == 4
        assert r["engine"] == "torch" and r["format"] == "hf" and r["precision"] == "fp32"
    assert set(payload["ratios"]) == {"a/b"}
    assert payload["ratios"]["a/b"]["bytes_on_disk"] == 1.0
    assert payload["ratios"]["a/b"]["decode_tok_s"] > 0 and set(payload["ratios_of_medians"]) == {"a/b"}
    assert payload["machine"]["cpu"]
    assert payload["concurrency"] == []

    jpath, mpath = write_bench(payload, tmp_path)
    md = mpath.read_text()
    assert "Machine:" in md and "## By prompt length" in md and "## Ratios" in md
    assert jpath.name == "bench.json"
    assert "| a |" in bench_markdown(payload)


def test_eos_disabled_is_restored_and_measure_counts_tokens(tiny_model_dir):
    from slmops.bench.run import eos_disabled
    from slmops.engines import open_engine
    from slmops.engines.base import GenerationRequest

    e = open_engine(tiny_model_dir)
    saved = e.eos_ids
    with eos_disabled(e, True) as ok:
        assert ok and e.eos_ids == set()
    assert e.eos_ids == saved
    s = measure_request(e, GenerationRequest(prompt="hello", max_new_tokens=4))
    assert 1 <= s.completion_tokens <= 4 and s.latency_s >= s.ttft_s > 0


def test_concurrency_in_process_scales(tiny_model_dir):
    """c=4 through the server's continuous-batching scheduler gives more aggregate tokens/s than c=1."""
    cfg = BenchConfig(models=[str(tiny_model_dir)], prompt_tokens=[32], max_new_tokens=32, repeats=1, warmup=0,
                      concurrency=[1, 4], concurrency_requests=16, memory=False)
    payload = run_bench(cfg)
    conc = {r["concurrency"]: r for r in payload["concurrency"]}
    assert set(conc) == {1, 4}
    for r in conc.values():
        assert r["requests"] == 16 and r["tokens"] == 16 * 32 and r["where"] == "in-process"
        assert r["ttft_p50_s"] <= r["ttft_p95_s"]
    assert conc[4]["tok_s"] > conc[1]["tok_s"], conc
    assert "## Concurrency" in bench_markdown(payload)


def test_memory_profile_in_a_fresh_process(tiny_model_dir):
    cfg = BenchConfig(models=[str(tiny_model_dir)], prompt_tokens=[16], max_new_tokens=4, repeats=1, warmup=1,
                      long_run=3)
    row = run_bench(cfg)["rows"][0]
    mem = row["memory"]
    assert mem["method"] == "spawned process per model"
    assert row["peak_rss_mb"] >= mem["rss_end_mb"] > mem["runtime_rss_mb"] > 50  # torch alone is > 50 MB
    assert row["rss_growth"] == pytest.approx(mem["rss_end_mb"] - mem["rss_after_warmup_mb"])
    assert mem["long_run_requests"] == 3 and mem["long_run_tokens"] == 12
    assert row["load_s"] == mem["load_s"] > 0


def test_bad_settings_are_refused_at_once():
    with pytest.raises(BadInputError) as exc:
        BenchConfig(models=[], prompt_tokens=[0], max_new_tokens=1, repeats=0, concurrency=[0]).check()
    msg = str(exc.value)
    for part in ("--model", "--prompt-tokens", "--max-new-tokens", "--repeats", "--concurrency"):
        assert part in msg
