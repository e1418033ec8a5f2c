"""ONNX export (onnxruntime-genai's builder): fp32 logits match torch, the folder is complete and registered
with its parity metrics, and bad inputs are refused before any work, with no half-written output ever.

Tolerance (fp32): next-token log-probabilities of the export differ from torch's by at most 1e-3 (absolute,
any position, any token id; measured about 1e-6), mean KL(torch || onnx) below 1e-6 and identical greedy
tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.errors import BadInputError, SlmopsError
from slmops.export.onnx import export_onnx, supported_architectures

from .conftest import make_lora

pytest.importorskip("onnxruntime_genai")  # the export extra: pip install 'slmops[export]'

FP32_MAX_ABS_LOGPROB_DIFF = 1e-3
FP32_MAX_MEAN_KL = 1e-6
PROMPTS = [
    "Where is my order ORD-12345? It has been two weeks.",
    "Hi, my coffee grinder arrived broken. Order #998877. This is urgent!",
    "Cancel it",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_dir, eval_records):
    """The demo teacher registered in a workspace and exported to fp32 ONNX with parity on 8 records."""
    from slmops.workspace import Workspace

    root = tmp_path_factory.mktemp("onnx")
    ws = Workspace(root / "ws")
    model_id = ws.import_folder(teacher_dir, "model", name="teacher").id
    res = export_onnx(model_id, root / "teacher-fp32", precision="fp32", workspace=ws,
                      eval_records=eval_records[:8], max_new_tokens=64)
    return {"ws": ws, "model_id": model_id, "res": res, "out": root / "teacher-fp32", "root": root}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Qwen2 (attention biases) with larger random weights than the default init, so its next-token
    distributions are far from uniform."""
    from transformers import AutoTokenizer

    from slmops.models.presets import create_model
    from slmops.models.tokenizer import save_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    model = create_model("tiny-qwen2", vocab_size=len(tok), seed=3, initializer_range=0.2)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
    out = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def _compare_logits(src_dir: Path, onnx_dir: Path, texts: list[str]) -> tuple[float, float]:
    src, cand = open_engine(src_dir), open_engine(onnx_dir)
    worst, kls = 0.0, []
    for text in texts:
        a = src.token_distributions([text])[0].astype(np.float64)
        b = cand.token_distributions([text])[0].astype(np.float64)
        assert a.shape == b.shape and a.shape[0] == len(src.tokenize(text))
        worst = max(worst, float(np.abs(a - b).max()))
        kls.append((np.exp(a) * (a - b)).sum(-1).mean())
    cand.close()
    return worst, float(np.mean(kls))


def test_fp32_logits_match_torch_llama(built, teacher_dir, eval_texts):
    worst, kl = _compare_logits(teacher_dir, built["out"], eval_texts[:4] + PROMPTS)
    assert worst <= FP32_MAX_ABS_LOGPROB_DIFF, worst
    assert kl <= FP32_MAX_MEAN_KL, kl


def test_fp32_logits_match_torch_qwen2(qwen_dir, tmp_path):
    res = export_onnx(qwen_dir, tmp_path / "q", precision="fp32")
    worst, kl = _compare_logits(qwen_dir, tmp_path / "q", PROMPTS)
    assert worst <= FP32_MAX_ABS_LOGPROB_DIFF, worst
    assert kl <= FP32_MAX_MEAN_KL, kl
    src, cand = open_engine(qwen_dir), open_engine(res.out_dir)
    reqs = [GenerationRequest(prompt=p, max_new_tokens=12) for p in PROMPTS]
    assert [r.token_ids for r in cand.generate(reqs)] == [r.token_ids for r in src.generate(reqs)]


def test_fp32_greedy_answers_equal_torch(built, teacher_dir, eval_records):
    src, cand = open_engine(teacher_dir), open_engine(built["out"])
    reqs = [GenerationRequest(messages=r["messages"][:1], max_new_tokens=64) for r in eval_records[:6]]
    ours = cand.generate(reqs)
    assert [r.token_ids for r in ours] == [r.token_ids for r in src.generate(reqs)]
    assert ours[0].text.startswith('{"intent"')


def test_folder_is_complete_for_onnxruntime_genai(built):
    out = built["out"]
    for f in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "export.json"):
        assert (out / f).is_file(), f
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    info = json.loads((out / "export.json").read_text())
    assert info["precision"] == "fp32" and info["parameters"] == built["res"].parameters
    assert not list(out.parent.glob(".*partial*"))

    import onnxruntime_genai as og  # loads with the runtime itself, chat template included

    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    rendered = tok.apply_chat_template('[{"role": "user", "content": "hi"}]', add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_export_is_registered_with_parity_metrics(built):
    ws, res = built["ws"], built["res"]
    assert res.artifact_id is not None
    m = ws.manifest(res.artifact_id)
    assert m.kind == "export" and m.parents == [built["model_id"]]
    assert m.config["precision"] == "fp32"
    for key in ("size_bytes", "size_ratio_vs_fp16", "ppl_source", "ppl_candidate", "ppl_ratio", "mean_kl",
                "top1_agreement", "exact_match_source", "exact_match_candidate", "exact_match_retention"):
        assert key in m.metrics, key
    assert m.metrics["exact_match_retention"] == pytest.approx(1.0)
    assert m.metrics["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert m.metrics["source_fp16_bytes"] == res.parameters * 2
    assert ws.verify(res.artifact_id).ok
    eng = open_engine(res.artifact_id, workspace=ws)  # the artifact opens as ort-genai
    assert eng.name == "ort-genai" and eng.info().precision == "fp32"


def test_supported_architectures_come_from_the_builder():
    archs = supported_architectures()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"} <= set(archs)


# ------------------------------------------------------------------------------------------ bad inputs


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_lists_what_is_supported(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError) as e:
        export_onnx(model, tmp_path / "out", precision="fp32")
    assert "GPT2LMHeadModel" in e.value.message and "LlamaForCausalLM" in e.value.message
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_refused(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model / f).unlink()
    with pytest.raises(BadInputError, match="no tokenizer"):
        export_onnx(model, tmp_path / "out", precision="int4")
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported_at_once(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(BadInputError) as e:
        export_onnx(tiny_model_dir, out, precision="fp16", execution_provider="cpu", int4_block_size=48)
    msg = e.value.message
    assert "fp16 is not available for the cpu" in msg and "block size" in msg and "--force" in msg
    assert (out / "keep.txt").read_text() == "old"


@pytest.fixture(scope="module")
def teacher_lora(tmp_path_factory, teacher_dir):
    return make_lora(teacher_dir, tmp_path_factory.mktemp("lora") / "a", seed=1)


def _edited_adapter(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_adapter_rank_mismatch_is_refused(teacher_dir, teacher_lora, tmp_path, mode):
    bad = _edited_adapter(teacher_lora, tmp_path / "bad", r=8)
    with pytest.raises(BadInputError, match=r"rank 4 in the weights, but adapter_config.json says r=8"):
        export_onnx(teacher_dir, tmp_path / "out", precision="fp32", adapter=bad, adapter_mode=mode)
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_base_shape_is_refused(teacher_dir, tiny_model_dir, tmp_path):
    other = make_lora(tiny_model_dir, tmp_path / "tiny-lora", seed=2)  # hidden 64, the teacher's is 256
    with pytest.raises(BadInputError) as e:
        export_onnx(teacher_dir, tmp_path / "out", precision="fp32", adapter=other)
    assert "maps 64 -> 64 features, the base's q_proj maps 256 -> 256" in e.value.message
    assert not (tmp_path / "out").exists()


def test_adapter_target_modules_mismatch_is_refused(teacher_dir, teacher_lora, tmp_path):
    foreign = _edited_adapter(teacher_lora, tmp_path / "foreign", target_modules=["q_proj", "v_proj", "c_attn"])
    with pytest.raises(BadInputError, match="targets modules a llama base does not have: c_attn"):
        export_onnx(teacher_dir, tmp_path / "out", precision="fp32", adapter=foreign)
    undeclared = _edited_adapter(teacher_lora, tmp_path / "undeclared", target_modules=["q_proj"])
    with pytest.raises(BadInputError, match="has weights for v_proj"):
        export_onnx(teacher_dir, tmp_path / "out", precision="fp32", adapter=undeclared, adapter_mode="runtime")
    assert not (tmp_path / "out").exists()


def test_runtime_mode_refuses_what_a_runtime_adapter_cannot_carry(teacher_dir, teacher_lora, tmp_path):
    dora = _edited_adapter(teacher_lora, tmp_path / "dora", use_dora=True)
    with pytest.raises(BadInputError, match="DoRA"):
        export_onnx(teacher_dir, tmp_path / "out", precision="fp32", adapter=dora, adapter_mode="runtime")


def test_model_that_is_an_adapter_gets_a_hint(teacher_lora, tmp_path):
    with pytest.raises(BadInputError, match="is an adapter, not a model"):
        export_onnx(teacher_lora, tmp_path / "out")


# ------------------------------------------------------------------------------ never half-written


def _fake_builder(source: Path, *, fail_after_writing: bool = False):
    """A stand-in for the model builder: copies a finished export (or writes half of one and fails)."""

    def run(src, out, *, precision, execution_provider, cache_dir, extra_options, log_path):
        out.mkdir(parents=True, exist_ok=True)
        if fail_after_writing:
            shutil.copy2(source / "model.onnx", out / "model.onnx")
            raise SlmopsError("onnxruntime-genai's model builder failed (exit code 1): simulated")
        for p in source.iterdir():
            if p.is_file() and p.name not in ("export.json", "slmops.json"):
                shutil.copy2(p, out / p.name)

    return run


def test_failed_build_leaves_no_folder_and_keeps_the_old_one(built, teacher_dir, tmp_path, monkeypatch):
    import slmops.export.onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "run_builder", _fake_builder(built["out"], fail_after_writing=True))
    with pytest.raises(SlmopsError, match="simulated"):
        export_onnx(teacher_dir, tmp_path / "fresh", precision="fp32")
    assert not (tmp_path / "fresh").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.onnx").write_text("the previous export")
    with pytest.raises(SlmopsError, match="simulated"):
        export_onnx(teacher_dir, old, precision="fp32", force=True)
    assert [p.name for p in old.iterdir()] == ["model.onnx"]
    assert (old / "model.onnx").read_text() == "the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # no .partial / .old leftovers


def test_force_replaces_only_when_complete(built, teacher_dir, tmp_path, monkeypatch):
    import slmops.export.onnx as onnx_mod

    calls = []
    fake = _fake_builder(built["out"])

    def spy(*args, **kw):
        calls.append(kw["extra_options"])
        return fake(*args, **kw)

    monkeypatch.setattr(onnx_mod, "run_builder", spy)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(BadInputError, match="--force"):
        export_onnx(teacher_dir, out, precision="int4")
    assert calls == [] and (out / "stale.txt").exists()
    res = export_onnx(teacher_dir, out, precision="int4", int4_block_size=64, int4_symmetric=False,
                      int4_accuracy_level=2, force=True)
    assert not (out / "stale.txt").exists() and (out / "genai_config.json").is_file()
    assert res.out_dir == str(out.resolve())
    # the int4 options reach the builder
    assert calls[0]["block_size"] == 64 and calls[0]["is_symmetric"] == "false" and calls[0]["accuracy_level"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
