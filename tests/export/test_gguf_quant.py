"""Quantized GGUF exports of the demo teacher stay close to the torch model (needs `make llama-cpp`).

Stated bounds (next-token distributions on 12 demo conversations, KL(torch || gguf) averaged over positions):
q8_0 mean KL < 1e-3 and top-1 agreement >= 97% (measured 1.5e-4, 98.6%); q4_k_m mean KL < 1e-2 and top-1
>= 95% (measured 2.7e-3, 98.5%), with or without an importance matrix (measured 2.5e-3 with one). f16 is
covered in tests/engines/test_llamacpp_engine.py (every log-prob within 0.01 of torch)."""

from __future__ import annotations

import pytest

from slmops.export.gguf import export_gguf
from slmops.export.parity import compare_distributions

from .conftest import write_jsonl
from .llama_support import needs_llama

pytestmark = needs_llama


@pytest.fixture(scope="module")
def torch_teacher(teacher_dir):
    from slmops.engines.torch_engine import TorchEngine

    return TorchEngine(teacher_dir)


def _kl(torch_teacher, path, texts):
    from slmops.engines.llamacpp_engine import LlamaCppEngine

    eng = LlamaCppEngine(path)
    try:
        kl, top1, rows, notes = compare_distributions(torch_teacher, eng, texts)
    finally:
        eng.close()
    assert notes == [] and rows > 500
    return kl, top1


def test_q8_0_within_bound(tmp_path, teacher_dir, torch_teacher, eval_texts):
    res = export_gguf(teacher_dir, tmp_path / "q8.gguf", quant="q8_0", measure=False)
    kl, top1 = _kl(torch_teacher, tmp_path / "q8.gguf", eval_texts)
    assert kl < 1e-3 and top1 >= 0.97
    assert res.details["quantize_fallbacks"] == [] and res.size_ratio_vs_fp16 < 0.62


def test_q4_k_m_within_bound_with_and_without_imatrix(tmp_path, teacher_dir, torch_teacher, eval_texts, eval_records):
    plain = export_gguf(teacher_dir, tmp_path / "q4.gguf", quant="q4_k_m", measure=False, modelfile=False)
    calib = write_jsonl(tmp_path / "calib.jsonl", eval_records[12:])  # disjoint from the texts measured
    im = export_gguf(teacher_dir, tmp_path / "q4-im.gguf", quant="q4_k_m", measure=False, modelfile=False,
                     imatrix_file=calib)
    info = im.details["imatrix"]
    assert info["entries"] == 28 and info["tokens"] > 500 and info["unmapped"] == ["lm_head"]  # tied: no output.weight
    assert plain.size_ratio_vs_fp16 < 0.36 and im.bytes == plain.bytes
    kl, top1 = _kl(torch_teacher, tmp_path / "q4.gguf", eval_texts)
    kl_im, top1_im = _kl(torch_teacher, tmp_path / "q4-im.gguf", eval_texts)
    assert kl < 1e-2 and top1 >= 0.95
    assert kl_im < 1e-2 and top1_im >= 0.95
    assert (tmp_path / "q4.gguf").read_bytes() != (tmp_path / "q4-im.gguf").read_bytes()  # the matrix was used


def test_token_embeddings_can_take_a_smaller_type(tmp_path, teacher_dir, torch_teacher, eval_texts):
    """q4_k_m keeps the token embeddings at q6_k; --token-embedding-type q4_k shrinks the file at some cost
    (stated bound: KL < 2e-2, top-1 >= 95%; measured ~1e-2, 97%)."""
    plain = export_gguf(teacher_dir, tmp_path / "a.gguf", quant="q4_k_m", measure=False, modelfile=False)
    small = export_gguf(teacher_dir, tmp_path / "b.gguf", quant="q4_k_m", measure=False, modelfile=False,
                        token_embedding_type="q4_k")
    assert small.bytes < plain.bytes and small.details["token_embedding_type"] == "q4_k"
    kl, top1 = _kl(torch_teacher, tmp_path / "b.gguf", eval_texts)
    assert kl < 2e-2 and top1 >= 0.95
    with pytest.raises(Exception, match="cannot be stored as q2_k|unknown tensor type"):
        export_gguf(teacher_dir, tmp_path / "d.gguf", quant="q4_k_m", measure=False, token_embedding_type="q5_1x")
    with pytest.raises(Exception, match="unknown tensor type"):
        export_gguf(teacher_dir, tmp_path / "c.gguf", quant="q4_k_m", measure=False, token_embedding_type="q9")
