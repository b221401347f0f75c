"""Task heads kept beside a merged backbone (``heads: keep``).

Each model whose own tensors are not in the merge (a classifier's
``classifier.*``) gets a folder ``heads/NAME/`` in the output: its head
tensors under their own names in ``model.safetensors`` and its
``config.json``. :func:`~modelfuse.merge.name_matching.with_merged_backbone`
puts the merged backbone and a head together into the task's model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import save

from modelfuse.merge.plan import MergePlan

__all__ = ["head_files", "head_folder_names"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def head_folder_names(labels: list[str]) -> list[str]:
    """One folder name per model: the last part of its path, made safe and unique.

    Examples
    --------
    >>> head_folder_names(["runs/sst2", "other/sst2", "./x y/"])
    ['sst2', 'sst2-2', 'x_y']
    """
    names: list[str] = []
    for label in labels:
        stem = _UNSAFE.sub("_", Path(label.rstrip("/\\")).name).strip("._") or "model"
        candidate, number = stem, 2
        while candidate in names:
            candidate, number = f"{stem}-{number}", number + 1
        names.append(candidate)
    return names


def head_files(plan: MergePlan) -> Iterator[tuple[str, bytes | Path]]:
    """``(relative path, content)`` of every kept head's files, one model at a time (only
    one head is held in memory)."""
    folders = head_folder_names([model.label for model, _ in plan.heads])
    for (model, names), folder in zip(plan.heads, folders):
        source = model.source
        original = getattr(source, "original", lambda name: name)
        tensors = {original(name): source.read(name).contiguous() for name in names}
        metadata = {"format": "pt", "model": model.label[:200]}
        yield f"heads/{folder}/model.safetensors", save(tensors, metadata=metadata)
        model_folder = getattr(source, "folder", None)
        if model_folder is not None and (Path(model_folder) / "config.json").is_file():
            yield f"heads/{folder}/config.json", Path(model_folder) / "config.json"
