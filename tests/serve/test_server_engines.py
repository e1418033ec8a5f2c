"""The same server over the other engines: an ONNX Runtime GenAI export (static batching) and a GGUF file
(llama.cpp, one request at a time) answer exactly what their engines answer directly, concurrently too."""

from __future__ import annotations

import threading

import openai
import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.serve.manager import ModelSpec

from ..export.llama_support import needs_llama

PROMPTS = ["Where is my order ORD-12345?", "Cancel it", "Hi, my coffee grinder arrived broken. Order #998877."]


def _check(srv, model: str, engine) -> None:
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    refs = [engine.generate([GenerationRequest(messages=[{"role": "user", "content": p}], max_new_tokens=24)])[0]
            for p in PROMPTS]
    got: dict[int, tuple] = {}

    def run(i: int) -> None:
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[i % 3]}],
                                      max_tokens=24, temperature=0)
        got[i] = (r.choices[0].message.content, r.usage.completion_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {i: (refs[i % 3].text, refs[i % 3].completion_tokens) for i in range(6)}
    chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=24, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == refs[0].text


def test_onnx_export_through_the_server(start_server, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR
    from slmops.export.onnx import export_onnx

    out = export_onnx(BUNDLED_TEACHER_DIR, tmp_path_factory.mktemp("ort") / "fp32", precision="fp32").out_dir
    engine = open_engine(out)
    srv = start_server([ModelSpec(ref=str(out), name="teacher-onnx", engine_options={"max_batch_size": 4})])
    _check(srv, "teacher-onnx", engine)


@needs_llama
def test_gguf_through_the_server(start_server, tmp_path_factory):
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR
    from slmops.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "teacher-f16.gguf"
    export_gguf(BUNDLED_TEACHER_DIR, out, quant="f16", measure=False, modelfile=False)
    engine = open_engine(out)
    try:
        srv = start_server([ModelSpec(ref=str(out), name="teacher-gguf")])
        _check(srv, "teacher-gguf", engine)
        _check_json_schema(srv, "teacher-gguf")
    finally:
        engine.close()


SCHEMA = {"type": "object", "properties": {"intent": {"type": "string", "enum": ["order_status", "refund", "other"]},
                                           "order_id": {"type": "string", "pattern": "^ORD-[0-9]+$"}},
          "required": ["intent", "order_id"], "additionalProperties": False}


def _check_json_schema(srv, name: str) -> None:
    """response_format json_schema on the llama.cpp engine: the answer follows the schema (a grammar), even
    where the model's own answer would not (its intents are other words); a bad schema is a 400."""
    import json

    import openai

    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
    for msg in ("Where is my order ORD-12345?", "I want my money back for ORD-7"):
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": msg}], max_tokens=120,
                                      temperature=0, response_format={"type": "json_schema", "json_schema": {
                                          "name": "ticket", "schema": SCHEMA, "strict": True}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        answer = json.loads(r.choices[0].message.content)
        assert set(answer) == {"intent", "order_id"} and answer["intent"] in SCHEMA["properties"]["intent"]["enum"]
        assert answer["order_id"].startswith("ORD-") and answer["order_id"][4:].isdigit()
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                  response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert err.value.body["param"] == "response_format"
