"""Vocabularies of merged models: the output tokenizer and each model's rows in it.

A merge of models whose tokenizers differ (mergekit's ``tokenizer_source`` and
``tokenizer`` keys) builds one output tokenizer (:func:`build_vocabulary`),
decides which row every model gives each output token (:func:`plan_rows`),
and rearranges each model's embedding and output head into the output
vocabulary (:func:`align_rows`, :func:`align_tensors`) before the merge
method runs. ``chat_template`` picks the template written with the tokenizer
(:func:`resolve_chat_template`).

Needs ``transformers`` to read and write tokenizers (``pip install modelfuse[hf]``).
"""

from modelfuse.vocabulary.build import (
    Vocabulary,
    VocabularyWarning,
    build_vocabulary,
    has_tokenizer,
    load_tokenizer,
    tokenizer_files,
)
from modelfuse.vocabulary.chat_templates import CHAT_TEMPLATES, resolve_chat_template
from modelfuse.vocabulary.rows import (
    RowPlan,
    align_rows,
    align_tensors,
    gather_rows,
    padding_row,
    plan_rows,
)
from modelfuse.vocabulary.settings import (
    ModelTokenSource,
    TokenizerSettings,
    TokenSetting,
    ZeroSource,
    model_reference,
    tokenizer_settings,
)
from modelfuse.vocabulary.sources import (
    EMBEDDING_NAMES,
    HEAD_NAMES,
    AlignedSource,
    VocabularyMerge,
    prepare_vocabulary,
    vocabulary_tensors,
)

__all__ = [
    "CHAT_TEMPLATES",
    "EMBEDDING_NAMES",
    "HEAD_NAMES",
    "AlignedSource",
    "VocabularyMerge",
    "prepare_vocabulary",
    "vocabulary_tensors",
    "ModelTokenSource",
    "RowPlan",
    "TokenSetting",
    "TokenizerSettings",
    "Vocabulary",
    "VocabularyWarning",
    "ZeroSource",
    "align_rows",
    "align_tensors",
    "build_vocabulary",
    "gather_rows",
    "has_tokenizer",
    "load_tokenizer",
    "model_reference",
    "padding_row",
    "plan_rows",
    "resolve_chat_template",
    "tokenizer_files",
    "tokenizer_settings",
]
