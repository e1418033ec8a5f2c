"""`slmops chat` end to end (in process): a tiny local model, a fake OpenAI-compatible server, errors."""

from __future__ import annotations

import builtins
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from slmops.cli.app import run

_spec = importlib.util.spec_from_file_location(
    "fake_openai", Path(__file__).resolve().parents[1] / "support" / "fake_openai.py")
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)


@pytest.fixture()
def typed(monkeypatch):
    """Feed lines to `input()`; EOFError (Ctrl-D) after the last one. Returns the lines not yet read."""

    def feed(*lines: str) -> list[str]:
        left = list(lines)

        def fake_input(prompt: str = "") -> str:
            if not left:
                raise EOFError
            return left.pop(0)

        monkeypatch.setattr(builtins, "input", fake_input)
        return left

    return feed


def test_chat_with_a_tiny_model_prints_the_reply_and_exits(tiny_model_dir, tmp_path, typed, capsys):
    from slmops.engines import GenerationRequest, open_engine

    eng = open_engine(tiny_model_dir)
    expected = eng.generate([GenerationRequest(messages=[{"role": "user", "content": "hello"}], max_new_tokens=5,
                                               temperature=0)])[0].text
    eng.close()
    left = typed("hello", "", "/history", "/exit", "never read")
    rc = run(["-w", str(tmp_path / "ws"), "chat", str(tiny_model_dir), "--temperature", "0", "--max-tokens", "5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert left == ["never read"]  # /exit stopped reading
    assert out.startswith(expected + "\n")  # the streamed pieces, then a newline
    assert f"[user] hello\n[assistant] {expected}" in out
    assert "/help for commands" in err


def test_chat_ends_on_ctrl_d_and_keeps_the_conversation(tiny_model_dir, tmp_path, typed, capsys):
    left = typed("hi", "/reset", "/system Be short.", "/prompt next", "again", "/history")
    rc = run(["-w", str(tmp_path / "ws"), "chat", str(tiny_model_dir), "--max-tokens", "3", "--seed", "0",
              "--system", "You triage tickets."])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert left == []
    assert "conversation cleared (system prompt kept)" in out
    # /prompt shows the ChatML rendering with the new system prompt and the message to be sent
    assert "<|im_start|>system\nBe short.<|im_end|>" in out and "<|im_start|>user\nnext<|im_end|>" in out
    history = out[out.index("[system] Be short."):]
    assert "[user] again" in history and "[user] hi" not in history


def test_chat_through_a_server_url_with_an_api_key(tmp_path, typed, capsys, monkeypatch):
    monkeypatch.delenv("SLMOPS_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    srv = fake.FakeServer(api_key="s3cret", model="teacher").start()
    try:
        url = srv.url + "#teacher"
        typed("first", "second")
        assert run(["-w", str(tmp_path / "ws"), "chat", url, "--api-key", "s3cret"]) == 0
        out = capsys.readouterr().out
        assert out == (fake.answer_for([{"role": "user", "content": "first"}]) + "\n"
                       + fake.answer_for([{"role": "user", "content": "second"}]) + "\n")
        # a failed turn is reported, the chat goes on, and the exit code says something failed
        left = typed("no key", "/exit")
        assert run(["-w", str(tmp_path / "ws"), "chat", url]) == 1
        assert left == []
        assert "401" in capsys.readouterr().err
    finally:
        srv.kill()


def test_model_without_a_chat_template_fails_clearly(tiny_model_dir, tmp_path, typed, capsys):
    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    typed("hello")
    assert run(["-w", str(tmp_path / "ws"), "chat", str(model)]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_chat_bad_options(tmp_path, capsys):
    assert run(["-w", str(tmp_path / "ws"), "chat", "x", "--temperature", "-1"]) == 2
    assert run(["-w", str(tmp_path / "ws"), "chat", str(tmp_path / "missing")]) == 2
    assert "no model" in capsys.readouterr().err
