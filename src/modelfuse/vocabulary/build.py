"""Building the merged model's tokenizer and each model's map into its vocabulary.

mergekit 0.1.5's three sources of the output vocabulary:

- ``base``: the base model's tokenizer (else the first model's);
- ``union``: the base tokenizer plus every token another model has and the
  base lacks, added in model order (the base first, then the models as the
  configuration lists them; within a model by token id), a model's added
  (special) tokens with that model's settings;
- a model's path: that model's tokenizer.

Tokens named under ``tokenizer.tokens`` that the vocabulary lacks are added.
For every model, :attr:`Vocabulary.rows` maps each output token id to the
row of that model's embedding holding the token, or -1 when the model lacks
it (a token whose id is beyond the model's embedding rows counts as lacking).

Tokenizers are built offline with ``transformers`` (``local_files_only``,
never remote code).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modelfuse.errors import CheckpointError, ConfigError

__all__ = [
    "TOKENIZER_FILES",
    "Vocabulary",
    "VocabularyWarning",
    "build_vocabulary",
    "has_tokenizer",
    "load_tokenizer",
    "tokenizer_files",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""Files of which a model folder must hold one for its tokenizer to be read."""

MAX_TOKENIZER_BYTES = 256 * 1024 * 1024
"""Largest tokenizer file read (the largest published ones are a few tens of MB)."""

_DROPPED_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")
"""Keys transformers writes into tokenizer_config.json that describe where it was read from."""


class VocabularyWarning(UserWarning):
    """Something about the vocabularies worth knowing (a token added twice with other settings)."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "..."


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder holds tokenizer files (:data:`TOKENIZER_FILES`)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' log lines and warnings, silenced while a tokenizer is read or written."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"{what} needs the transformers library, which is not installed; "
            "install it with `pip install modelfuse[hf]`"
        ) from None
    return transformers


def load_tokenizer(folder: str | Path, *, where: str = "model") -> Any:
    """Read a model folder's tokenizer offline (never remote code).

    Raises
    ------
    CheckpointError
        The path is not a folder, holds no tokenizer files, holds an
        oversized one, or transformers cannot read them; the message names
        ``where`` and the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"{where}: {_short(str(folder))} is not a model folder; a vocabulary merge reads "
            "each model's tokenizer files from its folder: give the model folder"
        )
    if not has_tokenizer(folder):
        raise CheckpointError(
            f"{where}: {_short(str(folder))} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "building a vocabulary reads every model's tokenizer: copy the model's tokenizer "
            "files into its folder"
        )
    for path in folder.iterdir():
        if path.name.startswith("tokenizer") and path.is_file():
            size = path.stat().st_size
            if size > MAX_TOKENIZER_BYTES:
                raise CheckpointError(
                    f"{where}: {_short(str(path))} is {size} bytes; a tokenizer file is at most "
                    f"{MAX_TOKENIZER_BYTES} bytes: check the folder"
                )
    transformers = _transformers("reading a tokenizer")
    try:
        with _quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False, use_fast=True
            )
    except Exception as exc:  # transformers raises many kinds for unreadable files
        raise CheckpointError(
            f"{where}: {_short(str(folder))}: its tokenizer cannot be read "
            f"({type(exc).__name__}: {str(exc)[:120]}); check its tokenizer files"
        ) from None


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary and, for each model, where its rows are.

    Attributes
    ----------
    tokenizer : transformers tokenizer
        The output tokenizer (do not modify it; :func:`tokenizer_files` writes it).
    tokens : dict of str to int
        Output token -> output id.
    size : int
        Rows of a merged embedding before padding: the largest output id + 1.
    rows : dict of str to numpy.ndarray
        For each model, an int64 array of ``size`` entries: the row of that
        model's embedding holding each output token, -1 where it lacks it.
    vocabularies : dict of str to dict
        Each model's own tokens -> rows (tokens beyond its rows left out).
    model_rows : dict of str to int
        Each model's embedding rows.
    added : tuple of str
        Tokens the output tokenizer has beyond the tokenizer it started from.
    """

    tokenizer: Any
    tokens: dict[str, int]
    size: int
    rows: dict[str, np.ndarray]
    vocabularies: dict[str, dict[str, int]]
    model_rows: dict[str, int]
    added: tuple[str, ...] = ()

    @property
    def models(self) -> tuple[str, ...]:
        """The models, in the order given."""
        return tuple(self.rows)

    def is_identity(self, model: str) -> bool:
        """Whether the model's embedding is the output's as it is (same rows, same order)."""
        rows = self.rows[model]
        return self.model_rows[model] == self.size and bool(
            np.array_equal(rows, np.arange(self.size, dtype=np.int64))
        )


def _copy(tokenizer: Any) -> Any:
    """A copy of a tokenizer (saved and read again, so the original is never changed)."""
    transformers = _transformers("copying a tokenizer")
    with (
        tempfile.TemporaryDirectory(prefix="modelfuse-tokenizer-") as folder,
        _quiet_transformers(),
    ):
        tokenizer.save_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, use_fast=True
        )


def _by_id(vocab: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(vocab.items(), key=lambda item: (item[1], item[0]))


def _union(
    tokenizers: Mapping[str, Any], rows: Mapping[str, int], base: str
) -> tuple[Any, list[str]]:
    """The base tokenizer plus every token of the others it lacks (mergekit's union)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    warned: set[str] = set()
    for label, tokenizer in tokenizers.items():
        limit = rows[label]
        special = tokenizer.added_tokens_decoder
        contents = {info.content for info in special.values()}
        for token, index in _by_id(tokenizer.get_vocab()):
            if index < limit and token not in contents:
                plain.setdefault(token, None)
        for index, info in sorted(special.items()):
            if index >= limit:
                continue
            if info.content not in added:
                added[info.content] = info
            elif str(added[info.content]) != str(info) and info.content not in warned:
                warned.add(info.content)
                warnings.warn(
                    f"token {_short(info.content)} is added with different settings by "
                    f"{_short(label)}; the first model's settings are used",
                    VocabularyWarning,
                    stacklevel=3,
                )
    result = _copy(tokenizers[base])
    base_vocab = tokenizers[base].get_vocab()
    fresh = [t for t in plain if t not in added and t not in base_vocab]
    with _quiet_transformers():
        if fresh:
            result.add_tokens(fresh)
        if added:
            result.add_tokens(list(added.values()))
    return result, fresh + [content for content in added if content not in base_vocab]


def build_vocabulary(
    tokenizers: Mapping[str, Any],
    rows: Mapping[str, int] | None = None,
    *,
    source: Literal["union", "base"] | str = "union",
    base: str | None = None,
    add_tokens: Sequence[str] = (),
) -> Vocabulary:
    """The output tokenizer of a merge and every model's row map into it.

    Parameters
    ----------
    tokenizers : mapping of str to tokenizer
        Every model's tokenizer, by label (the base's among them).
    rows : mapping of str to int, optional
        Each model's embedding rows; a token whose id is not below them is
        lacked. Default: each tokenizer's number of tokens.
    source : {"union", "base"} or str
        The output vocabulary: the union, the base's, or that label's tokenizer.
    base : str, optional
        The label of the base model (default: the first).
    add_tokens : sequence of str
        Tokens added (as plain tokens) when the vocabulary lacks them
        (mergekit adds the keys of ``tokenizer.tokens``).

    Returns
    -------
    Vocabulary

    Raises
    ------
    ConfigError
        ``source`` or ``base`` is not one of the labels.

    Examples
    --------
    >>> from tokenizers import Tokenizer, models
    >>> from transformers import PreTrainedTokenizerFast
    >>> def word_level(words):
    ...     vocab = {w: i for i, w in enumerate(words)}
    ...     return PreTrainedTokenizerFast(
    ...         tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=words[0])))
    >>> v = build_vocabulary({"a": word_level(["<unk>", "cat", "dog"]),
    ...                       "b": word_level(["<unk>", "dog", "owl"])})
    >>> sorted(v.tokens, key=v.tokens.get)
    ['<unk>', 'cat', 'dog', 'owl']
    >>> v.rows["b"].tolist()
    [0, -1, 1, 2]
    """
    if not tokenizers:
        raise ConfigError("a vocabulary needs at least one model's tokenizer")
    labels = list(tokenizers)
    base = labels[0] if base is None else base
    if base not in tokenizers:
        raise ConfigError(f"base model {_short(base)} has no tokenizer among {labels[:5]}")
    rows = {
        label: int(rows[label]) if rows and label in rows else len(tok.get_vocab())
        for label, tok in tokenizers.items()
    }
    if source == "union":
        ordered = {base: tokenizers[base], **{k: v for k, v in tokenizers.items() if k != base}}
        tokenizer, added = _union(ordered, rows, base)
    elif source == "base":
        tokenizer, added = _copy(tokenizers[base]), []
    elif source in tokenizers:
        tokenizer, added = _copy(tokenizers[source]), []
    else:
        raise ConfigError(
            f"tokenizer source {_short(source)} is not a model of the merge; give union, base "
            f"or one of {', '.join(_short(k) for k in labels[:5])}"
        )
    existing = tokenizer.get_vocab()
    named = [t for t in dict.fromkeys(add_tokens) if t not in existing]
    if named:
        with _quiet_transformers():
            tokenizer.add_tokens(named)
        added.extend(named)
    tokens = dict(_by_id(tokenizer.get_vocab()))
    size = max(tokens.values()) + 1 if tokens else 0
    maps: dict[str, np.ndarray] = {}
    own: dict[str, dict[str, int]] = {}
    for label, tok in tokenizers.items():
        limit = rows[label]
        vocab = {t: i for t, i in tok.get_vocab().items() if i < limit}
        own[label] = vocab
        found = np.full(size, -1, dtype=np.int64)
        for token, index in tokens.items():
            row = vocab.get(token)
            if row is not None:
                found[index] = row
        maps[label] = found
    return Vocabulary(tokenizer, tokens, size, maps, own, rows, tuple(added))


def tokenizer_files(tokenizer: Any, chat_template: str | None = None) -> dict[str, bytes]:
    """The files of a tokenizer, as ``save_pretrained`` writes them, by name.

    ``chat_template`` (when given) is written into ``tokenizer_config.json``;
    keys saying where the tokenizer was read from are left out. The
    tokenizer itself is not changed.
    """
    import json

    with tempfile.TemporaryDirectory(prefix="modelfuse-tokenizer-") as folder:
        with _quiet_transformers():
            tokenizer.save_pretrained(folder, save_jinja_files=False)
        files: dict[str, bytes] = {}
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                files[path.name] = path.read_bytes()
    config_name = "tokenizer_config.json"
    config = json.loads(files.get(config_name, b"{}"))
    for key in _DROPPED_KEYS:
        config.pop(key, None)
    if chat_template is not None:
        config["chat_template"] = chat_template
        files.pop("chat_template.jinja", None)
    files[config_name] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    return files
