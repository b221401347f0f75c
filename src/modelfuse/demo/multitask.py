"""The multi-task scenario: one fine-tune per task, merged into one model for all tasks.

The tasks (original, rotated, inverted and noisy digits) share the labels, so
every tensor, the classifier head included, can be merged. Candidates: each
task model, the pre-trained model, the plain average, task arithmetic with
lambda chosen by nested cross-validation, TIES and DARE (grids on the
validation split), Fisher (each model's Fisher on its own task) and RegMean
(each model's Gram matrices on its own task), the soft-voting ensemble of
the task models, and that ensemble distilled into one network started from
the best merge (:mod:`modelfuse.demo.distilled`, on the pooled training
images of every task). Every candidate is scored on each task's test images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelfuse.demo.choice import (
    NestedChoice,
    choose_task_arithmetic,
    describe_grid,
    describe_nested,
    search_ties_and_dare,
)
from modelfuse.demo.data import Splits, apply_task, task_seed
from modelfuse.demo.distilled import (
    DistilledSummary,
    best_merge,
    distil_ensemble,
    soft_vote_log_probabilities,
)
from modelfuse.demo.evaluate import Entry, Family, accuracy_of, model_entry, vote_entry
from modelfuse.demo.settings import DemoSettings
from modelfuse.demo.zoo import Zoo, batches, load_mlp, predict_logits

__all__ = ["MultiTaskStudy", "multitask_study"]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MultiTaskStudy:
    """Everything the multi-task scenario produced.

    Attributes
    ----------
    tasks : tuple of str
    entries : list of Entry
        Log-probabilities on the pooled validation and test sets (all tasks,
        task after task).
    per_task : dict
        ``per_task[name][task]`` is the test accuracy of candidate ``name`` on ``task``.
    reference : str
        The task model with the best pooled validation accuracy (ties: the lower pooled
        validation NLL, then task order).
    y_test : array
        Pooled test labels.
    task_arithmetic : NestedChoice
    experts : dict
        Task to the name of the model fine-tuned on it.
    distilled : DistilledSummary
        How the distilled ensemble was made.
    """

    tasks: tuple[str, ...]
    entries: list[Entry]
    per_task: dict[str, dict[str, float]]
    reference: str
    y_test: np.ndarray
    task_arithmetic: NestedChoice
    experts: dict[str, str]
    distilled: DistilledSummary


def multitask_study(
    zoo: Zoo,
    splits: Splits,
    settings: DemoSettings,
    seed: int,
    *,
    tick: Callable[[str], None] | None = None,
    folder: Path | None = None,
) -> MultiTaskStudy:
    """Merge the task models every way and score each candidate per task; see the module docstring.

    With ``folder``, the distilled ensemble's weights are written to
    ``folder/distilled/multitask``.
    """
    import modelfuse
    from modelfuse.evaluation import choose_reference
    from modelfuse.search import accuracy_score
    from modelfuse.statistics import fisher_diagonal, gram_matrices

    step = tick or (lambda name: None)
    model = zoo.model
    tasks = tuple(zoo.tasks)
    task_models = [zoo.tasks[t] for t in tasks]
    sds = [f.state_dict for f in task_models]
    base = zoo.pretrained.state_dict
    n_tasks = len(tasks)
    x_val = {t: apply_task(t, splits.x_val, task_seed(seed, j, "val")) for j, t in enumerate(tasks)}
    x_test = {
        t: apply_task(t, splits.x_test, task_seed(seed, j, "test")) for j, t in enumerate(tasks)
    }
    y_val = np.tile(splits.y_val, n_tasks)
    y_test = np.tile(splits.y_test, n_tasks)
    pooled_val = np.concatenate([x_val[t] for t in tasks])
    pooled_test = np.concatenate([x_test[t] for t in tasks])
    val_accuracy = accuracy_score(model, [(torch.as_tensor(pooled_val), torch.as_tensor(y_val))])

    entries: list[Entry] = []
    merged_weights: dict[str, StateDict] = {}

    def add(name: str, family: Family, cost: int, details: str, sd: StateDict) -> None:
        entries.append(model_entry(name, family, cost, details, model, sd, pooled_val, pooled_test))
        if family == "merge":
            merged_weights[name] = sd

    for task, f in zip(tasks, task_models):
        add(f.name, "individual", 1, f"fine-tuned on {task} digits", f.state_dict)
    reference = choose_reference(
        {e.name: accuracy_of(e.val, y_val) for e in entries},
        tie_breaker={e.name: float(-np.mean(e.val[np.arange(len(y_val)), y_val])) for e in entries},
    )
    add("pre-trained", "individual", 1, "pre-trained on original digits only", base)
    add(
        "average",
        "merge",
        1,
        f"uniform average of the {n_tasks} task models",
        modelfuse.merge_state_dicts("linear", sds),
    )

    choice, ta_merge = choose_task_arithmetic(model, sds, base, pooled_val, y_val, settings, seed)
    add(
        "task arithmetic",
        "merge",
        1,
        f"lambda {choice.chosen['lambda']:g} x mean task vector, chosen by CV on validation; "
        + describe_nested(choice),
        ta_merge,
    )
    step("multi-task: task arithmetic")

    ties, dare = search_ties_and_dare(sds, base, settings, val_accuracy, seed)
    add("TIES", "merge", 1, describe_grid(ties), ties.state_dict)
    add("DARE", "merge", 1, f"DARE-TIES, {describe_grid(dare)}", dare.state_dict)
    step("multi-task: TIES and DARE")

    fishers, grams = [], []
    x_train = {
        t: apply_task(t, splits.x_train, task_seed(seed, j, "train")) for j, t in enumerate(tasks)
    }
    for task, f in zip(tasks, task_models):
        net = load_mlp(settings.hidden, f.state_dict)
        train_batches = batches(x_train[task], splits.y_train)
        fisher = fisher_diagonal(
            net, train_batches, n_examples=settings.fisher_examples, kind="exact"
        )
        fishers.append(dict(fisher))
        grams.append(dict(gram_matrices(net, train_batches, n_examples=settings.gram_examples)))
    add(
        "Fisher merge",
        "merge",
        1,
        "each task model's exact diagonal Fisher on its own task's training images",
        modelfuse.merge_state_dicts("fisher", sds, fishers=fishers),
    )
    add(
        "RegMean",
        "merge",
        1,
        "each task model's Gram matrices on its own task's training images, alpha 0.1",
        modelfuse.merge_state_dicts("regmean", sds, grams=grams, alpha=0.1),
    )
    step("multi-task: Fisher and RegMean")

    k = n_tasks
    vote = vote_entry("soft vote", entries[:k], k, f"mean probabilities of the {k} task models")
    entries.append(vote)
    pooled_train = np.concatenate([x_train[t] for t in tasks])
    start = best_merge(entries, merged_weights, y_val)
    distilled, distilled_summary, _ = distil_ensemble(
        name="distilled ensemble",
        hidden=settings.hidden,
        teacher=vote,
        teacher_train=soft_vote_log_probabilities(
            [predict_logits(model, sd, pooled_train) for sd in sds]
        ),
        start=start,
        start_weights=merged_weights[start],
        x_train=pooled_train,
        y_train=np.tile(splits.y_train, n_tasks),
        x_val=pooled_val,
        x_test=pooled_test,
        x_shift=None,
        max_epochs=settings.distill_epochs,
        seed=seed,
        folder=None if folder is None else folder / "distilled" / "multitask",
    )
    entries.append(distilled)
    n = len(splits.y_test)
    per_task = {
        e.name: {
            t: accuracy_of(e.test[j * n : (j + 1) * n], splits.y_test) for j, t in enumerate(tasks)
        }
        for e in entries
    }
    step("multi-task: ensemble and its distillation")
    experts = {t: f.name for t, f in zip(tasks, task_models)}
    return MultiTaskStudy(
        tasks, entries, per_task, reference, y_test, choice, experts, distilled_summary
    )
