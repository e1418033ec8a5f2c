"""GGUF export end to end (needs llama-cpp-python and llama.cpp's converter: `make llama-cpp`): a registered
q4_k_m export of the demo teacher with parity, and failures that never leave or damage files."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmops.errors import GateFailedError, SlmopsError
from slmops.export import llamacpp
from slmops.export.gguf import export_gguf

from .conftest import write_jsonl
from .llama_support import needs_llama


@needs_llama
def test_registered_q4_export_with_parity_and_modelfile(tmp_path, teacher_dir, eval_records):
    """The demo teacher's own BPE (unknown to llama.cpp's converter) converts; q4_k_m is registered with its
    parity metrics; the MLP (688 wide) is padded so every tensor is quantized."""
    from slmops.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    base = ws.import_folder(teacher_dir, "model", name="teacher").id
    data = write_jsonl(tmp_path / "eval.jsonl", eval_records[:3])
    out = tmp_path / "teacher-q4.gguf"
    res = export_gguf(base, out, quant="q4_k_m", workspace=ws, eval_file=data, max_new_tokens=64,
                      min_task_retention=0.5, max_ppl_increase=0.2)
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF" and res.bytes == out.stat().st_size
    assert res.details["pre_tokenizer"] == "gpt-2" and res.details["pre_tokenizer_detected"] is False
    assert res.details["tokenizer_agreement"]["rate"] == 1.0
    assert res.details["ffn_padded"] == {"from": 688, "to": 768} and res.details["quantize_fallbacks"] == []
    assert res.size_ratio_vs_fp16 < 0.36
    p = res.parity
    assert p.exact_match_retention == 1.0 and p.mean_kl < 0.02 and p.top1_agreement > 0.9
    assert abs(p.ppl_ratio - 1) < 0.05
    mf = Path(res.modelfile)
    assert mf == tmp_path / "teacher-q4.Modelfile" and "FROM ./teacher-q4.gguf" in mf.read_text()
    m = ws.manifest(res.artifact_id)
    assert m.kind == "export" and m.parents == [base] and m.config["quant"] == "q4_k_m"
    assert m.metrics["parity"]["exact_match_retention"] == 1.0 and m.metrics["size_ratio_vs_fp16"] < 0.36
    folder = ws.resolve(res.artifact_id)
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "model.gguf", "slmops.json"]
    assert "FROM ./model.gguf" in (folder / "Modelfile").read_text()
    assert ws.verify(res.artifact_id).ok
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # the artifact opens in the llama.cpp engine by id
    from slmops.engines import open_engine

    eng = open_engine(res.artifact_id, workspace=ws)
    try:
        assert eng.name == "llama.cpp" and eng.info().precision == "q4_k_m"
    finally:
        eng.close()


@needs_llama
def test_failures_never_leave_or_damage_files(tmp_path, teacher_dir, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")

    def broken(*a, **kw):
        raise SlmopsError("llama.cpp could not quantize (simulated)")

    monkeypatch.setattr(llamacpp, "quantize", broken)
    with pytest.raises(SlmopsError, match="simulated"):
        export_gguf(teacher_dir, out, quant="q4_0", force=True, measure=False)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no partial folder, no Modelfile
    monkeypatch.undo()

    # a failing gate: exit code 3, nothing written or registered, the old file kept
    from slmops.export import parity
    from slmops.workspace import Workspace

    def bad_report(*a, **kw):
        return parity.ParityReport(ppl_source=2.0, ppl_candidate=3.0, ppl_ratio=1.5, n_texts=3)

    monkeypatch.setattr(parity, "measure_parity", bad_report)
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(GateFailedError, match="perplexity rose") as e:
        export_gguf(teacher_dir, out, quant="f16", force=True, workspace=ws, max_ppl_increase=0.1,
                    texts=["Where is my order 12345?"])
    assert e.value.exit_code == 3 and e.value.report.ppl_ratio == 1.5
    assert out.read_bytes() == b"previous export" and not (tmp_path / "m.Modelfile").exists()
    assert ws.registry.list() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "ws"]
