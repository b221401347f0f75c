"""The multi-task merges of the text study, each one a YAML configuration run by the file engine.

Every merge keeps each task's head (``heads: keep``) and matches the
``BertForSequenceClassification`` fine-tunes to the ``BertModel`` base through
their ``bert.`` prefix (``allow_prefix: true``). Its configuration is written
to ``configs/NAME.yaml`` with paths relative to that file, so
``modelfuse merge configs/NAME.yaml merges/NAME`` in the output folder makes
it again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "adamerging_lambdas",
    "compute_statistics",
    "layer_group",
    "load_backbone",
    "merge_config",
    "run_merge",
    "write_config",
]


def merge_config(
    method: str,
    base: str,
    models: Sequence[str],
    *,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    statistics: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A merge configuration of the task models' encoders, heads kept per task.

    Examples
    --------
    >>> merge_config("ties", "../models/base", ["../models/a", "../models/b"],
    ...              parameters={"lambda": 1.0})["heads"]
    'keep'
    """
    entries: list[dict[str, Any]] = []
    for i, model in enumerate(models):
        entry: dict[str, Any] = {"model": model}
        if model_parameters is not None and model_parameters[i]:
            entry["parameters"] = dict(model_parameters[i])
        if statistics is not None:
            entry["statistics"] = statistics[i]
        entries.append(entry)
    config: dict[str, Any] = {"merge_method": method, "base_model": base, "models": entries}
    if parameters:
        config["parameters"] = dict(parameters)
    config.update({"dtype": "float32", "allow_prefix": True, "heads": "keep"})
    return config


def write_config(config: Mapping[str, Any], path: Path, comment: str) -> Path:
    """Write ``config`` as YAML under a ``# comment`` header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(header + yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


def run_merge(config: Path, out: Path, seed: int) -> Any:
    """Run one configuration file through the file engine into ``out`` (replaced if present)."""
    import modelfuse

    return modelfuse.merge(
        config,
        out,
        overwrite=True,
        random_seed=seed,
        model_card=False,
        copy_tokenizer=False,
    )


def load_backbone(folder: Path) -> dict[str, torch.Tensor]:
    """The merged encoder's tensors in ``folder/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


_LAYER = re.compile(r"(?:^|\.)(layers?\.\d+)\.")


def layer_group(name: str) -> str:
    """The block a tensor belongs to: ``encoder.layer.N.``, else its first name part.

    Examples
    --------
    >>> layer_group("bert.encoder.layer.3.attention.self.query.weight")
    'encoder.layer.3.'
    >>> layer_group("bert.embeddings.LayerNorm.weight")
    'embeddings.'
    """
    parts = name.split(".")
    if parts and parts[0] == "bert":
        parts = parts[1:]
    joined = ".".join(parts)
    found = _LAYER.search(joined)
    if found is not None:
        return joined[: found.end()]
    return parts[0] + "."


def compute_statistics(
    folder: Path,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    fisher_path: Path,
    gram_path: Path,
    fisher_examples: int,
    gram_examples: int,
    max_length: int,
) -> None:
    """Fisher diagonal (exact) and Gram matrices of the classifier in ``folder`` on ``texts``.

    The classifier is loaded and batched as ``modelfuse statistics`` does
    (texts of one length per batch, nothing padded). Its word-embedding
    table, frozen during fine-tuning and so equal in every model, is held as
    a buffer for the Fisher: the Fisher file has no entry for it and the
    merge averages its identical copies.
    """
    from modelfuse.statistics import fisher_diagonal, gram_matrices, save
    from modelfuse.statistics.huggingface import length_grouped_batches, load_sequence_classifier

    model, tokenizer = load_sequence_classifier(folder)
    embedding = model.get_input_embeddings()
    table = embedding.weight.detach()
    del embedding.weight
    embedding.register_buffer("weight", table)
    fisher = fisher_diagonal(
        model,
        length_grouped_batches(
            tokenizer,
            list(texts[:fisher_examples]),
            list(labels[:fisher_examples]),
            batch_size=16,
            max_length=max_length,
        ),
        n_examples=fisher_examples,
        kind="exact",
        chunk_size=8,
    )
    save(fisher, fisher_path)
    grams = gram_matrices(
        model,
        length_grouped_batches(
            tokenizer, list(texts[:gram_examples]), None, batch_size=32, max_length=max_length
        ),
        n_examples=gram_examples,
    )
    save(grams, gram_path)


class _TaskHeads(torch.nn.Module):
    """The shared encoder with one fixed head per task; an input row is ``[task, token ids...]``.

    Only the encoder's tensors are parameters (``bert.*``): AdaMerging learns
    their coefficients, the heads stay each task's own.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        heads: list[tuple[Any, torch.Tensor, torch.Tensor]],
        pad_id: int,
    ) -> None:
        super().__init__()
        self.bert = encoder
        self.task_heads = heads  # (pooler-dropout-free head: weight, bias) per task, not trained
        self.pad_id = pad_id

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        task = int(rows[0, 0])
        ids = rows[:, 1:]
        out = self.bert(input_ids=ids, attention_mask=(ids != self.pad_id).long())
        weight, bias = self.task_heads[task]
        return torch.nn.functional.linear(out.pooler_output, weight, bias)


def adamerging_lambdas(
    base_model: Any,
    task_models: Sequence[Any],
    tokenizer: Any,
    texts: Sequence[Sequence[str]],
    *,
    steps: int,
    max_length: int,
    seed: int,
) -> tuple[dict[str, tuple[float, ...]], list[float]]:
    """Layer-wise AdaMerging coefficients of the task vectors of the encoders.

    One coefficient per task and block (embeddings, each encoder layer, the
    pooler), learned by :func:`modelfuse.search.adamerging` on unlabeled
    ``texts`` (one list per task; each batch is one task's, scored by that
    task's own head), cycling over the tasks.

    Returns
    -------
    lambdas : dict
        Block prefix (e.g. ``"encoder.layer.3."``) -> one coefficient per task.
    trace : list of float
        Minus the mean entropy of each step's batch.
    """
    import numpy as np

    from modelfuse.search import adamerging

    heads = [(m.classifier.weight.detach(), m.classifier.bias.detach()) for m in task_models]
    wrapper = _TaskHeads(base_model.bert, heads, int(tokenizer.pad_token_id or 0))
    base = {k: v.detach().clone() for k, v in wrapper.state_dict().items()}
    tuned = [
        {
            k: v
            for k, v in {**base, **{"bert." + n: t for n, t in m.bert.state_dict().items()}}.items()
            if k in base
        }
        for m in task_models
    ]
    rng = np.random.default_rng([seed, 2])
    per_task = []
    for number, task_texts in enumerate(texts):
        order = rng.permutation(len(task_texts))
        rows = []
        for start in range(0, len(order), 16):
            chosen = [task_texts[i] for i in order[start : start + 16]]
            ids = tokenizer(
                chosen, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )["input_ids"]
            rows.append(torch.cat([torch.full((len(chosen), 1), number), ids], dim=1))
        per_task.append(rows)
    batches = [b for group in zip(*per_task) for b in group]  # task after task
    result = adamerging(
        wrapper,
        base,
        tuned,
        batches,
        granularity="layer",
        steps=steps,
        lr=1e-2,
        layer_of=layer_group,
    )
    lambdas = {
        group: tuple(float(x) for x in values)
        for group, values in result.parameters["lambdas"].items()
    }
    return lambdas, [c.score for c in result.trace]


def relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` with forward slashes."""
    return Path(os.path.relpath(path, start)).as_posix()
