"""A LoRA adapter exported as a GGUF LoRA and applied by llama.cpp at run time answers exactly like the
adapter merged into the weights before export (needs `make llama-cpp`)."""

from __future__ import annotations

import pytest

from slmops.engines import GenerationRequest, open_engine
from slmops.errors import BadInputError
from slmops.export.gguf import export_gguf

from .conftest import make_lora
from .llama_support import needs_llama

pytestmark = needs_llama


@pytest.fixture(scope="module")
def exports(tmp_path_factory, teacher_dir, eval_texts):
    """The teacher + a LoRA on q/v/gate/down (changes most answers): exported as base + GGUF LoRA (registered,
    with parity on 4 texts) and merged (f16 both)."""
    from slmops.workspace import Workspace

    root = tmp_path_factory.mktemp("gguf-lora")
    adapter = make_lora(teacher_dir, root / "lora", seed=3, targets=("q_proj", "v_proj", "gate_proj", "down_proj"),
                        scale=0.14)
    ws = Workspace(root / "ws")
    lora = export_gguf(teacher_dir, root / "base.gguf", quant="f16", adapter=adapter, adapter_mode="lora",
                       workspace=ws, texts=eval_texts[:4])
    merged = export_gguf(teacher_dir, root / "merged.gguf", quant="f16", adapter=adapter, adapter_mode="merge",
                         measure=False, modelfile=False)
    return ws, lora, merged


def test_lora_at_run_time_equals_the_merged_export(exports):
    from slmops.demo.task import generate

    ws, lora, merged = exports
    assert lora.adapter_file.endswith("base.lora.gguf") and "ADAPTER ./base.lora.gguf" in open(lora.modelfile).read()
    assert lora.parity.mean_kl < 1e-4 and lora.parity.top1_agreement > 0.99  # vs torch base + PEFT adapter
    reqs = [GenerationRequest(messages=[{"role": "user", "content": ex.message}], max_new_tokens=64)
            for ex in generate(8, seed=5)]
    eng = open_engine(lora.out, adapters={"ft": lora.adapter_file})
    ref = open_engine(merged.out)
    try:
        base = eng.generate(reqs)
        with_lora = eng.generate([GenerationRequest(messages=r.messages, max_new_tokens=64, adapter="ft") for r in reqs])
        want = ref.generate(reqs)
        assert [r.text for r in with_lora] == [r.text for r in want]
        assert sum(a.text != b.text for a, b in zip(base, with_lora, strict=True)) >= 4  # the adapter matters
        # per request: base, adapter and base again, in one batch
        mixed = eng.generate([reqs[1], GenerationRequest(messages=reqs[1].messages, max_new_tokens=64, adapter="ft"),
                              GenerationRequest(messages=reqs[1].messages, max_new_tokens=64, adapter="base")])
        assert [m.text for m in mixed] == [base[1].text, with_lora[1].text, base[1].text]
        assert eng.info().extra["adapters"]["ft"] == lora.adapter_file
    finally:
        eng.close()
        ref.close()


def test_registered_lora_export_opens_with_its_adapter(exports):
    ws, lora, _ = exports
    folder = ws.resolve(lora.artifact_id)
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "adapter.lora.gguf", "model.gguf", "slmops.json"]
    m = ws.manifest(lora.artifact_id)
    assert m.config["adapter_mode"] == "lora" and m.metrics["parity"]["mean_kl"] < 1e-4
    eng = open_engine(lora.artifact_id, workspace=ws)
    try:
        assert eng.default_adapter == "adapter" and eng.adapters == ["adapter"]
    finally:
        eng.close()


def test_lora_for_another_model_is_refused(exports, tmp_path, tiny_model_dir):
    from slmops.export.gguf import export_gguf as export

    _, lora, _ = exports
    tiny = tmp_path / "tiny.gguf"
    export(tiny_model_dir, tiny, quant="f16", measure=False, modelfile=False)
    eng = open_engine(tiny)
    try:
        with pytest.raises(BadInputError, match="does not fit this model"):
            eng.load_adapter("ft", lora.adapter_file)
        assert eng.adapters == []
    finally:
        eng.close()
    with pytest.raises(BadInputError, match="is a GGUF LoRA adapter, not a model"):
        open_engine(lora.adapter_file)
