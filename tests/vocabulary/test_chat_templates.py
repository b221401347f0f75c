"""Built-in chat templates render the formats written out here; auto and literals as mergekit."""

from __future__ import annotations

import pytest

from modelfuse.errors import ConfigError
from modelfuse.vocabulary import CHAT_TEMPLATES, resolve_chat_template

from ._tiny import SPECIAL, WORDS, word_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]

EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": "<s> [INST] Be brief.\n\nHi [/INST] Hello</s> [INST] Bye [/INST]",
    "alpaca": (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n"
        "### Instruction:\nBye\n\n### Response:\n"
    ),
    "exaone": (
        "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n"
        "[|user|]Bye\n[|assistant|]"
    ),
}


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_builtin_template_renders_its_format(name):
    tokenizer = word_tokenizer(SPECIAL + WORDS, chat_template=resolve_chat_template(name))
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED[name]


def test_exaone_adds_an_empty_system_turn_without_a_system_message():
    tokenizer = word_tokenizer(SPECIAL + WORDS, chat_template=resolve_chat_template("exaone"))
    text = tokenizer.apply_chat_template(CHAT[1:2], tokenize=False)
    assert text == "[|system|][|endofturn|]\n[|user|]Hi\n"


def test_mistral_refuses_roles_that_do_not_alternate():
    tokenizer = word_tokenizer(SPECIAL + WORDS, chat_template=resolve_chat_template("mistral"))
    with pytest.raises(Exception, match="must alternate"):
        tokenizer.apply_chat_template([CHAT[1], CHAT[1]], tokenize=False)


def test_auto_takes_the_most_frequent_model_template_first_met_on_a_tie():
    one, two = "{{ 'one' }}", "{{ 'two' }}"
    assert resolve_chat_template("auto", [one, None, two, two + "\n"]) == two
    assert resolve_chat_template("auto", [two, one]) == two
    assert resolve_chat_template("auto", [None, ""]) is None


def test_a_jinja_literal_is_kept_as_it_is():
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(literal) == literal


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("chatml2", "unknown chat template 'chatml2'; expected a built-in name"),
        ("{{ x }}", "unknown chat template"),
        ("x" * 300, "unknown chat template 'xxxx"),
        ("{% for m in messages %}{{ m }}", "not a valid Jinja template"),
        ("", "expected a built-in name"),
    ],
)
def test_bad_templates_are_refused_naming_the_key_and_the_choices(value, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve_chat_template(value)
    message = str(info.value)
    assert message.startswith("chat_template: ") and len(message) < 400
    assert "\n" not in message
