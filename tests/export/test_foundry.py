"""`slmops export foundry`: a Foundry Local custom-model folder (ONNX export + inference_model.json whose
PromptTemplate renders exactly like the model's chat template) and the Ollama Modelfile hook beside a GGUF."""

from __future__ import annotations

import json
import shutil

import pytest

from slmops.cli.app import run

pytest.importorskip("onnxruntime_genai")  # the export extra: pip install 'slmops[export]'


def test_foundry_bundle_and_modelfile(teacher_dir, tmp_path, capsys):
    from slmops.engines import GenerationRequest, open_engine

    gguf = tmp_path / "teacher.gguf"
    gguf.write_bytes(b"GGUF")  # only its name matters for the Modelfile
    out = tmp_path / "foundry" / "demo-teacher"
    rc = run(["-w", str(tmp_path / "ws"), "-q", "export", "foundry", "--model", str(teacher_dir), "--out", str(out),
              "--precision", "int4", "--model-name", "support-triage", "--version", "3", "--gguf", str(gguf)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "inference_model.json" in printed and "ollama create" in printed
    im = json.loads((out / "inference_model.json").read_text())
    assert im["Name"] == "support-triage" and im["Version"] == "3"
    pt = im["PromptTemplate"]
    assert pt["prompt"] == "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n"
    assert pt["assistant"] == "<|im_start|>assistant\n{Content}<|im_end|>\n"
    assert im["ModelConfig"]["stop"] == ["<|im_end|>"] and im["ModelConfig"]["context_length"] == 512
    engine = open_engine(out)  # the bundle is an ONNX Runtime GenAI folder too
    msg = "Where is order #12345?"
    assert engine.render(GenerationRequest(messages=[{"role": "user", "content": msg}])) == \
        pt["prompt"].replace("{Content}", msg)
    modelfile = (tmp_path / "teacher.Modelfile").read_text()
    assert "FROM" in modelfile and "teacher.gguf" in modelfile and "<|im_end|>" in modelfile


def test_foundry_refuses_a_template_it_cannot_express(teacher_dir, tmp_path):
    from slmops.errors import BadInputError
    from slmops.export.foundry import export_foundry

    model = tmp_path / "m"
    shutil.copytree(teacher_dir, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}")
    with pytest.raises(BadInputError, match="PromptTemplate"):
        export_foundry(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
