"""Can a teacher's logits teach this student? Tokenizer and chat-template compatibility, before any weight loads.

Logit-level KD compares the teacher's and the student's next-token distributions id by id, on the same
input ids, so it needs:

- the same token -> id mapping (special tokens included). The models' logit widths (``vocab_size`` in
  their configs) may differ when one is padded (e.g. 151936 vs 152064 for Qwen2.5 sizes): the logits are
  then compared over the shared first ``min`` ids, which hold every real token;
- chat templates that render a conversation the same way: the teacher scores the text the student is
  trained on, which must be in the format the teacher knows.

Only tokenizer files and ``config.json`` are read here. :func:`check_tokenizer_compat` returns a
:class:`CompatReport`; the trainer turns an incompatible report into a clear error (or, when allowed, a
fall back to sequence-level training on the teacher's outputs).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Conversations rendered with both chat templates to compare them (the first has a system turn; templates
# that reject system messages are compared on the second only).
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Where is order 1234?"},
        {"role": "assistant", "content": "It ships on 2024-05-01."},
    ],
    [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Track order 42"},
    ],
]

SPECIAL_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass
class CompatReport:
    """The outcome of :func:`check_tokenizer_compat`.

    ``compatible``: logit-level KD is possible. ``problems``: why not (each names what differs).
    ``notes``: compatible, but worth knowing (padded vocab sizes, templates equal in effect but not text).
    ``shared_vocab``: the logit ids compared by the KD loss (None when incompatible or widths unknown).
    """

    compatible: bool
    student_tokens: int
    teacher_tokens: int
    student_model_vocab: int | None = None
    teacher_model_vocab: int | None = None
    shared_vocab: int | None = None
    differing_ids: int = 0
    same_mapping: bool = True
    same_chat_template: bool = True
    student_has_chat_template: bool = True
    teacher_has_chat_template: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line per problem (or a summary when compatible), then the notes."""
        if self.compatible:
            head = (f"compatible for logit KD: same {self.student_tokens}-token mapping"
                    + (f", logits compared over {self.shared_vocab} ids" if self.shared_vocab else ""))
        else:
            head = "incompatible for logit KD: " + "; ".join(self.problems)
        return "\n".join([head, *(f"note: {n}" for n in self.notes)])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_tok(ref: Any):
    if isinstance(ref, str | os.PathLike):
        from slmops.models.load import load_tokenizer

        return load_tokenizer(ref)
    return ref


def model_vocab_size(ref: Any) -> int | None:
    """The logit width (``vocab_size``) from a model folder's config.json, without loading weights.

    Looks in the top level, then ``text_config`` (multimodal configs). None for tokenizer objects, folders
    without a config, or hub ids that are not cached.
    """
    if not isinstance(ref, str | os.PathLike):
        return None
    cfg_path = Path(ref) / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
    else:
        from slmops.models.load import is_hub_id

        if not is_hub_id(str(ref)):
            return None
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(str(ref), local_files_only=True).to_dict()
        except (OSError, ValueError):
            return None
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def _token(inverse: dict[int, str], i: int) -> str:
    return repr(inverse[i]) if i in inverse else "(no such id)"


def _render(tok, conversation: list[dict]) -> str | None:
    from jinja2 import TemplateError

    try:
        return tok.apply_chat_template(conversation, tokenize=False,
                                       add_generation_prompt=conversation[-1]["role"] != "assistant")
    except (TemplateError, ValueError, TypeError):
        return None


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 15)
    return f"from character {i}: student {a[lo:i + 25]!r} vs teacher {b[lo:i + 25]!r}"


def compare_chat_templates(student_tok, teacher_tok) -> tuple[bool, str | None]:
    """(same in effect, why not): equal template text, or identical renderings of the probe conversations."""
    s_t, t_t = getattr(student_tok, "chat_template", None), getattr(teacher_tok, "chat_template", None)
    if s_t == t_t:
        return True, None
    if not s_t or not t_t:
        missing = "student" if not s_t else "teacher"
        return False, f"the {missing} tokenizer has no chat template"
    compared = 0
    for conv in PROBE_CONVERSATIONS:
        a, b = _render(student_tok, conv), _render(teacher_tok, conv)
        if a is None and b is None:
            continue
        if a is None or b is None:
            who = "student" if a is None else "teacher"
            return False, f"the {who} chat template rejects a conversation the other renders"
        compared += 1
        if a != b:
            return False, "chat templates render conversations differently, " + _first_difference(a, b)
    if compared == 0:
        return False, "neither chat template renders the probe conversations"
    return True, None


def check_tokenizer_compat(student: Any, teacher: Any, *, student_model_vocab: int | None = None,
                           teacher_model_vocab: int | None = None) -> CompatReport:
    """Whether `teacher`'s logits can supervise `student` token by token.

    `student` and `teacher` are model or tokenizer folders (or hub ids; or tokenizer objects). The models'
    logit widths come from their ``config.json`` unless given (pass ``student_model_vocab`` for a student
    that does not exist yet, e.g. one created from a preset). Reads tokenizer files and configs only.
    """
    s_tok, t_tok = _load_tok(student), _load_tok(teacher)
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    smv = student_model_vocab if student_model_vocab is not None else model_vocab_size(student)
    tmv = teacher_model_vocab if teacher_model_vocab is not None else model_vocab_size(teacher)
    report = CompatReport(
        compatible=True, student_tokens=len(s_vocab), teacher_tokens=len(t_vocab),
        student_model_vocab=smv, teacher_model_vocab=tmv,
        student_has_chat_template=bool(getattr(s_tok, "chat_template", None)),
        teacher_has_chat_template=bool(getattr(t_tok, "chat_template", None)),
    )

    # 1. the token -> id mapping
    if s_vocab != t_vocab:
        report.same_mapping = False
        s_inv = {i: t for t, i in s_vocab.items()}
        t_inv = {i: t for t, i in t_vocab.items()}
        ids = sorted(set(s_inv) | set(t_inv))
        differing = [i for i in ids if s_inv.get(i) != t_inv.get(i)]
        report.differing_ids = len(differing)
        i = differing[0]
        report.problems.append(
            f"student vocab {len(s_vocab)} tokens vs teacher {len(t_vocab)}; {len(differing)} token ids differ "
            f"(e.g. id {i}: student {_token(s_inv, i)} vs teacher {_token(t_inv, i)})"
        )
    else:
        for attr in SPECIAL_ATTRS:
            a, b = getattr(s_tok, attr, None), getattr(t_tok, attr, None)
            if a != b:
                report.notes.append(f"{attr} differs (student {a!r}, teacher {b!r}); the token ids agree")

    # 2. logit widths (padded vocabularies)
    if report.same_mapping:
        n_tokens = len(s_vocab)
        widths = [w for w in (smv, tmv) if w is not None]
        for who, w in (("student", smv), ("teacher", tmv)):
            if w is not None and w < n_tokens:
                report.problems.append(f"the {who} model's vocab_size {w} is smaller than its tokenizer ({n_tokens} tokens)")
        if widths:
            report.shared_vocab = min(widths)
        if smv is not None and tmv is not None and smv != tmv and not report.problems:
            report.notes.append(
                f"padded vocab sizes differ (student {smv} vs teacher {tmv}) but the {n_tokens}-token mapping is "
                f"the same: KD compares the logits over the shared first {min(smv, tmv)} ids"
            )

    # 3. chat templates
    same, why = compare_chat_templates(s_tok, t_tok)
    report.same_chat_template = same
    if not same:
        if not report.student_has_chat_template and report.teacher_has_chat_template and report.same_mapping:
            report.notes.append("the student tokenizer has no chat template: the teacher's is used for training "
                                "and saved with the student")
        else:
            report.problems.append(why or "chat templates differ")
    elif s_tok.chat_template != t_tok.chat_template:
        report.notes.append("chat template texts differ but render the probe conversations identically")

    report.compatible = not report.problems
    if not report.compatible:
        report.shared_vocab = None
    return report
