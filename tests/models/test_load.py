"""Loading models and tokenizers from folders, the HF cache and (unreachable) hub ids."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from slmops.errors import BadInputError, NotFoundError
from slmops.models.load import (
    check_model_folder,
    hub_is_reachable,
    is_hub_id,
    load_model,
    load_tokenizer,
    model_info,
)
from slmops.models.presets import count_parameters, create_model

HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so no hub id is found locally whatever the machine has cached."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_round_trip_gives_identical_logits(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = create_model("tiny-llama", vocab_size=len(tok), seed=3).eval()
    out = tmp_path / "m"
    model.save_pretrained(out)
    tok.save_pretrained(out)

    loaded = load_model(out)
    loaded_tok = load_tokenizer(out)
    text = "Where is my order ORD-48213? The desk lamp has not arrived."
    ids = loaded_tok(text)["input_ids"]
    assert ids == tok(text)["input_ids"]
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_load_model_dtype_and_device(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device.type == "cpu"
    with pytest.raises(BadInputError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float7")


def test_tiny_model_dir_fixture_is_a_complete_folder(tiny_model_dir):
    assert check_model_folder(tiny_model_dir) == tiny_model_dir
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template and "{% generation %}" in tok.chat_template


def test_is_hub_id(tmp_path, monkeypatch):
    assert is_hub_id(HUB_ID)
    assert is_hub_id("meta-llama/Llama-3.2-1B-Instruct")
    for ref in ("gpt2", "a/b/c", "./org/name", "/abs/org", "~/org/name", "org/", "/name", "org/../x", "C:\\x\\y"):
        assert not is_hub_id(ref), ref
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # an existing local folder wins


def test_hub_id_offline_fails_fast_with_hint(monkeypatch, empty_hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer, model_info):
        start = time.monotonic()
        with pytest.raises(NotFoundError) as e:
            load(HUB_ID)
        assert time.monotonic() - start < 5
        msg = str(e.value)
        assert HUB_ID in msg and "unreachable" in msg
        assert f"huggingface-cli download {HUB_ID} --local-dir DIR" in e.value.hint


def test_hub_id_with_unreachable_endpoint_fails_fast(monkeypatch, empty_hf_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(NotFoundError, match="unreachable"):
        load_model(HUB_ID)
    assert time.monotonic() - start < 5


def test_reachability_probe_is_bounded(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://10.255.255.1")  # unroutable: connect hangs or fails
    start = time.monotonic()
    assert hub_is_reachable(timeout=0.5) is False
    assert time.monotonic() - start < 1.5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_is_reachable() is False


def test_reachability_probe_sees_an_answering_http_endpoint(monkeypatch):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_is_reachable(timeout=2) is True
    finally:
        server.shutdown()
        server.server_close()


def test_hub_id_found_in_the_hf_cache_loads_offline(monkeypatch, empty_hf_cache, tiny_model_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "models--slmops-test--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    model = load_model("slmops-test/tiny-llama")
    tok = load_tokenizer("slmops-test/tiny-llama")
    assert model.config.vocab_size == len(tok)
    assert model_info("slmops-test/tiny-llama")["architecture"] == "LlamaForCausalLM"


def test_missing_folder_is_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    for load in (load_model, load_tokenizer, model_info):
        with pytest.raises(NotFoundError, match="no-such-model"):
            load(missing)
    with pytest.raises(NotFoundError, match="no-such-model"):
        load_model("./models/no-such-model")


def test_folder_missing_config_or_tokenizer_is_bad_input(tmp_path, tiny_model_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    with pytest.raises(BadInputError, match="config.json") as e:
        load_model(folder)
    assert not isinstance(e.value, NotFoundError)
    load_tokenizer(folder)  # the tokenizer does not need config.json

    (folder / "tokenizer.json").unlink()
    with pytest.raises(BadInputError, match="tokenizer.json"):
        load_tokenizer(folder)

    weights_only = tmp_path / "w"
    shutil.copytree(tiny_model_dir, weights_only)
    (weights_only / "model.safetensors").unlink()
    with pytest.raises(BadInputError, match="model.safetensors"):
        load_model(weights_only)


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(BadInputError, match="got a file") as e:
        load_model(f)
    assert "llama.cpp" in e.value.hint


def test_model_info_reads_headers_not_weights(tiny_model_dir):
    info = model_info(tiny_model_dir)
    model = load_model(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["model_type"] == "llama"
    assert info["params"] == count_parameters(model)
    assert info["vocab_size"] == len(tok)
    assert info["dtype"] == "float32"
    assert info["bytes_on_disk"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert info["weight_files"] == ["model.safetensors"]
    assert (info["hidden_size"], info["num_layers"], info["tie_word_embeddings"]) == (64, 2, True)


def test_model_info_without_safetensors_counts_on_meta_device(tmp_path, tiny_model_dir):
    folder = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, folder)
    model = load_model(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    info = model_info(folder)
    assert info["params"] == count_parameters(model)
    assert info["weight_files"] == ["pytorch_model.bin"]
