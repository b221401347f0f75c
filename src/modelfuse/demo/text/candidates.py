"""Scoring encoders on every task with each task's own head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modelfuse.demo.text.finetune import predict_logits
from modelfuse.demo.text.tasks import TextTask

__all__ = ["Candidate", "TaskScorer"]


@dataclass
class Candidate:
    """One row of the study: an encoder with each task's head, and its logits per task.

    Attributes
    ----------
    name : str
    family : str
        ``"reference"`` (a fine-tune or the base) or ``"merge"``.
    details : str
        How it was made (settings, what chose them).
    logits : dict
        ``logits[task][split]`` for ``"val"`` and ``"test"``.
    config : str or None
        The configuration file of a merge, relative to the output folder.
    """

    name: str
    family: str
    details: str
    logits: dict[str, dict[str, np.ndarray]] = field(repr=False)
    config: str | None = None

    def accuracy(self, task: TextTask, split: str) -> float:
        """Accuracy on one task's split."""
        predicted = self.logits[task.name][split].argmax(axis=1)
        return float(np.mean(predicted == task.labels[split]))


class TaskScorer:
    """Holds each task's fine-tuned classifier and scores an encoder with each task's head.

    Parameters
    ----------
    models : sequence
        One fine-tuned ``...ForSequenceClassification`` per task (in the order of ``tasks``).
    """

    def __init__(
        self, models: Sequence[Any], tokenizer: Any, tasks: Sequence[TextTask], max_length: int
    ) -> None:
        self.models = list(models)
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.max_length = max_length
        self.own = [{k: v.clone() for k, v in m.state_dict().items()} for m in self.models]

    def logits(
        self, backbone: Mapping[str, torch.Tensor] | None, splits: Sequence[str] = ("val", "test")
    ) -> dict[str, dict[str, np.ndarray]]:
        """Logits of every task's ``splits`` with ``backbone`` (None: each task's own
        fine-tuned encoder) under each task's own head."""
        from modelfuse.merge.name_matching import with_merged_backbone

        out: dict[str, dict[str, np.ndarray]] = {}
        for task, model, own in zip(self.tasks, self.models, self.own):
            state = own if backbone is None else with_merged_backbone(own, backbone)
            model.load_state_dict(state)
            try:
                out[task.name] = {
                    split: predict_logits(model, self.tokenizer, task.texts[split], self.max_length)
                    for split in splits
                }
            finally:
                model.load_state_dict(own)
        return out

    def mean_accuracy(self, logits: Mapping[str, Mapping[str, np.ndarray]], split: str) -> float:
        """Accuracy averaged over the tasks."""
        return float(
            np.mean(
                [np.mean(logits[t.name][split].argmax(axis=1) == t.labels[split])
                 for t in self.tasks]
            )
        )
