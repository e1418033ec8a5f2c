"""Chat template <-> Foundry Local PromptTemplate conversion (no model, no tokenizer training needed)."""

from __future__ import annotations

import json

import pytest

from slmops.errors import BadInputError
from slmops.models.templates import (
    chat_template_to_prompt_template,
    prompt_template_from_tokenizer,
    prompt_template_to_chat_template,
    render_chat_template,
    validate_prompt_template,
)
from slmops.models.tokenizer import CHATML_TEMPLATE

# --- fixtures: the three template styles, written in the usual Jinja forms -------------------------------

# ChatML (Qwen) with a {% generation %} block: the template slmops trains its own tokenizers with.
CHATML = CHATML_TEMPLATE

# ChatML as Qwen2.5 ships it (tools branch left out): injects a default system prompt when none is given.
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3: bos token before the first message, header tokens, content trimmed, generation tags.
LLAMA3 = """{% set loop_messages = messages %}{% for message in loop_messages %}
{% set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}
{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}
{% if message['role'] == 'assistant' %}{{ header }}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}
{% else %}{{ header + message['content'] | trim + '<|eot_id|>' }}{% endif %}
{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"""

# Llama 3.1/3.2: a system turn is always written (with a knowledge-date preamble), empty when not given.
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Phi-3: <|role|> tags, <|end|> closes a turn, generation tags around the answer.
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Phi-3.5 as shipped: also appends eos_token to a finished chat (no place for that in a PromptTemplate).
PHI3_EOS = PHI3.replace(
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}",
)

BOS = {"llama3": "<|begin_of_text|>"}

STYLES = {
    "chatml": (CHATML, "", "<|im_end|>"),
    "qwen2.5": (QWEN25, "", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>"),
    "phi3": (PHI3, "", "<|endoftext|>"),
}

CONVERSATION = [
    {"role": "system", "content": "You triage support messages."},
    {"role": "user", "content": "Where is my order ORD-48213?"},
    {"role": "assistant", "content": '{"intent": "track_order", "order_id": "ORD-48213"}'},
]
MULTI_TURN = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "cancel #12345"},
    {"role": "assistant", "content": "done"},
]

# Foundry Local's ChatML PromptTemplate, exact per-turn strings (as in Foundry Local custom-model guides).
FOUNDRY_CHATML = {
    "system": "<|im_start|>system\n{Content}<|im_end|>\n",
    "user": "<|im_start|>user\n{Content}<|im_end|>\n",
    "assistant": "<|im_start|>assistant\n{Content}<|im_end|>\n",
    "prompt": "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n",
}

# microsoft/Foundry-Local sdk_v2/cpp/test/testdata/fake-model-cpu/inference_model.json (a Phi-style model).
# Foundry's catalog writes wrappers without the trailing separator newline.
FOUNDRY_SDK_PHI = {
    "prompt": "<|user|>\n{Content}<|end|>\n<|assistant|>",
    "assistant": "<|assistant|>\n{Content}<|end|>",
}

# Foundry Local docs, "Run Hugging Face models on Foundry Local" (Llama-3.2-1B-Instruct, system prompt given).
FOUNDRY_DOCS_LLAMA32_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>"
    "\n\n{Content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


def _render(template: str, messages, gen: bool, bos: str, eos: str) -> str:
    return render_chat_template(template, messages, add_generation_prompt=gen, bos_token=bos, eos_token=eos)


# --- derivation ---------------------------------------------------------------------------------------


def test_chatml_equals_the_foundry_chatml_prompt_template():
    assert chat_template_to_prompt_template(CHATML) == FOUNDRY_CHATML


def test_qwen25_default_system_prompt_goes_into_prompt():
    pt = chat_template_to_prompt_template(QWEN25)
    assert {k: pt[k] for k in ("system", "user", "assistant")} == {
        k: FOUNDRY_CHATML[k] for k in ("system", "user", "assistant")
    }
    assert pt["prompt"] == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        + FOUNDRY_CHATML["prompt"]
    )


def test_llama3_wrappers_and_bos_token():
    pt = chat_template_to_prompt_template(LLAMA3, bos_token="<|begin_of_text|>")
    assert pt == {
        "system": "<|start_header_id|>system<|end_header_id|>\n\n{Content}<|eot_id|>",
        "user": "<|start_header_id|>user<|end_header_id|>\n\n{Content}<|eot_id|>",
        "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n{Content}<|eot_id|>",
        "prompt": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{Content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    }


def test_llama31_with_system_prompt_matches_foundry_docs_example():
    pt = chat_template_to_prompt_template(
        LLAMA31, bos_token="<|begin_of_text|>", system_prompt="You are a helpful assistant."
    )
    assert pt["prompt"] == FOUNDRY_DOCS_LLAMA32_PROMPT
    assert pt["system"] == (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n{Content}<|eot_id|>"
    )


def test_phi3_wrappers_agree_with_foundry_sdk_testdata():
    pt = chat_template_to_prompt_template(PHI3)
    assert pt == {
        "system": "<|system|>\n{Content}<|end|>\n",
        "user": "<|user|>\n{Content}<|end|>\n",
        "assistant": "<|assistant|>\n{Content}<|end|>\n",
        "prompt": "<|user|>\n{Content}<|end|>\n<|assistant|>\n",
    }
    # same strings as Foundry's catalog style, up to the trailing separator newline
    assert {k: pt[k].rstrip("\n") for k in FOUNDRY_SDK_PHI} == FOUNDRY_SDK_PHI


def test_every_value_has_content_once():
    for template, bos, eos in STYLES.values():
        pt = chat_template_to_prompt_template(template, bos_token=bos, eos_token=eos)
        assert validate_prompt_template(pt) == pt


# --- round trips --------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
def test_round_trip_renders_the_same_text(style):
    template, bos, eos = STYLES[style]
    pt = chat_template_to_prompt_template(template, bos_token=bos, eos_token=eos)
    rebuilt = prompt_template_to_chat_template(pt, bos_token=bos or None)
    cases = [
        (CONVERSATION, False),  # system + user + assistant
        (CONVERSATION[:2], True),  # system + user, generation prompt
        (CONVERSATION[1:2], True),  # one user turn, generation prompt (== pt["prompt"])
        (CONVERSATION[1:], False),  # no system message: default system prompt / preamble if any
        (MULTI_TURN, False),
        (MULTI_TURN[:3], True),
    ]
    for messages, gen in cases:
        assert _render(rebuilt, messages, gen, bos, eos) == _render(template, messages, gen, bos, eos)
    # and the generation prompt is the PromptTemplate's prompt with the content filled in
    user = CONVERSATION[1]["content"]
    assert _render(template, [CONVERSATION[1]], True, bos, eos) == pt["prompt"].replace("{Content}", user)
    # converting the rebuilt template again gives the same PromptTemplate
    assert chat_template_to_prompt_template(rebuilt, bos_token=bos, eos_token=eos) == pt


def test_rebuilt_template_keeps_bos_as_a_variable():
    pt = chat_template_to_prompt_template(LLAMA3, bos_token="<|begin_of_text|>")
    rebuilt = prompt_template_to_chat_template(pt, bos_token="<|begin_of_text|>")
    assert "{{ bos_token }}" in rebuilt and "<|begin_of_text|>" not in rebuilt
    literal = prompt_template_to_chat_template(pt)
    assert _render(literal, CONVERSATION, False, "", "").startswith("<|begin_of_text|>")


def test_eos_trailer_is_dropped_but_generation_prompt_round_trips(caplog):
    with caplog.at_level("WARNING", logger="slmops.models.templates"):
        pt = chat_template_to_prompt_template(PHI3_EOS, eos_token="<|endoftext|>")
    assert "<|endoftext|>" in caplog.text
    assert pt == chat_template_to_prompt_template(PHI3)
    rebuilt = prompt_template_to_chat_template(pt)
    eos = "<|endoftext|>"
    for messages in (CONVERSATION[:2], CONVERSATION[1:2], MULTI_TURN[:3]):
        assert _render(rebuilt, messages, True, "", eos) == _render(PHI3_EOS, messages, True, "", eos)
    assert _render(PHI3_EOS, CONVERSATION, False, "", eos) == _render(rebuilt, CONVERSATION, False, "", eos) + eos


def test_catalog_style_prompt_template_without_newlines_converts():
    # Foundry catalog style (no separator newlines) is accepted and rendered as written
    pt = dict(FOUNDRY_SDK_PHI, user="<|user|>\n{Content}<|end|>")
    template = prompt_template_to_chat_template(pt)
    assert _render(template, [{"role": "user", "content": "hi"}], True, "", "") == (
        "<|user|>\nhi<|end|>\n<|assistant|>"
    )
    assert _render(template, MULTI_TURN[:2], False, "", "") == "<|user|>\nhi<|end|><|assistant|>\nhello<|end|>"


def test_prompt_only_prompt_template_gives_a_single_turn_template():
    import jinja2

    pt = {"assistant": "{Content}", "prompt": FOUNDRY_DOCS_LLAMA32_PROMPT}
    template = prompt_template_to_chat_template(pt)
    assert _render(template, [{"role": "user", "content": "hi"}], True, "", "") == FOUNDRY_DOCS_LLAMA32_PROMPT.replace(
        "{Content}", "hi"
    )
    with pytest.raises(jinja2.TemplateError, match="single user turn"):
        _render(template, MULTI_TURN, False, "", "")


def test_rebuilt_template_has_generation_tags_for_assistant_masks():
    pt = chat_template_to_prompt_template(PHI3)
    assert "{% generation %}" in prompt_template_to_chat_template(pt)


# --- rendering and errors -----------------------------------------------------------------------------


def test_renderer_matches_transformers_apply_chat_template():
    from transformers.utils.chat_template_utils import render_jinja_template

    for template, bos, eos in STYLES.values():
        for messages, gen in ((CONVERSATION, False), (CONVERSATION[1:2], True)):
            ours = _render(template, messages, gen, bos, eos)
            (theirs,), _ = render_jinja_template(
                [messages], chat_template=template, add_generation_prompt=gen, bos_token=bos, eos_token=eos
            )
            assert ours == theirs


def test_prompt_template_from_tokenizer_uses_its_template():
    class Tok:
        chat_template = LLAMA3
        bos_token = "<|begin_of_text|>"
        eos_token = "<|eot_id|>"

    assert prompt_template_from_tokenizer(Tok())["prompt"].startswith("<|begin_of_text|><|start_header_id|>user")

    class NoTemplate:
        chat_template = None

    with pytest.raises(BadInputError, match="no chat template"):
        prompt_template_from_tokenizer(NoTemplate())


def test_template_without_system_role_omits_system_key():
    no_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' + m['content'] + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    )
    pt = chat_template_to_prompt_template(no_system)
    assert "system" not in pt
    assert pt["prompt"] == "<start_of_turn>user\n{Content}<end_of_turn>\n<start_of_turn>model\n"
    rebuilt = prompt_template_to_chat_template(pt)
    assert _render(rebuilt, MULTI_TURN, False, "", "") == _render(no_system, MULTI_TURN, False, "", "")


def test_template_that_merges_system_into_user_turn_is_refused():
    merged = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] + '\\n\\n' %}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + (messages[0]['content'] + '\\n\\n' if loop.index0 == 1 "
        "and messages[0]['role'] == 'system' else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(BadInputError, match="cannot convert"):
        chat_template_to_prompt_template(merged)


def test_invalid_prompt_templates_report_every_problem():
    with pytest.raises(BadInputError) as e:
        validate_prompt_template({"user": "no placeholder", "bogus": "x", "system": "{Content}{Content}"})
    msg = str(e.value)
    for part in ("unknown key 'bogus'", "missing 'assistant'", "missing 'prompt'", "'user' must contain",
                 "'system' must contain"):
        assert part in msg
    with pytest.raises(BadInputError, match="must contain the 'user' template"):
        prompt_template_to_chat_template(
            {"user": "<|user|>{Content}", "assistant": "{Content}", "prompt": "<|im_start|>{Content}"}
        )


def test_invalid_jinja_is_bad_input():
    with pytest.raises(BadInputError, match="not valid Jinja"):
        chat_template_to_prompt_template("{% for m in messages %}")


def test_prompt_template_is_json_serialisable_for_inference_model_json():
    pt = chat_template_to_prompt_template(CHATML)
    doc = json.loads(json.dumps({"Name": "tiny", "PromptTemplate": pt}))
    assert doc["PromptTemplate"] == FOUNDRY_CHATML
