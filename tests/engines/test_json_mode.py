"""JSON mode: the prefix checker, and constrained decoding on the torch, ort-genai and llama.cpp engines
gives one valid JSON object even from a random model."""

from __future__ import annotations

import json
import random

import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.engines.constraints import COMPLETE, INVALID, PARTIAL, allowed_tokens, json_prefix_state

from ..export.llama_support import needs_llama


@pytest.mark.parametrize("text, state", [
    ("{", PARTIAL), ("{}", COMPLETE), (' {"a": 1} ', COMPLETE), ('{"a": [1, 2.5e3, "x\\n", true, null, {}]}', COMPLETE),
    ('{"a": 01}', INVALID), ('{"a": -', PARTIAL), ('{"a": tr', PARTIAL), ('{"a": tx', INVALID), ("[1]", INVALID),
    ('{"a" 1}', INVALID), ('{"a":1,}', INVALID), ('{"a": "\\u12', PARTIAL), ('{"a": "\\q"}', INVALID),
    ("{} x", INVALID), ('{"a":1}}', INVALID), ('{"a": "b\nc"}', INVALID), ("", PARTIAL), ("x", INVALID),
])
def test_prefix_states(text, state):
    assert json_prefix_state(text) == state


def test_every_prefix_of_real_json_is_partial():
    rng = random.Random(0)

    def value(depth=0):
        r = rng.random()
        if depth > 2 or r < 0.3:
            return rng.choice([1, -2.5, 1e10, 's"q\\', True, None, "é✓", 0, ""])
        if r < 0.65:
            return {f"k{i}": value(depth + 1) for i in range(rng.randint(0, 3))}
        return [value(depth + 1) for _ in range(rng.randint(0, 3))]

    for _ in range(200):
        text = json.dumps({f"k{i}": value() for i in range(rng.randint(0, 3))}, ensure_ascii=rng.random() < 0.5)
        assert json_prefix_state(text) == COMPLETE
        assert all(json_prefix_state(text[:j]) == PARTIAL for j in range(len(text)))


def test_allowed_tokens_keeps_order_and_gates_eos():
    pieces = {0: "{", 1: "x", 2: '"a"', 3: "}", 9: ""}
    assert allowed_tokens("", [1, 9, 0, 3], pieces.__getitem__, lambda t: t == 9) == [0]
    assert allowed_tokens("{", [1, 3, 2, 9], pieces.__getitem__, lambda t: t == 9) == [3, 2]
    assert allowed_tokens("{}", [9, 1], pieces.__getitem__, lambda t: t == 9) == [9]


def _check(engine, prompts):
    for temp in (0.0, 1.0):
        reqs = [GenerationRequest(messages=[{"role": "user", "content": p}], max_new_tokens=96, json_mode=True,
                                  temperature=temp, seed=3) for p in prompts]
        for r in engine.generate(reqs):
            if r.finish_reason == "stop":
                assert isinstance(json.loads(r.text), dict), r.text
            else:
                assert json_prefix_state(r.text) == PARTIAL, r.text


PROMPTS = ["Where is my order ORD-12345?", "Cancel it", "Hi, my coffee grinder arrived broken. Order #998877."]


def test_torch_engine_json_mode(tiny_model_dir):
    engine = open_engine(tiny_model_dir)
    _check(engine, PROMPTS)
    # the constraint forces an object even where the model would write something else
    free = engine.generate([GenerationRequest(prompt="Cancel it", max_new_tokens=8)])[0].text
    forced = engine.generate([GenerationRequest(prompt="Cancel it", max_new_tokens=8, json_mode=True)])[0].text
    assert forced.lstrip().startswith("{") and not free.lstrip().startswith("{")


def test_demo_teacher_json_mode_matches_its_free_answer():
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR

    engine = open_engine(BUNDLED_TEACHER_DIR)
    for p in PROMPTS:
        free = engine.generate([GenerationRequest(messages=[{"role": "user", "content": p}], max_new_tokens=96)])[0]
        forced = engine.generate([GenerationRequest(messages=[{"role": "user", "content": p}], max_new_tokens=96,
                                                    json_mode=True)])[0]
        assert forced.finish_reason == "stop" and isinstance(json.loads(forced.text), dict)
        try:
            valid = json.loads(free.text)
        except ValueError:  # the teacher sometimes writes broken JSON: JSON mode keeps it valid
            continue
        assert json.loads(forced.text) == valid  # a constraint the answer already met changes nothing


def test_ort_genai_json_mode(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR
    from slmops.export.onnx import export_onnx

    out = export_onnx(BUNDLED_TEACHER_DIR, tmp_path / "fp32", precision="fp32").out_dir
    _check(open_engine(out), PROMPTS)


@needs_llama
def test_llamacpp_json_mode(tmp_path, tiny_model_dir):
    from slmops.export.gguf import export_gguf

    out = tmp_path / "tiny.gguf"
    export_gguf(tiny_model_dir, out, quant="f16", measure=False, modelfile=False)
    engine = open_engine(out)
    try:
        _check(engine, PROMPTS)
    finally:
        engine.close()
