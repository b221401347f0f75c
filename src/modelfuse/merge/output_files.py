"""The files a merge writes beside the weights.

``modelfuse.yaml`` (the configuration with absolute paths), the model card
``README.md`` and the output's ``config.json`` (layer count, vocabulary size,
dtype; no input's identity).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from modelfuse.merge.config import MergeConfig
from modelfuse.merge.parameters import short
from modelfuse.merge.plan import MergePlan

__all__ = ["DROPPED_CONFIG_KEYS", "model_card_text", "resolved_yaml", "updated_model_config"]


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


_VOCAB_ROWS = re.compile(r"embed_tokens\.weight$|wte\.weight$|word_embeddings\.weight$")


DROPPED_CONFIG_KEYS = (
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation_autoset",
    "gradient_checkpointing",
)
"""Keys of an input's config.json that describe that input, not the merge: removed from OUT."""


def _written_dtype(plan: MergePlan) -> torch.dtype | None:
    """The dtype most merged tensors are written in (None when nothing is merged)."""
    counts: dict[torch.dtype, int] = {}
    for task in plan.tasks:
        if task.action == "merge":
            counts[task.out_dtype] = counts.get(task.out_dtype, 0) + task.nbytes
    return max(counts, key=lambda d: counts[d]) if counts else None


def updated_model_config(
    files_from: Path | None, plan: MergePlan, vocab_size: int | None = None
) -> tuple[str, list[str]] | None:
    """config.json for the output: its layer count, vocabulary size and dtype, no input's identity.

    ``vocab_size`` (the rows of a built vocabulary) is written when given.
    ``torch_dtype`` (and ``dtype``, its newer name, when present) are set to
    the dtype the merged tensors are written in; the keys of
    :data:`DROPPED_CONFIG_KEYS` are removed. None when there is no
    config.json (or it is not a JSON object, which is then copied as it is).
    """
    if files_from is None or not (files_from / "config.json").is_file():
        return None
    try:
        data = json.loads((files_from / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    changes = []
    if plan.layers is not None:
        for key in _LAYER_KEYS:
            if key in data and data[key] != plan.layers:
                changes.append(f"{key} {short(data[key])} -> {plan.layers}")
                data[key] = plan.layers
    for task in plan.tasks:
        if task.shared_rows is not None and _VOCAB_ROWS.search(task.name):
            rows = task.shape[0]
            if "vocab_size" in data and data["vocab_size"] != rows:
                changes.append(f"vocab_size {short(data['vocab_size'])} -> {rows}")
                data["vocab_size"] = rows
    if vocab_size is not None and data.get("vocab_size") != vocab_size:
        changes.append(f"vocab_size {short(data.get('vocab_size'))} -> {vocab_size}")
        data["vocab_size"] = vocab_size
    written = _written_dtype(plan)
    if written is not None:
        name = str(written).removeprefix("torch.")
        keys = [k for k in ("torch_dtype", "dtype") if k in data] or ["torch_dtype"]
        for key in keys:
            if data.get(key) != name:
                changes.append(f"{key} {short(data.get(key))} -> {name}")
                data[key] = name
    for key in DROPPED_CONFIG_KEYS:
        if key in data:
            del data[key]
            changes.append(f"{key} removed")
    return json.dumps(data, indent=2) + "\n", changes


def _resolved_config(config: MergeConfig, located: dict[str, str]) -> dict[str, Any]:
    """The configuration with every model, statistics and patch path made absolute."""
    data = config.model_dump(mode="json", exclude_none=True)

    def fix(mapping: dict[str, Any], key: str) -> None:
        if isinstance(mapping.get(key), str) and mapping[key] in located:
            mapping[key] = located[mapping[key]]

    fix(data, "base_model")
    fix(data, "base_statistics")
    for entry in data.get("models", []):
        fix(entry, "model")
        fix(entry, "statistics")
    for piece in data.get("slices", []):
        fix(piece, "base_model")
        for source in piece.get("sources", []):
            fix(source, "model")
    for patch in data.get("patches", []):
        fix(patch, "patch")
    fix(data, "tokenizer_source")
    tokenizer = data.get("tokenizer") or {}
    fix(tokenizer, "source")
    for setting in (tokenizer.get("tokens") or {}).values():
        fix(setting, "source")
        if isinstance(setting.get("source"), dict):
            fix(setting["source"], "model")
    return data


def resolved_yaml(config: MergeConfig, located: dict[str, str]) -> str:
    """modelfuse.yaml: a configuration that merges the same inputs again, from any folder."""
    from modelfuse import __version__

    header = (
        f"# modelfuse_version: {__version__}\n"
        "# The configuration of this merge, with absolute paths: "
        "`modelfuse merge modelfuse.yaml OUT` merges it again.\n"
    )
    return header + yaml.safe_dump(_resolved_config(config, located), sort_keys=False)


def model_card_text(config: MergeConfig, plan: MergePlan, located: dict[str, str]) -> str:
    """README.md: the method, the inputs, the parameters and the modelfuse version."""
    from modelfuse import __version__

    data = _resolved_config(config, located)
    method = plan.method
    lines = [
        "---",
        "tags:",
        "- merge",
        "- modelfuse",
        "---",
        "",
        "# Merged model",
        "",
        f"This model was merged with modelfuse {__version__} using the `{method.name}` method "
        f"({method.summary}).",
        "",
        "## Inputs",
        "",
    ]
    if "base_model" in data:
        lines.append(f"- base model: `{data['base_model']}`")
    for entry in data.get("models", []):
        extra = f" (statistics `{entry['statistics']}`)" if "statistics" in entry else ""
        lines.append(f"- model: `{entry['model']}`{extra}")
    for number, piece in enumerate(data.get("slices", [])):
        for source in piece["sources"]:
            lines.append(
                f"- slice {number}: `{source['model']}` layers "
                f"{source['layer_range'][0]}-{source['layer_range'][1] - 1}"
            )
    for patch in data.get("patches", []):
        lines.append(f"- patch: `{patch['patch']}` scaled by {patch['scale']}")
    lines += ["", "## Parameters", ""]
    settings = {
        key: value
        for key, value in data.items()
        if key
        in ("parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template")
    }
    per_model = [e for e in data.get("models", []) if "parameters" in e]
    if not settings and not per_model:
        lines.append("The method's defaults (see `modelfuse methods " + method.name + "`).")
    else:
        if settings:
            lines += ["```yaml", yaml.safe_dump(settings, sort_keys=False).rstrip(), "```"]
        for entry in per_model:
            lines.append(f"- `{entry['model']}`: {json.dumps(entry['parameters'])}")
    lines += [
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(data, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
