"""Chat templates (Jinja, as in ``tokenizer_config.json``) <-> Foundry Local ``PromptTemplate``.

A Foundry Local custom model carries an ``inference_model.json`` whose ``PromptTemplate`` wraps each
message in per-role strings with a ``{Content}`` placeholder::

    {"Name": "my-model",
     "PromptTemplate": {"system": "<|im_start|>system\\n{Content}<|im_end|>\\n",
                        "user": "<|im_start|>user\\n{Content}<|im_end|>\\n",
                        "assistant": "<|im_start|>assistant\\n{Content}<|im_end|>\\n",
                        "prompt": "<|im_start|>user\\n{Content}<|im_end|>\\n<|im_start|>assistant\\n"}}

``prompt`` is what a generation prompt looks like for a single user turn: everything the template writes
before the first message (bos token, a default system prompt), the user wrapper, then the assistant
header. ``system`` and ``user`` are optional in Foundry Local's schema; ``assistant`` and ``prompt`` are
required.

The conversion is derived by *rendering* the Jinja template (in a sandbox configured as transformers
configures it, ``{% generation %}`` blocks included) on sentinel messages and slicing out the text around
each sentinel; it never pattern-matches the template source. The derived wrappers are then checked by
rebuilding a template from them and comparing renderings, so a template that is not a plain per-role
wrapper (one that merges the system prompt into the first user turn, say) is refused with a clear error
instead of being converted wrongly.

Wrappers keep the exact text the model was trained on, separators included (``<|im_end|>\\n``). Foundry
Local's own catalog entries often drop the trailing newline of each wrapper (``"<|user|>\\n{Content}<|end|>"``);
both are accepted by :func:`prompt_template_to_chat_template`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from slmops.errors import BadInputError

log = logging.getLogger(__name__)

CONTENT = "{Content}"
PROMPT_TEMPLATE_KEYS = ("system", "user", "assistant", "prompt")
REQUIRED_PROMPT_TEMPLATE_KEYS = ("assistant", "prompt")

# Sentinels: distinctive ASCII without whitespace (so `| trim` leaves them alone) and no '<' or '|' (so they
# never share a prefix with a special token such as <|endoftext|>).
_BOS = "@@slmops:bos@@"
_EOS = "@@slmops:eos@@"
_S = "@@slmops:system@@"
_U1, _U2 = "@@slmops:user1@@", "@@slmops:user2@@"
_A1, _A2 = "@@slmops:assistant1@@", "@@slmops:assistant2@@"


# --------------------------------------------------------------------------------------------- rendering


@lru_cache(maxsize=64)
def _compile(chat_template: str):
    """Compile `chat_template` the way transformers does (sandbox, trim/lstrip blocks, generation tags)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body unchanged (transformers uses the span
        to build the assistant-token mask; for rendering text it is a no-op)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise BadInputError(f"chat template is not valid Jinja: {e.message} (line {e.lineno})") from e


def render_chat_template(
    chat_template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str = "",
    eos_token: str = "",
    **kwargs: Any,
) -> str:
    """Render a Jinja chat template to text, as ``tokenizer.apply_chat_template(tokenize=False)`` would.

    Uses a sandboxed Jinja environment configured like transformers' (``trim_blocks``, ``lstrip_blocks``,
    ``loopcontrols``, ``{% generation %}`` tags, ``raise_exception``, ``strftime_now``, ``tojson``), so it
    needs no tokenizer. Template errors (including ``raise_exception``) propagate as
    ``jinja2.TemplateError``.
    """
    template = _compile(chat_template)
    context = {"tools": None, "documents": None, **kwargs}
    return template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **context,
    )


# ------------------------------------------------------------------------------------------ the wrapper spec


@dataclass(frozen=True)
class _Spec:
    """Per-role wrappers: a message with role r renders as ``r_pre + content + r_post``."""

    prefix: str  # written once, before everything (bos token)
    default_system: str | None  # content of the system turn written when the chat has no system message
    system: tuple[str, str] | None  # None: the template has no system role
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # the assistant header added by add_generation_prompt
    trailer: str = ""  # written after the last message when add_generation_prompt is false


def _lit(s: str) -> str:
    """A Jinja string literal for `s` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(s, ensure_ascii=False)


def _prefix_expr(prefix: str, bos_token: str | None) -> str:
    if not prefix:
        return ""
    if bos_token and prefix.startswith(bos_token):
        rest = prefix[len(bos_token):]
        return "{{ bos_token }}" + (f"{{{{ {_lit(rest)} }}}}" if rest else "")
    return f"{{{{ {_lit(prefix)} }}}}"


def _spec_to_template(spec: _Spec, bos_token: str | None = None) -> str:
    """A single-line Jinja chat template that renders exactly what `spec` describes."""
    parts = [_prefix_expr(spec.prefix, bos_token)]
    if spec.system is not None and spec.default_system is not None:
        text = spec.system[0] + spec.default_system + spec.system[1]
        parts.append(
            "{% if not messages or messages[0]['role'] != 'system' %}"
            f"{{{{ {_lit(text)} }}}}"
            "{% endif %}"
        )
    parts.append("{% for message in messages %}")
    if spec.system is not None:
        s_pre, s_post = spec.system
        parts.append(
            "{% if message['role'] == 'system' %}"
            f"{{{{ {_lit(s_pre)} + message['content'] + {_lit(s_post)} }}}}"
            "{% elif message['role'] == 'user' %}"
        )
    else:
        parts.append("{% if message['role'] == 'user' %}")
    u_pre, u_post = spec.user
    a_pre, a_post = spec.assistant
    a_core = a_post.rstrip()  # the end-of-turn marker is trained on (inside the generation span) ...
    a_tail = a_post[len(a_core):]  # ... the separator whitespace after it is not
    parts.append(f"{{{{ {_lit(u_pre)} + message['content'] + {_lit(u_post)} }}}}")
    parts.append("{% elif message['role'] == 'assistant' %}")
    if a_pre:
        parts.append(f"{{{{ {_lit(a_pre)} }}}}")
    parts.append(f"{{% generation %}}{{{{ message['content'] + {_lit(a_core)} }}}}{{% endgeneration %}}")
    if a_tail:
        parts.append(f"{{{{ {_lit(a_tail)} }}}}")
    roles = "system, user and assistant" if spec.system is not None else "user and assistant (no system)"
    parts.append(
        "{% else %}"
        f"{{{{ raise_exception('unsupported role ' + message['role'] + ': this template knows {roles}') }}}}"
        "{% endif %}{% endfor %}"
    )
    if spec.generation and spec.trailer:
        parts.append(
            f"{{% if add_generation_prompt %}}{{{{ {_lit(spec.generation)} }}}}"
            f"{{% else %}}{{{{ {_lit(spec.trailer)} }}}}{{% endif %}}"
        )
    elif spec.generation:
        parts.append(f"{{% if add_generation_prompt %}}{{{{ {_lit(spec.generation)} }}}}{{% endif %}}")
    elif spec.trailer:
        parts.append(f"{{% if not add_generation_prompt %}}{{{{ {_lit(spec.trailer)} }}}}{{% endif %}}")
    return "".join(parts)


# ---------------------------------------------------------------------------- chat template -> PromptTemplate


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def _unsupported(why: str) -> BadInputError:
    return BadInputError(
        f"cannot convert this chat template to a Foundry Local PromptTemplate: {why}",
        "the PromptTemplate wraps every message of a role the same way; write inference_model.json by hand "
        "for templates that do more (tool calls, merged system prompts, per-turn logic)",
    )


def _split(text: str, *sentinels: str) -> list[str]:
    """Split rendered `text` around each sentinel, in order; each must occur exactly once."""
    pieces = []
    pos = 0
    for s in sentinels:
        if text.count(s) != 1:
            raise _unsupported(
                f"a message's content appears {text.count(s)} times in the rendering (expected once)"
            )
        i = text.find(s, pos)
        if i < 0:
            raise _unsupported("messages are not rendered in order")
        pieces.append(text[pos:i])
        pos = i + len(s)
    pieces.append(text[pos:])
    return pieces


def _render_probe(chat_template: str, messages: list[tuple[str, str]], gen: bool) -> str:
    import jinja2

    try:
        return render_chat_template(
            chat_template,
            [{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=gen,
            bos_token=_BOS,
            eos_token=_EOS,
        )
    except jinja2.TemplateError as e:
        raise _unsupported(f"rendering {[r for r, _ in messages]} failed: {e}") from e


def _derive_spec(chat_template: str) -> _Spec:
    import jinja2

    chat = [("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2)]
    before_u, gap_ua, gap_au, gap_ua2, tail_a = _split(_render_probe(chat_template, chat, False), _U1, _A1, _U2, _A2)
    if gap_ua != gap_ua2:
        raise _unsupported("the text between a user and an assistant turn differs from turn to turn")
    before_u1, tail_u = _split(_render_probe(chat_template, [("user", _U1)], False), _U1)
    before_u1g, tail_u_gen = _split(_render_probe(chat_template, [("user", _U1)], True), _U1)
    if not before_u1 == before_u1g == before_u:
        raise _unsupported("the text before the first user message depends on the rest of the chat")

    # A gap between turns is post(previous) + pre(next); the text after the last message is post(last) +
    # trailer. post(r) is the longest common start of every gap out of r and the tail after r.
    a_post = _common_prefix(gap_au, tail_a)
    u_pre = gap_au[len(a_post):]
    u_post = _common_prefix(gap_ua, tail_u)
    a_pre = gap_ua[len(u_post):]
    trailer = tail_u[len(u_post):]
    if tail_a[len(a_post):] != trailer:
        raise _unsupported("the text after the last message depends on its role")
    if not tail_u_gen.startswith(u_post):
        raise _unsupported("add_generation_prompt changes the user turn")
    generation = tail_u_gen[len(u_post):]
    if not before_u.endswith(u_pre):
        raise _unsupported("the first user message is wrapped differently from later ones")
    head = before_u[: len(before_u) - len(u_pre)]  # prefix (+ a default system turn)

    system: tuple[str, str] | None = None
    prefix, default_system = head, None
    try:
        rendered = render_chat_template(
            chat_template,
            [{"role": "system", "content": _S}, {"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}],
            bos_token=_BOS,
            eos_token=_EOS,
        )
    except jinja2.TemplateError:  # the template refuses a system role
        rendered = None
    if rendered is not None and _S in rendered:
        before_s, gap_su, gap_ua_s, tail_a_s = _split(rendered, _S, _U1, _A1)
        if gap_ua_s != gap_ua or tail_a_s != tail_a:
            raise _unsupported("a system message changes how the other turns are rendered")
        if not gap_su.endswith(u_pre):
            raise _unsupported("the user turn after a system message is wrapped differently")
        s_post = gap_su[: len(gap_su) - len(u_pre)]
        if (
            s_post
            and head.startswith(before_s)
            and head.endswith(s_post)
            and len(head) >= len(before_s) + len(s_post)
        ):
            # without a system message the template writes its own system turn (a default system prompt)
            default_system = head[len(before_s): len(head) - len(s_post)]
            cut = before_s.rfind(_BOS)
            prefix = before_s[: cut + len(_BOS)] if cut >= 0 else ""
        elif before_s.startswith(head):
            prefix = head
        else:
            raise _unsupported("the text before a system message does not match the text before a user message")
        system = (before_s[len(prefix):], s_post)
    elif _BOS not in head and head:
        # no system role, but text before the first message: keep it as the prefix
        prefix = head

    spec = _Spec(
        prefix=prefix,
        default_system=default_system,
        system=system,
        user=(u_pre, u_post),
        assistant=(a_pre, a_post),
        generation=generation,
        trailer=trailer,
    )
    _verify(chat_template, spec)
    return spec


def _verify(chat_template: str, spec: _Spec) -> None:
    """Render probe chats with the original template and with the one rebuilt from `spec`; they must agree."""
    rebuilt = _spec_to_template(spec, bos_token=_BOS)
    probes: list[tuple[list[tuple[str, str]], bool]] = [
        ([("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", _A2)], False),
        ([("user", _U1), ("assistant", _A1), ("user", _U2)], True),
        ([("user", _U1)], True),
        ([("user", _U1)], False),
    ]
    if spec.system is not None:
        probes += [
            ([("system", _S), ("user", _U1), ("assistant", _A1)], False),
            ([("system", _S), ("user", _U1)], True),
        ]
    for messages, gen in probes:
        want = _render_probe(chat_template, messages, gen)
        got = _render_probe(rebuilt, messages, gen)
        if want != got:
            roles = [r for r, _ in messages]
            raise _unsupported(
                f"per-role wrappers do not reproduce the chat {roles} (add_generation_prompt={gen}):"
                f" expected {want!r}, got {got!r}"
            )


def _fill(s: str, bos_token: str, eos_token: str) -> str:
    return s.replace(_BOS, bos_token).replace(_EOS, eos_token)


def chat_template_to_prompt_template(
    chat_template: str,
    *,
    bos_token: str = "",
    eos_token: str = "",
    system_prompt: str | None = None,
) -> dict[str, str]:
    """Derive a Foundry Local ``PromptTemplate`` from a Jinja chat template.

    The template is rendered on sentinel messages and the per-role wrappers are sliced out around the
    sentinels, then checked by re-rendering. Returns a dict with the keys ``system`` (absent when the
    template has no system role), ``user``, ``assistant`` and ``prompt``, each containing ``{Content}`` once.

    ``prompt`` is the rendering of one user turn with the generation prompt: what the template writes first
    (``bos_token``, a default system prompt it injects), the user wrapper, then the assistant header. With
    `system_prompt`, the prompt renders that system message before the user turn instead (as Foundry
    Local's documentation does for Llama 3.2).

    `bos_token`/`eos_token` are the strings the template's ``bos_token``/``eos_token`` variables stand for
    (pass the tokenizer's; :func:`prompt_template_from_tokenizer` does). Templates that ``| trim`` message
    content convert to wrappers that do not trim. A text the template appends after the last message when
    no generation prompt is requested (for example ``eos_token``) has no place in a PromptTemplate and is
    dropped with a warning.

    Raises ``BadInputError`` for templates that are not plain per-role wrappers.
    """
    spec = _derive_spec(chat_template)
    if spec.trailer:
        log.warning(
            "chat template appends %r after the last message of a finished chat; a Foundry Local "
            "PromptTemplate cannot express that, so it is dropped", _fill(spec.trailer, bos_token, eos_token)
        )
    if system_prompt is not None and spec.system is not None:
        head = spec.prefix + spec.system[0] + system_prompt + spec.system[1]
    elif system_prompt is not None:
        raise BadInputError("system_prompt given, but this chat template has no system role")
    else:
        head = spec.prefix
        if spec.default_system is not None and spec.system is not None:
            head += spec.system[0] + spec.default_system + spec.system[1]
    u_pre, u_post = spec.user
    out: dict[str, str] = {}
    if spec.system is not None:
        out["system"] = spec.system[0] + CONTENT + spec.system[1]
    out["user"] = u_pre + CONTENT + u_post
    out["assistant"] = spec.assistant[0] + CONTENT + spec.assistant[1]
    out["prompt"] = head + u_pre + CONTENT + u_post + spec.generation
    return {k: _fill(v, bos_token, eos_token) for k, v in out.items()}


def prompt_template_from_tokenizer(tokenizer: Any, *, system_prompt: str | None = None) -> dict[str, str]:
    """:func:`chat_template_to_prompt_template` for a tokenizer's own chat template and special tokens."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chats use
        template = template.get("default")
    if not template:
        raise BadInputError(
            "the tokenizer has no chat template",
            "set tokenizer.chat_template (or write a PromptTemplate by hand)",
        )
    return chat_template_to_prompt_template(
        template,
        bos_token=getattr(tokenizer, "bos_token", None) or "",
        eos_token=getattr(tokenizer, "eos_token", None) or "",
        system_prompt=system_prompt,
    )


# ---------------------------------------------------------------------------- PromptTemplate -> chat template


def validate_prompt_template(prompt_template: dict[str, Any]) -> dict[str, str]:
    """Check a PromptTemplate (the ``PromptTemplate`` object of ``inference_model.json``) and return it.

    Keys must be among system/user/assistant/prompt, ``assistant`` and ``prompt`` are required, and each
    value must be a string containing ``{Content}`` exactly once. Every problem is reported at once as a
    ``BadInputError``.
    """
    if not isinstance(prompt_template, dict):
        raise BadInputError(f"a PromptTemplate must be an object, got {type(prompt_template).__name__}")
    problems = []
    for key in sorted(set(prompt_template) - set(PROMPT_TEMPLATE_KEYS)):
        problems.append(f"unknown key {key!r} (allowed: {', '.join(PROMPT_TEMPLATE_KEYS)})")
    for key in REQUIRED_PROMPT_TEMPLATE_KEYS:
        if prompt_template.get(key) is None:
            problems.append(f"missing {key!r}")
    for key in PROMPT_TEMPLATE_KEYS:
        value = prompt_template.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            problems.append(f"{key!r} must be a string")
        elif value.count(CONTENT) != 1:
            problems.append(f"{key!r} must contain {CONTENT} exactly once (found {value.count(CONTENT)})")
    if problems:
        raise BadInputError("invalid PromptTemplate: " + "; ".join(problems))
    return {k: prompt_template[k] for k in PROMPT_TEMPLATE_KEYS if prompt_template.get(k) is not None}


def _parts(s: str) -> tuple[str, str]:
    before, _, after = s.partition(CONTENT)
    return before, after


def _single_turn_template(pt: dict[str, str], bos_token: str | None) -> str:
    """For a PromptTemplate without a user wrapper: one user turn rendered with `prompt`, then the answer."""
    p_before, p_after = _parts(pt["prompt"])
    a_pre, a_post = _parts(pt["assistant"])
    a_core = a_post.rstrip()
    prefix = _prefix_expr(p_before, bos_token) if bos_token else f"{{{{ {_lit(p_before)} }}}}"
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' and loop.first %}"
        f"{prefix}{{{{ message['content'] + {_lit(p_after)} }}}}"
        "{% elif message['role'] == 'assistant' and loop.index0 == 1 %}"
        f"{{{{ {_lit(a_pre)} }}}}{{% generation %}}{{{{ message['content'] + {_lit(a_core)} }}}}{{% endgeneration %}}"
        f"{{{{ {_lit(a_post[len(a_core):])} }}}}"
        "{% else %}{{ raise_exception('this PromptTemplate has no user template: only a single user turn "
        "(and its answer) can be rendered') }}{% endif %}{% endfor %}"
    )


def prompt_template_roles(prompt_template: dict[str, Any]) -> _Spec:
    """The per-role wrappers of a PromptTemplate that has a ``user`` wrapper: the text before everything, the
    default system turn (when ``prompt`` starts with a system wrapper), and each role's text before/after
    {Content}. Raises ``BadInputError`` when ``prompt`` does not contain the user wrapper around {Content}."""
    pt = validate_prompt_template(prompt_template)
    u_pre, u_post = _parts(pt["user"])
    p_before, p_after = _parts(pt["prompt"])
    if not p_before.endswith(u_pre) or not p_after.startswith(u_post):
        raise BadInputError(
            "invalid PromptTemplate: 'prompt' must contain the 'user' template around {Content} "
            f"(user {pt['user']!r}, prompt {pt['prompt']!r})"
        )
    head = p_before[: len(p_before) - len(u_pre)]
    system = _parts(pt["system"]) if "system" in pt else None
    prefix, default_system = head, None
    if system is not None and system[0]:
        s_pre, s_post = system
        i = head.find(s_pre)
        if i >= 0 and head.endswith(s_post) and len(head) - len(s_post) >= i + len(s_pre):
            prefix, default_system = head[:i], head[i + len(s_pre): len(head) - len(s_post)]
    return _Spec(
        prefix=prefix,
        default_system=default_system,
        system=system,
        user=(u_pre, u_post),
        assistant=_parts(pt["assistant"]),
        generation=p_after[len(u_post):],
    )


def prompt_template_to_chat_template(prompt_template: dict[str, Any], *, bos_token: str | None = None) -> str:
    """Build a Jinja chat template from a Foundry Local ``PromptTemplate``.

    Rendered with ``add_generation_prompt=True`` on one user message, the template gives exactly
    ``prompt`` with the content filled in; a conversation renders as the concatenation of the role
    wrappers, preceded by whatever ``prompt`` has before the user wrapper (a bos token, and a default
    system turn when that text is a system wrapper - written only when the chat has no system message).
    Assistant turns are wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask`` works.

    With `bos_token`, a leading bos token is written as ``{{ bos_token }}`` instead of a literal. A
    PromptTemplate without ``user`` (as in Foundry Local's Llama example) gives a single-turn template.
    Raises ``BadInputError`` when the PromptTemplate is invalid or ``prompt`` does not contain the user
    wrapper around ``{Content}``.
    """
    pt = validate_prompt_template(prompt_template)
    if "user" not in pt:
        return _single_turn_template(pt, bos_token)
    spec = prompt_template_roles(pt)
    return _spec_to_template(spec, bos_token=bos_token)


__all__ = [
    "CONTENT",
    "PROMPT_TEMPLATE_KEYS",
    "chat_template_to_prompt_template",
    "prompt_template_from_tokenizer",
    "prompt_template_roles",
    "prompt_template_to_chat_template",
    "render_chat_template",
    "validate_prompt_template",
]
