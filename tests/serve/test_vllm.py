"""The vLLM launch command: exact argv and env from tiny fake folders (vLLM itself is not needed)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from slmops.errors import BadInputError, NotFoundError
from slmops.serve.vllm import VllmLaunch, format_command, vllm_available, vllm_command

SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def hf_model(root: Path, name: str = "model") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def lora(root: Path, name: str, r) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 16}))
    (d / "adapter_model.safetensors").write_bytes(b"fake")
    return d


def test_model_only_exact_argv_and_empty_env(tmp_path):
    m = hf_model(tmp_path)
    launch = vllm_command([(str(m), "tiny")], {}, host="127.0.0.1", port=8000, api_key=None)
    assert isinstance(launch, VllmLaunch)
    assert launch.argv == [*SERVER, "--model", str(m.resolve()), "--served-model-name", "tiny",
                           "--host", "127.0.0.1", "--port", "8000"]
    assert launch.env == {}


def test_adapters_key_max_len_extra_args(tmp_path):
    m = hf_model(tmp_path)
    a8, a16 = lora(tmp_path, "a8", 8), lora(tmp_path, "a16", 16)
    launch = vllm_command([(str(m), "base-model")], {"support": str(a8), "billing": str(a16)},
                          host="0.0.0.0", port=9001, api_key="s3cret", max_model_len=2048,
                          extra_args=["--gpu-memory-utilization", "0.8"], executable="/opt/py/bin/python")
    assert launch.argv == [
        "/opt/py/bin/python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(m.resolve()), "--served-model-name", "base-model", "--host", "0.0.0.0", "--port", "9001",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
        "--lora-modules", f"support={a8.resolve()}", f"billing={a16.resolve()}",
        "--max-model-len", "2048", "--gpu-memory-utilization", "0.8",
    ]
    assert launch.env == {"VLLM_API_KEY": "s3cret"}
    assert not any("s3cret" in a for a in launch.argv) and "--api-key" not in launch.argv
    assert launch.environ()["VLLM_API_KEY"] == "s3cret"


@pytest.mark.parametrize(("r", "rank"), [(4, 8), (8, 8), (12, 16), (64, 64), (300, 320)])
def test_lora_rank_rounds_up_to_a_rank_vllm_accepts(tmp_path, r, rank):
    m, a = hf_model(tmp_path), lora(tmp_path, "a", r)
    argv = vllm_command([(str(m), "m")], {"a": str(a)}, host="h", port=1, api_key=None).argv
    assert argv[argv.index("--max-lora-rank") + 1] == str(rank)


def test_format_command_quotes_and_hides_the_key(tmp_path):
    m = hf_model(tmp_path, "my model")  # a space: must be quoted
    launch = vllm_command([(str(m), "tiny")], {}, host="127.0.0.1", port=8000, api_key="s3cret")
    line = format_command(launch)
    assert "s3cret" not in line
    assert line.startswith("VLLM_API_KEY=$VLLM_API_KEY ")
    assert shlex.split(line)[1:] == launch.argv
    assert format_command(VllmLaunch(argv=["python", "-m", "x"])) == "python -m x"


def test_hub_id_passes_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = vllm_command([("Qwen/Qwen2.5-0.5B-Instruct", "qwen")], None, host="h", port=1, api_key=None).argv
    assert argv[argv.index("--model") + 1] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_more_than_one_model_is_refused(tmp_path):
    a, b = hf_model(tmp_path, "a"), hf_model(tmp_path, "b")
    with pytest.raises(BadInputError) as e:
        vllm_command([(str(a), "a"), (str(b), "b")], {}, host="h", port=1, api_key=None)
    assert "one base model per process" in e.value.message and "one `slmops serve" in e.value.hint
    with pytest.raises(BadInputError):
        vllm_command([], {}, host="h", port=1, api_key=None)


def test_gguf_onnx_and_adapter_folders_name_the_engine_to_use(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    gguf_dir = tmp_path / "gguf-export"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(b"GGUF")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "genai_config.json").write_text("{}")
    (onnx / "config.json").write_text("{}")  # onnx exports keep the HF config beside genai_config.json
    for path, what in ((gguf, "GGUF"), (gguf_dir, "GGUF"), (onnx, "ONNX")):
        with pytest.raises(BadInputError) as e:
            vllm_command([(str(path), "m")], {}, host="h", port=1, api_key=None)
        assert what in e.value.message and "Hugging Face" in e.value.message
        assert f"slmops serve {path}" in e.value.hint and "without --engine vllm" in e.value.hint
    adapter = lora(tmp_path, "ad", 8)
    with pytest.raises(BadInputError) as e:
        vllm_command([(str(adapter), "m")], {}, host="h", port=1, api_key=None)
    assert "adapter" in e.value.message and f"--adapter ADAPTER={adapter}" in e.value.hint


def test_bad_adapters_and_args(tmp_path):
    m = hf_model(tmp_path)
    call = lambda adapters, **kw: vllm_command([(str(m), "m")], adapters, host="h", port=kw.pop("port", 1),  # noqa: E731
                                               api_key=None, **kw)
    with pytest.raises(BadInputError, match="not an adapter folder"):
        call({"x": str(hf_model(tmp_path, "full"))})
    with pytest.raises(NotFoundError):
        call({"x": str(tmp_path / "missing")})
    with pytest.raises(BadInputError, match="rank"):
        call({"x": str(lora(tmp_path, "no-r", None))})
    with pytest.raises(BadInputError, match="largest rank"):
        call({"x": str(lora(tmp_path, "huge", 1024))})
    a = lora(tmp_path, "ok", 8)
    with pytest.raises(BadInputError, match="reserved"):
        call({"base": str(a)})
    with pytest.raises(BadInputError, match="served model's name"):
        call({"m": str(a)})
    lora_file = tmp_path / "adapter.lora.gguf"
    lora_file.write_bytes(b"GGUF")
    with pytest.raises(BadInputError, match="is a file"):
        call({"x": str(lora_file)})
    with pytest.raises(BadInputError, match="--api-key is set by slmops"):
        call({}, extra_args=["--api-key=leak"])
    with pytest.raises(BadInputError, match="port"):
        call({}, port=0)
    with pytest.raises(NotFoundError):
        vllm_command([(str(tmp_path / "nope"), "m")], {}, host="h", port=1, api_key=None)


def test_vllm_available_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    reason = vllm_available()
    assert reason is not None and "pip install vllm" in reason and "GPU" in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert vllm_available() is None
