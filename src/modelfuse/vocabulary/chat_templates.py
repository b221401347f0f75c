"""Chat templates for the merged tokenizer: ``chat_template: NAME | auto | JINJA``.

mergekit 0.1.5 reads ``chat_template`` as one of its built-in names
(``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``), ``auto`` (the
template most of the input models' tokenizers carry), or a Jinja template
(text with ``{`` of at least 20 characters). The built-in templates here are
written for modelfuse from the formats' published descriptions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from modelfuse.errors import ConfigError

__all__ = ["CHAT_TEMPLATES", "resolve_chat_template"]

_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' "
    "~ message['content'] | trim ~ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

_MISTRAL = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 is even) -%}"
    "{{- raise_exception('mistral chat template: after an optional system message, the roles "
    "must alternate user, assistant, user, ...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}"
    "{{ ' [INST] ' ~ system ~ '\\n\\n' ~ message['content'] ~ ' [/INST]' }}"
    "{%- else -%}{{ ' [INST] ' ~ message['content'] ~ ' [/INST]' }}{%- endif -%}"
    "{%- else -%}{{ ' ' ~ message['content'] ~ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

_ALPACA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] | trim ~ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '### Instruction:\\n' ~ message['content'] | trim ~ '\\n\\n' }}"
    "{%- elif message['role'] == 'user_context' -%}"
    "{{ '### Input:\\n' ~ message['content'] | trim ~ '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Response:\\n' ~ message['content'] | trim ~ '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)

_EXAONE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{{ '[|system|][|endofturn|]\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '[|' ~ message['role'] ~ '|]' ~ message['content'] }}"
    "{%- if message['role'] == 'user' -%}{{ '\\n' }}"
    "{%- else -%}{{ '[|endofturn|]\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA,
    "chatml": _CHATML,
    "exaone": _EXAONE,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
}
"""The built-in chat templates, by the names mergekit 0.1.5 gives them."""

MIN_TEMPLATE_LENGTH = 20
"""Shortest text read as a Jinja template (mergekit's rule: shorter text with ``{`` is refused)."""


def _short(value: str, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "..."


def _check_jinja(template: str, where: str) -> None:
    """Refuse a template that Jinja cannot parse, with Jinja's reason."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers layout: the tokenizer checks it when used
        return
    try:
        _compile_jinja_template(template)
    except ImportError:
        return
    except Exception as exc:  # jinja2.TemplateSyntaxError and friends
        raise ConfigError(
            f"{where}: not a valid Jinja template ({str(exc)[:120]}); fix the template or give "
            f"a built-in name ({', '.join(CHAT_TEMPLATES)}) or auto"
        ) from None


def resolve_chat_template(
    value: str,
    model_templates: Sequence[str | None] = (),
    *,
    where: str = "chat_template",
) -> str | None:
    """The Jinja text of ``chat_template: value``.

    Parameters
    ----------
    value : str
        A built-in name (:data:`CHAT_TEMPLATES`), ``"auto"``, or a Jinja
        template (text holding ``{``, at least 20 characters).
    model_templates : sequence of str or None
        For ``"auto"``: the input models' templates (None for a model without
        one), the base model first. The most frequent wins; a tie goes to the
        one met first.
    where : str
        The key named in messages.

    Returns
    -------
    str or None
        The template; None for ``auto`` when no model has one (mergekit then
        sets none).

    Raises
    ------
    ConfigError
        An unknown name (the message lists the built-in ones) or a template
        that Jinja cannot parse.

    Examples
    --------
    >>> resolve_chat_template("chatml")[:40]
    "{%- for message in messages -%}{{ '<|im_"
    >>> resolve_chat_template("auto", ["{{ a }}", None, "{{ b }}", "{{ b }}"])
    '{{ b }}'
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{where}: expected a built-in name ({', '.join(CHAT_TEMPLATES)}), auto or a Jinja "
            f"template, got {_short(value) if isinstance(value, str) else type(value).__name__}"
        )
    if value == "auto":
        found = [t.strip() for t in model_templates if isinstance(t, str) and t.strip()]
        if not found:
            return None
        return Counter(found).most_common(1)[0][0]
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{" not in value or len(value) < MIN_TEMPLATE_LENGTH:
        raise ConfigError(
            f"{where}: unknown chat template {_short(value)}; expected a built-in name "
            f"({', '.join(CHAT_TEMPLATES)}), auto, or a Jinja template (text with {{ of at "
            f"least {MIN_TEMPLATE_LENGTH} characters)"
        )
    _check_jinja(value, where)
    return value
