"""Fine-tuning one sequence classifier per task from the pretrained encoder, and predicting with it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelfuse.demo.text.settings import TextSettings
from modelfuse.demo.text.tasks import TextTask

__all__ = ["fine_tune", "load_tokenizer", "new_classifier", "predict_logits", "save_model"]


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in a local model folder (never downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def new_classifier(folder: str | os.PathLike[str], task: TextTask, seed: int) -> Any:
    """A ``BertForSequenceClassification`` on the encoder in ``folder`` with a new head for
    ``task``'s classes (initialised from ``seed``)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    labels = dict(enumerate(task.classes))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized: classifier.*" is the point here
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder),
                num_labels=len(task.classes),
                id2label=labels,
                label2id={v: k for k, v in labels.items()},
                local_files_only=True,
                attn_implementation="eager",
            )
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
    )


def fine_tune(
    model: Any,
    tokenizer: Any,
    task: TextTask,
    settings: TextSettings,
    seed: int,
) -> list[float]:
    """Train ``model`` on ``task``'s training split in place; returns the loss of every step.

    AdamW with a linearly decaying learning rate over ``settings.steps``
    batches drawn at random (by ``seed``) from the training split; the
    word-embedding table stays frozen, as in the base, so every fine-tune
    shares it exactly. Dropout is on while training; the model is left in
    evaluation mode.
    """
    texts, labels = task.texts["train"], task.labels["train"]
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / max(1, settings.steps)
    )
    rng = np.random.default_rng([seed, 1])
    losses = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        try:
            for _ in range(settings.steps):
                index = rng.choice(
                    len(texts), size=min(settings.batch_size, len(texts)), replace=False
                )
                batch = _encode(tokenizer, [texts[i] for i in index], settings.max_length)
                out = model(**batch, labels=torch.as_tensor(labels[index]))
                out.loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(out.loss.detach()))
        finally:
            model.eval()
            embeddings.requires_grad_(True)
    return losses


def predict_logits(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 128
) -> np.ndarray:
    """Logits of ``texts`` (float64, one row per text, in order); texts of similar length are
    batched together. The model's training flag is restored."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.num_labels))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                batch = _encode(tokenizer, [texts[i] for i in chosen], max_length)
                out[chosen] = model(**batch).logits.double().numpy()
    finally:
        model.train(was_training)
    return out


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """``config.json``, ``model.safetensors`` and the tokenizer files in ``folder``."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
