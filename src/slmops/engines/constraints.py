"""Constrained decoding for JSON mode (OpenAI's ``response_format: {"type": "json_object"}``).

At each step the engine ranks the vocabulary by score; `allowed_tokens` walks the best candidates and
keeps those whose text leaves the answer a valid prefix of a JSON object (end-of-turn only once the
object is complete). The engine then picks among them as usual (greedy or sampled), and ends the answer as
soon as the object closes. The checker is an incremental prefix parser (`json_prefix_state`), so any
tokenizer works: it only needs each token's text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

INVALID, PARTIAL, COMPLETE = -1, 0, 1

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_NUMBER_PREFIX = re.compile(r"-?((0|[1-9]\d*)((\.\d*)?|(\.\d+[eE][+-]?\d*)|([eE][+-]?\d*)))?")
_ESCAPES = set('"\\/bfnrtu')
_HEX = set("0123456789abcdefABCDEF")


def json_prefix_state(text: str) -> int:
    """COMPLETE when `text` is one JSON object (surrounding whitespace allowed), PARTIAL when it can still
    become one, INVALID otherwise."""
    stack: list[str] = []
    expect = "top"  # top | value | key_or_close | key | colon | comma_or_close | value_or_close | done
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WS:
            i += 1
            continue
        if expect == "done":
            return INVALID
        if expect == "top":
            if c != "{":
                return INVALID
            stack.append("{")
            expect = "key_or_close"
            i += 1
            continue
        if expect in ("key_or_close", "key"):
            if c == "}" and expect == "key_or_close":
                stack.pop()
                expect = _after_close(stack)
                i += 1
                continue
            if c != '"':
                return INVALID
            i, ok = _string(text, i)
            if ok is None:
                return INVALID
            if not ok:
                return PARTIAL
            expect = "colon"
            continue
        if expect == "colon":
            if c != ":":
                return INVALID
            expect = "value"
            i += 1
            continue
        if expect == "comma_or_close":
            top = stack[-1]
            if c == ",":
                expect = "key" if top == "{" else "value"
            elif (c == "}" and top == "{") or (c == "]" and top == "["):
                stack.pop()
                expect = _after_close(stack)
            else:
                return INVALID
            i += 1
            continue
        # a value (or, right after '[', a close)
        if c == "]" and expect == "value_or_close":
            stack.pop()
            expect = _after_close(stack)
            i += 1
            continue
        if c == "{":
            stack.append("{")
            expect = "key_or_close"
            i += 1
        elif c == "[":
            stack.append("[")
            expect = "value_or_close"
            i += 1
        elif c == '"':
            i, ok = _string(text, i)
            if ok is None:
                return INVALID
            if not ok:
                return PARTIAL
            expect = "comma_or_close"
        elif c == "-" or c.isdigit():
            j = i
            while j < n and text[j] in "+-0123456789.eE":
                j += 1
            token = text[i:j]
            if j == n:  # the number may go on
                return PARTIAL if _NUMBER_PREFIX.fullmatch(token) else INVALID
            if not _NUMBER.fullmatch(token):
                return INVALID
            i = j
            expect = "comma_or_close"
        elif c in "tfn":
            for word in ("true", "false", "null"):
                if word.startswith(text[i:i + len(word)]) and text[i] == word[0]:
                    if i + len(word) > n:
                        return PARTIAL
                    i += len(word)
                    expect = "comma_or_close"
                    break
            else:
                return INVALID
        else:
            return INVALID
    return COMPLETE if expect == "done" else PARTIAL


def _after_close(stack: list[str]) -> str:
    return "done" if not stack else "comma_or_close"


def _string(text: str, i: int) -> tuple[int, bool | None]:
    """Scan the string starting at text[i] == '"': (index after it, True), (n, False) when the text ends
    inside it, (i, None) when it is invalid."""
    n = len(text)
    j = i + 1
    while j < n:
        c = text[j]
        if c == '"':
            return j + 1, True
        if c == "\\":
            if j + 1 >= n:
                return n, False
            e = text[j + 1]
            if e not in _ESCAPES:
                return i, None
            if e == "u":
                digits = text[j + 2:j + 6]
                if any(d not in _HEX for d in digits):
                    return i, None
                if len(digits) < 4:
                    return n, False
                j += 6
                continue
            j += 2
            continue
        if ord(c) < 0x20:
            return i, None
        j += 1
    return n, False


def allowed_tokens(text: str, ranked: Iterable[int], piece: Callable[[int], str], is_eos: Callable[[int], bool],
                   limit: int = 64) -> list[int]:
    """Among `ranked` candidates (best first), the first `limit` that keep `text` a valid JSON-object
    prefix; end-of-turn tokens only when the object is complete. Whitespace-only pieces are refused at the
    start and after whitespace, so a model cannot stall in blank space. When no candidate fits, the best
    end-of-turn candidate (the answer ends there), else the best candidate."""
    complete = json_prefix_state(text) == COMPLETE
    out: list[int] = []
    first, first_eos = None, None
    for tok in ranked:
        first = tok if first is None else first
        if is_eos(tok):
            first_eos = tok if first_eos is None else first_eos
            if complete:
                out.append(tok)
        else:
            p = piece(tok)
            blank = not p.strip(_WS)
            if blank and (not text.strip(_WS) or text[-1] in _WS):
                continue
            if p and json_prefix_state(text + p) != INVALID:
                out.append(tok)
        if len(out) >= limit:
            break
    if out:
        return out
    return [first_eos if first_eos is not None else first] if first is not None else []


__all__ = ["COMPLETE", "INVALID", "PARTIAL", "allowed_tokens", "json_prefix_state"]
