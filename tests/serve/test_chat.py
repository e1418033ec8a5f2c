"""ChatSession on a fake engine: history, streaming, slash commands, interrupts and failures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from slmops.engines.base import Engine, EngineInfo, GenerationRequest, TokenEvent
from slmops.errors import BadInputError, SlmopsError
from slmops.serve.chat import ChatSession


class FakeEngine:
    """Replies "echo: <last user message>" in 3-character pieces (cut at max_new_tokens pieces); the prompt
    is rendered as "<role>:content|" per message plus "assistant:"."""

    name = "fake"

    def __init__(self, fail: Exception | None = None):
        self.requests: list[GenerationRequest] = []
        self.fail = fail
        self.closed_streams = 0

    def info(self) -> EngineInfo:
        return EngineInfo(name="fake", format="hf", precision="fp32", parameters=0, bytes_on_disk=0,
                          device="cpu", path="fake")

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def render(self, request: GenerationRequest) -> str:
        assert request.messages is not None
        return "".join(f"<{m['role']}>:{m['content']}|" for m in request.messages) + "assistant:"

    def generate(self, requests):
        raise NotImplementedError

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        self.requests.append(request)
        reply = "echo: " + request.messages[-1]["content"]
        pieces = [reply[i:i + 3] for i in range(0, len(reply), 3)]
        cut = len(pieces) > request.max_new_tokens
        pieces = pieces[: request.max_new_tokens]
        try:
            yield TokenEvent(token_id=None, text="")  # engines may hold text back
            for i, p in enumerate(pieces):
                if self.fail is not None and i == 1:
                    raise self.fail
                last = i == len(pieces) - 1
                yield TokenEvent(token_id=i, text=p, prompt_tokens=7, completion_tokens=i + 1,
                                 finish_reason=("length" if cut else "stop") if last else None)
        finally:
            self.closed_streams += 1

    def logprobs(self, texts):
        return None

    def close(self) -> None:
        pass


def test_fake_engine_is_an_engine():
    assert isinstance(FakeEngine(), Engine)


def test_stream_pieces_join_to_the_reply_and_history_grows():
    eng = FakeEngine()
    s = ChatSession(eng, system="be brief", seed=3, adapter="lora1")
    pieces = list(s.send("hello there"))
    assert len(pieces) > 1 and "" not in pieces
    assert "".join(pieces) == "echo: hello there"
    assert s.history == [{"role": "user", "content": "hello there"},
                         {"role": "assistant", "content": "echo: hello there"}]
    req = eng.requests[0]
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert (req.temperature, req.max_new_tokens, req.seed, req.adapter) == (0.7, 256, 3, "lora1")
    assert s.last is not None and s.last.finish_reason == "stop" and s.last.prompt_tokens == 7
    assert s.last.completion_tokens == len(pieces)
    assert s.reply("again") == "echo: again"
    assert len(s.history) == 4
    # the second request carries the whole conversation
    assert [m["role"] for m in eng.requests[1].messages] == ["system", "user", "assistant", "user"]
    assert eng.closed_streams == 2


def test_reset_and_system_change_the_rendered_prompt():
    s = ChatSession(FakeEngine(), system="A")
    s.reply("hi")
    assert s.render("next") == "<system>:A|<user>:hi|<assistant>:echo: hi|<user>:next|assistant:"
    assert s.handle("/reset") == "conversation cleared (system prompt kept)"
    assert s.history == [] and s.system == "A"
    assert s.render("x") == "<system>:A|<user>:x|assistant:"
    s.reply("hi")
    assert "system prompt set" in s.handle("/system You are a pirate.")
    assert s.history == []
    assert s.render("x") == "<system>:You are a pirate.|<user>:x|assistant:"
    assert s.handle("/system") == "system prompt: 'You are a pirate.'"
    assert "removed" in s.handle("/system off")
    assert s.render("x") == "<user>:x|assistant:"
    assert s.handle("/prompt  next one") == "<user>:next one|assistant:"
    assert s.handle("/prompt") == "<user>:|assistant:"


def test_sampling_commands_and_validation():
    eng = FakeEngine()
    s = ChatSession(eng)
    assert s.handle("hello") is None and s.handle("  not /a command") is None
    assert s.handle("/temp 0") == "temperature 0" and s.temperature == 0
    assert s.handle("/temp -1").startswith("usage") and s.temperature == 0
    assert s.handle("/temp abc").startswith("usage")
    assert s.handle("/max 2") == "at most 2 tokens per reply" and s.max_new_tokens == 2
    assert s.handle("/max 0").startswith("usage") and s.max_new_tokens == 2
    assert s.handle("/seed 5") == "seed 5" and s.seed == 5
    assert s.handle("/seed off") == "no seed (replies vary)" and s.seed is None
    assert "/reset" in s.handle("/help")
    assert "unknown command /nope" in s.handle("/nope")
    assert s.reply("a long message") == "echo: "  # 2 pieces of 3 characters
    assert s.last.finish_reason == "length"
    assert eng.requests[-1].temperature == 0 and eng.requests[-1].max_new_tokens == 2
    assert "[user] a long message" in s.handle("/history")
    assert not s.done and s.handle("/exit") == "" and s.done
    s2 = ChatSession(eng)
    s2.handle("/QUIT")
    assert s2.done
    with pytest.raises(BadInputError):
        ChatSession(eng, temperature=-1)
    with pytest.raises(BadInputError):
        ChatSession(eng, max_new_tokens=0)


def test_stopping_early_keeps_the_shown_part():
    eng = FakeEngine()
    s = ChatSession(eng)
    it = s.send("abcdefghijkl")
    assert next(it) == "ech"
    it.close()  # what the CLI does on Ctrl-C
    assert s.history == [{"role": "user", "content": "abcdefghijkl"}, {"role": "assistant", "content": "ech"}]
    assert s.last.interrupted and eng.closed_streams == 1
    it = s.send("never read")
    it.close()  # closed before it started: nothing happened
    assert len(s.history) == 2


def test_engine_failure_adds_nothing_and_errors_surface():
    s = ChatSession(FakeEngine(fail=SlmopsError("server went away")))
    with pytest.raises(SlmopsError, match="went away"):
        s.reply("hello")
    assert s.history == [] and s.last is None

    class NoTemplate(FakeEngine):
        def render(self, request):
            raise BadInputError("model x has no chat template")

        def stream(self, request):
            self.render(request)
            yield from ()

    s = ChatSession(NoTemplate())
    with pytest.raises(BadInputError, match="no chat template"):
        s.reply("hi")
    assert s.handle("/prompt") == "cannot show the prompt: model x has no chat template"
