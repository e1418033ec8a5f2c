"""A multi-turn chat over any Engine: the logic behind ``slmops chat`` (the CLI only reads and prints).

    session = ChatSession(engine, system="Answer in one line.")
    for piece in session.send("Where is my order?"):
        print(piece, end="", flush=True)
    session.handle("/reset")          # slash commands: /help lists them

The whole conversation (system prompt + every turn) is sent with each message and rendered by the model's
chat template (or, for a remote server, by the server), so the model sees the context it would see when
served. A model without a chat template cannot chat: the engine raises BadInputError on the first message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from slmops.engines.base import Engine, FinishReason, GenerationRequest
from slmops.errors import SlmopsError

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt and start over (/system alone shows it; /system off removes it)
  /temp X         sampling temperature, 0 = greedy (/temp alone shows it)
  /max N          most tokens per reply
  /seed N|off     fixed sampling seed (replies repeat) or none
  /history        the conversation so far
  /prompt [TEXT]  the exact prompt text the model gets if TEXT is sent next (local models only)
  /help           this list
  /exit, /quit    leave (Ctrl-D too; Ctrl-C stops a reply that is being written)"""


@dataclass
class Turn:
    """What the last reply took: why it ended, token counts (0 when the engine does not report them)."""

    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    interrupted: bool = False


@dataclass
class ChatSession:
    """A conversation with `engine`: `system` prompt, `history` of ``{"role", "content"}`` messages (user and
    assistant turns; the system prompt is kept apart so /reset keeps it) and the sampling options used for
    every reply. `adapter` is passed to each GenerationRequest (None: the engine's default)."""

    engine: Engine
    system: str | None = None
    temperature: float = 0.7
    max_new_tokens: int = 256
    seed: int | None = None
    top_p: float = 1.0
    adapter: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    last: Turn | None = None  # the last reply's numbers
    done: bool = False  # set by /exit and /quit

    def __post_init__(self) -> None:
        self.request("check")  # validate the sampling options now, not at the first message

    # --- conversation ---------------------------------------------------------------------------
    def messages(self, text: str | None = None) -> list[dict[str, str]]:
        """The messages the model gets: the system prompt, the history, then `text` as the new user turn."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += [dict(m) for m in self.history]
        if text is not None:
            msgs.append({"role": "user", "content": text})
        return msgs

    def request(self, text: str) -> GenerationRequest:
        """The GenerationRequest for sending `text` next."""
        return GenerationRequest(messages=self.messages(text), max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                                 adapter=self.adapter)

    def render(self, text: str = "") -> str:
        """The exact prompt text the model would get if `text` were sent next (the chat template applied)."""
        return self.engine.render(self.request(text))

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text` piece by piece; the pieces join to the whole reply.

        The user turn and the reply join the history when the reply ends. If the caller stops early (closes
        the iterator) or Ctrl-C interrupts it, the part already shown is kept as the reply (and
        KeyboardInterrupt still propagates); if the engine fails, nothing is added, so the same message can
        be sent again.
        """
        request = self.request(text)
        pieces: list[str] = []
        turn = Turn()
        t0 = time.perf_counter()
        events = self.engine.stream(request)
        try:
            for event in events:
                if event.prompt_tokens:
                    turn.prompt_tokens = event.prompt_tokens
                if event.completion_tokens:
                    turn.completion_tokens = event.completion_tokens
                if event.finish_reason is not None:
                    turn.finish_reason = event.finish_reason
                if event.text:
                    pieces.append(event.text)
                    yield event.text
        except (GeneratorExit, KeyboardInterrupt):  # the caller stopped reading, or Ctrl-C mid-token
            turn.interrupted = True
            if pieces:
                self._record(text, "".join(pieces), turn, t0)
            raise
        finally:
            close: Callable[[], object] | None = getattr(events, "close", None)
            if close is not None:
                close()
        self._record(text, "".join(pieces), turn, t0)

    def reply(self, text: str) -> str:
        """Send `text` and return the whole reply (no streaming)."""
        return "".join(self.send(text))

    def reset(self) -> None:
        """Forget the conversation; the system prompt and sampling options stay."""
        self.history.clear()
        self.last = None

    def _record(self, text: str, reply: str, turn: Turn, t0: float) -> None:
        turn.seconds = time.perf_counter() - t0
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        self.last = turn

    # --- slash commands -------------------------------------------------------------------------
    def handle(self, line: str) -> str | None:
        """Run `line` if it is a slash command and return what to show (may be ""); None when `line` is a
        message to send. /exit and /quit set `done`."""
        stripped = line.strip()
        if not stripped.startswith("/"):
            return None
        command, _, arg = stripped.partition(" ")
        command, arg = command.lower(), arg.strip()
        if command in ("/exit", "/quit", "/bye"):
            self.done = True
            return ""
        if command in ("/help", "/?"):
            return HELP
        if command == "/reset":
            self.reset()
            return "conversation cleared" + (" (system prompt kept)" if self.system else "")
        if command == "/system":
            if not arg:
                return f"system prompt: {self.system!r}" if self.system else "no system prompt (/system TEXT sets one)"
            self.system = None if arg.lower() in ("off", "none") else arg
            self.reset()
            return ("system prompt set" if self.system else "system prompt removed") + "; conversation cleared"
        if command in ("/temp", "/temperature"):
            if not arg:
                return f"temperature {self.temperature:g}"
            value = _number(arg, float)
            if value is None or value < 0:
                return "usage: /temp X  (a number >= 0; 0 = greedy)"
            self.temperature = value
            return f"temperature {value:g}"
        if command in ("/max", "/max-tokens"):
            if not arg:
                return f"at most {self.max_new_tokens} tokens per reply"
            value = _number(arg, int)
            if value is None or value < 1:
                return "usage: /max N  (a whole number >= 1)"
            self.max_new_tokens = value
            return f"at most {value} tokens per reply"
        if command == "/seed":
            if not arg:
                return f"seed {self.seed}" if self.seed is not None else "no seed (replies vary)"
            if arg.lower() in ("off", "none"):
                self.seed = None
                return "no seed (replies vary)"
            value = _number(arg, int)
            if value is None:
                return "usage: /seed N  or  /seed off"
            self.seed = value
            return f"seed {value}"
        if command == "/history":
            if not self.history and not self.system:
                return "(empty)"
            return "\n".join(f"[{m['role']}] {m['content']}" for m in self.messages())
        if command == "/prompt":
            try:
                return self.render(arg)
            except SlmopsError as e:
                return f"cannot show the prompt: {e.message}"
        return f"unknown command {command}; /help lists the commands"


def _number(text: str, kind: type[int] | type[float]) -> int | float | None:
    try:
        return kind(text)
    except ValueError:
        return None


__all__ = ["HELP", "ChatSession", "Turn"]
