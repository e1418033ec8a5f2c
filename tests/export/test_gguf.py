"""GGUF export: Modelfile templates, tokenizer mapping, MLP padding, converter lookup (no llama.cpp needed), and
with llama-cpp-python + llama.cpp's converter installed (`make llama-cpp`): every bad input refused before work
starts, and the CLI. The full export and failure tests are in test_gguf_export.py."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from slmops.errors import BadInputError, SlmopsError
from slmops.export import llamacpp
from slmops.export.gguf import (
    export_gguf,
    gpt2_like_tokenizer,
    mlp_padding,
    ollama_template,
    pad_mlp,
    quant_block_size,
    write_modelfile,
)
from slmops.models.tokenizer import CHATML_TEMPLATE

from .conftest import make_lora
from .llama_support import llama_missing, needs_llama

_llama_ready = llama_missing() is None

LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")

CHATML_GO = (
    '{{ if .Messages }}{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
    '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ if $last }}<|im_start|>assistant\n{{ end }}'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}'
    '{{ end }}{{ end }}'
    '{{ else }}{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
    '{{ .Response }}{{ if .Response }}<|im_end|>\n{{ end }}{{ end }}'
)


# ----------------------------------------------------------------------------------------- no llama.cpp needed


def test_chatml_modelfile(tmp_path, tiny_tokenizer_dir):
    from slmops.models.load import load_tokenizer

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # only the name is used (the file is not read: the tokenizer has no bos)
    path = write_modelfile(gguf, load_tokenizer(str(tiny_tokenizer_dir)), parameters={"num_ctx": 512})
    assert path == tmp_path / "m.Modelfile"
    lines = path.read_text().splitlines()
    assert lines[1] == "FROM ./m.gguf"
    text = path.read_text()
    assert f'TEMPLATE """{CHATML_GO}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    assert "PARAMETER num_ctx 512" in text and "SYSTEM" not in text and "ADAPTER" not in text
    # a template string works too, and an adapter line is written
    path2 = write_modelfile(gguf, CHATML_TEMPLATE, tmp_path / "Modelfile", adapter_path="./a.lora.gguf",
                            eos_token="<|im_end|>")
    assert "ADAPTER ./a.lora.gguf" in path2.read_text() and CHATML_GO in path2.read_text()


def test_llama3_and_phi3_templates_and_default_system_prompt():
    ot = ollama_template(LLAMA3, bos_token="", eos_token="<|eot_id|>")
    assert ot.template.startswith("{{ if .Messages }}")  # bos left to the runtime
    assert '{{ else if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>' in ot.template
    assert "{{ if $last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}" in ot.template
    assert ot.stop == ["<|eot_id|>", "<|start_header_id|>"] and ot.system is None
    with_bos = ollama_template(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert with_bos.template.startswith("<|begin_of_text|>{{ if .Messages }}")

    ot = ollama_template(PHI3, eos_token="<|endoftext|>")
    assert '{{ if eq .Role "system" }}<|system|>\n{{ .Content }}<|end|>\n' in ot.template
    assert ot.stop == ["<|end|>", "<|endoftext|>", "<|user|>"]

    qwen = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
            "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
            "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
            "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- elif message.role == "
            "'assistant' %}{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    ot = ollama_template(qwen, eos_token="<|im_end|>")
    assert ot.system == "You are helpful." and ot.template == CHATML_GO


def test_template_that_is_not_per_role_is_refused():
    merged = ("{% for m in messages %}{% if loop.first and m['role'] == 'user' %}[FIRST]{{ m['content'] }}"
              "{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(BadInputError, match="cannot convert"):
        ollama_template(merged)


def test_go_template_renders_like_the_jinja_template(tmp_path):
    """Render the Modelfile TEMPLATE with Go's text/template (what Ollama uses) when Go is installed."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go) to render Ollama's Go templates")
    import os
    import subprocess

    from slmops.models.templates import render_chat_template

    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Order 42?"}],
    ]
    src = tmp_path / "render" / "main.go"
    src.parent.mkdir()
    src.write_text(
        'package main\nimport ("encoding/json"; "os"; "text/template")\n'
        "type M struct { Role string; Content string }\n"
        "func main() {\n var in struct { T string; Messages []M }\n"
        " json.NewDecoder(os.Stdin).Decode(&in)\n"
        ' t := template.Must(template.New("t").Parse(in.T))\n'
        ' if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil { panic(err) }\n}\n')
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    binary = tmp_path / "render-bin"
    subprocess.run([go, "build", "-o", str(binary), str(src)], check=True, env=env, capture_output=True)
    for template in (CHATML_TEMPLATE, LLAMA3, PHI3):
        ot = ollama_template(template, bos_token="", eos_token="")
        for chat in chats:
            want = render_chat_template(template, chat, add_generation_prompt=True)
            got = subprocess.run([str(binary)], input=json.dumps({"T": ot.template, "Messages": chat}),
                                 capture_output=True, text=True, check=True).stdout
            assert got == want, (template[:40], chat)


def test_gpt2_like_tokenizer_detection(tmp_path, tiny_tokenizer_dir, teacher_dir):
    assert gpt2_like_tokenizer(Path(tiny_tokenizer_dir)) and gpt2_like_tokenizer(teacher_dir)
    tj = json.loads((Path(tiny_tokenizer_dir) / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert not gpt2_like_tokenizer(tmp_path)
    assert not gpt2_like_tokenizer(tmp_path / "missing")


def test_quant_names_and_block_sizes():
    assert llamacpp.normalize_quant("Q4_K_M") == "q4_k_m" and llamacpp.normalize_quant("fp16") == "f16"
    assert quant_block_size("q4_k_m") == 256 and quant_block_size("q8_0") == 32 and quant_block_size("f16") == 1
    with pytest.raises(BadInputError, match="unknown GGUF quantization 'q3'"):
        llamacpp.normalize_quant("q3")


def test_mlp_padding_is_exact(tmp_path, tiny_model_dir):
    import torch

    from slmops.models.load import load_model

    assert mlp_padding(Path(tiny_model_dir), 1) is None
    old, new = mlp_padding(Path(tiny_model_dir), 256)
    assert (old, new) == (176, 256)
    padded = pad_mlp(Path(tiny_model_dir), tmp_path / "p", new)
    assert json.loads((padded / "config.json").read_text())["intermediate_size"] == 256
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        a = load_model(str(tiny_model_dir))(input_ids=ids).logits
        b = load_model(str(padded))(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_lora_padding_is_exact(tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel

    from slmops.export.gguf import pad_lora
    from slmops.models.load import load_model

    adapter = make_lora(Path(tiny_model_dir), tmp_path / "lora", seed=2, targets=("gate_proj", "up_proj", "down_proj"),
                        scale=0.3)
    padded = pad_mlp(Path(tiny_model_dir), tmp_path / "p", 256)
    padded_adapter = pad_lora(adapter, tmp_path / "lora-p", 176, 256)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        a = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(adapter))(input_ids=ids).logits
        b = PeftModel.from_pretrained(load_model(str(padded)), str(padded_adapter))(input_ids=ids).logits
        base = load_model(str(tiny_model_dir))(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base, atol=1e-3)


def test_converter_lookup_and_install_from_an_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(BadInputError, match="SLMOPS_LLAMA_CPP_DIR"):
        llamacpp.find_converter_dir()
    # a fake sdist with the layout of llama-cpp-python's
    root = tmp_path / "src" / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp"
    (root / "gguf-py" / "gguf").mkdir(parents=True)
    (root / "conversion").mkdir()
    (root / "convert_hf_to_gguf.py").write_text("# converter\n")
    (root / "convert_lora_to_gguf.py").write_text("# lora\n")
    (root / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (root / "conversion" / "__init__.py").write_text("")
    (root / "ggml").mkdir()  # not copied
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(tmp_path / "src" / "llama_cpp_python-9.9.9", arcname="llama_cpp_python-9.9.9")
    dest = llamacpp.install_converter(sdist, tmp_path / "conv")
    assert llamacpp.is_converter_dir(dest) and not (dest / "ggml").exists()
    assert json.loads((dest / llamacpp.STAMP).read_text())["llama_cpp_python"] == "9.9.9"
    monkeypatch.setenv(llamacpp.ENV_DIR, str(dest))
    assert llamacpp.find_converter_dir() == dest
    with pytest.raises(BadInputError, match="not a llama-cpp-python sdist"):
        llamacpp.install_converter(tmp_path / "src" / "llama_cpp_python-9.9.9" / "vendor", tmp_path / "conv2")


def test_missing_tools_are_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv(llamacpp.ENV_DIR, raising=False)
    monkeypatch.setattr(llamacpp, "_candidate_dirs", lambda: [("nowhere", tmp_path / "x")])
    with pytest.raises(SlmopsError, match="convert_hf_to_gguf.py\\) was not found") as e:
        llamacpp.find_converter_dir()
    assert "make llama-cpp" in e.value.hint


def test_existing_output_and_bad_names_are_refused_before_work(tmp_path, teacher_dir):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(BadInputError, match="already exists") as e:
        export_gguf(teacher_dir, out, quant="q8_0")
    assert "--force" in e.value.hint and out.read_bytes() == b"old"
    with pytest.raises(BadInputError, match="must be a .gguf file"):
        export_gguf(teacher_dir, tmp_path / "m.bin")
    with pytest.raises(BadInputError, match="unknown GGUF quantization"):
        export_gguf(teacher_dir, tmp_path / "n.gguf", quant="q9")
    with pytest.raises(BadInputError, match="unknown adapter mode"):
        export_gguf(teacher_dir, tmp_path / "n.gguf", adapter_mode="bake")
    if _llama_ready:  # the gate checks come after the tool checks
        with pytest.raises(BadInputError, match="needs evaluation records") as e:
            export_gguf(teacher_dir, tmp_path / "n.gguf", min_task_retention=0.9)
        assert "--eval-file" in e.value.hint
        with pytest.raises(BadInputError, match="is not quantized"):
            export_gguf(teacher_dir, tmp_path / "n.gguf", quant="f16", imatrix_file=__file__)
    assert list(tmp_path.iterdir()) == [out]


def test_missing_tokenizer_is_refused_before_work(tmp_path, tiny_model_dir):
    src = tmp_path / "notok"
    shutil.copytree(tiny_model_dir, src)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (src / f).unlink(missing_ok=True)
    with pytest.raises(BadInputError, match="missing tokenizer.json"):
        export_gguf(src, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*partial")) == []


# ----------------------------------------------------------------------------------------- with llama.cpp


@needs_llama
def test_unsupported_architecture_is_refused_before_work(tmp_path, tiny_model_dir):
    src = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="does not support the architecture 'FrobnicatorForCausalLM'") as e:
        export_gguf(src, tmp_path / "m.gguf")
    assert "onnx" in e.value.hint
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*partial")) == []


@needs_llama
def test_unknown_tokenizer_is_refused_before_work(tmp_path, tiny_model_dir):
    src = tmp_path / "ws-tok"
    shutil.copytree(tiny_model_dir, src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[0-9]{1,2}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(BadInputError, match="does not recognise this tokenizer") as e:
        export_gguf(src, tmp_path / "m.gguf")
    assert "--pre-tokenizer" in e.value.hint
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*partial")) == []


@needs_llama
def test_adapter_of_another_base_is_refused_before_work(tmp_path, teacher_dir, tiny_model_dir):
    adapter = make_lora(Path(tiny_model_dir), tmp_path / "lora", seed=1)
    with pytest.raises(BadInputError, match="adapter .* (does not fit|was trained on)"):
        export_gguf(teacher_dir, tmp_path / "m.gguf", adapter=adapter, adapter_mode="lora")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*partial")) == []


@needs_llama
def test_cli_export_gguf_json_and_help(tmp_path, tiny_model_dir, capsys):
    from slmops.cli.app import run

    assert run(["export", "gguf", "--help"]) == 0
    assert "slmops export gguf --model" in capsys.readouterr().out
    out = tmp_path / "tiny.gguf"
    rc = run(["-w", str(tmp_path / "ws"), "-q", "export", "gguf", "--model", str(tiny_model_dir), "--quant", "f16",
              "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads(captured.out)
    assert res["out"] == str(out) and res["precision"] == "f16" and res["artifact_id"].startswith("export-")
    assert res["parity"]["mean_kl"] < 1e-4 and res["parity"]["top1_agreement"] == 1.0
    rc = run(["-w", str(tmp_path / "ws"), "export", "gguf", "--model", str(tiny_model_dir), "--out", str(out)])
    assert rc == 2 and "already exist" in capsys.readouterr().err
