"""Labelled text read from a JSON-lines or CSV file, for statistics of text classifiers."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from modelfuse.errors import DataError

__all__ = ["TextExamples", "read_text_examples"]


@dataclass(frozen=True)
class TextExamples:
    """Texts and their labels (None when the file has no label column)."""

    texts: list[str]
    labels: list[str] | None
    source: str


def _rows(path: Path) -> tuple[list[dict[str, object]], list[str]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}: line {number} is not valid JSON ({exc.msg}); expected one "
                        "JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}: line {number} is a JSON {type(row).__name__}; expected an "
                        'object such as {"text": ..., "label": ...}'
                    )
                rows.append(row)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        return rows, columns
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            rows = [dict(row) for row in reader]
            return rows, list(reader.fieldnames or [])
    raise DataError(
        f"{path}: unsupported data file type {suffix or '(none)'!r}; give a .jsonl or .csv file"
    )


def read_text_examples(
    path: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str | None = "label",
    limit: int | None = None,
) -> TextExamples:
    """Read texts (and labels) from a ``.jsonl`` or ``.csv`` file.

    Parameters
    ----------
    path : path
        A JSON-lines file (one object per line) or a CSV file with a header.
    text_column : str, default "text"
        The column holding the text.
    label_column : str or None, default "label"
        The column holding the label; None, or a column the file does not
        have, gives texts without labels.
    limit : int, optional
        Keep the first ``limit`` rows.

    Returns
    -------
    TextExamples

    Raises
    ------
    DataError
        The file is missing, of another type, malformed, empty, lacks the text
        column, or has an empty text or label.

    Examples
    --------
    >>> import tempfile, os
    >>> file = os.path.join(tempfile.mkdtemp(), "d.csv")
    >>> _ = open(file, "w").write("text,label\\ngood film,1\\nbad film,0\\n")
    >>> data = read_text_examples(file)
    >>> data.texts, data.labels
    (['good film', 'bad film'], ['1', '0'])
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file; give a .jsonl or .csv file of texts")
    try:
        rows, columns = _rows(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file; expected .jsonl or .csv") from None
    if not rows:
        raise DataError(f"{path}: no rows; the file needs at least one example")
    if text_column not in columns:
        raise DataError(
            f"{path}: no column {text_column!r}; the columns are {', '.join(columns) or '(none)'}; "
            "choose one with --text-column"
        )
    if limit is not None:
        rows = rows[:limit]
    has_labels = label_column is not None and label_column in columns
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        text = row.get(text_column)
        if not isinstance(text, str) or not text:
            raise DataError(
                f"{path}: row {number} has no text in column {text_column!r} (got {text!r})"
            )
        texts.append(text)
        if has_labels:
            label = row.get(label_column)  # type: ignore[arg-type]
            if label is None or label == "" or isinstance(label, (dict, list)):
                raise DataError(
                    f"{path}: row {number} has no usable label in column {label_column!r} "
                    f"(got {label!r})"
                )
            labels.append(str(label))
    return TextExamples(texts, labels if has_labels else None, str(path))
