"""The multi-task scenario: one fine-tune per task, merged into one model for all tasks.

The tasks (original, rotated, inverted and noisy digits) share the labels, so
every tensor, the classifier head included, can be merged. Candidates: each
task model, the pre-trained model, the plain average, task arithmetic with
lambda chosen by nested cross-validation, TIES and DARE (grids on the
validation split), Fisher (each model's Fisher on its own task) and RegMean
(each model's Gram matrices on its own task), and the soft-voting ensemble of
the task models. Every candidate is scored on each task's test images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from modelfuse.demo.choice import NestedChoice, choose_by_nested_cv
from modelfuse.demo.data import Splits, apply_task, task_seed
from modelfuse.demo.evaluate import Entry, Family, log_probabilities
from modelfuse.demo.settings import DemoSettings
from modelfuse.demo.zoo import Zoo, make_mlp, predict_logits

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
        The task model with the best pooled validation accuracy.
    y_test : array
        Pooled test labels.
    task_arithmetic : NestedChoice
    experts : dict
        Task to the name of the model fine-tuned on it.
    """

    tasks: tuple[str, ...]
    entries: list[Entry]
    per_task: dict[str, dict[str, float]]
    reference: str
    y_test: np.ndarray
    task_arithmetic: NestedChoice
    experts: dict[str, str]


def multitask_study(
    zoo: Zoo,
    splits: Splits,
    settings: DemoSettings,
    seed: int,
    *,
    tick: Callable[[str], None] | None = None,
) -> MultiTaskStudy:
    """Merge the task models every way and score each candidate per task; see the module docstring."""
    import modelfuse
    from modelfuse.ensemble import soft_vote
    from modelfuse.search import accuracy_score, grid_search
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

    def add(name: str, family: Family, cost: int, details: str, sd: StateDict) -> None:
        val = log_probabilities(predict_logits(model, sd, pooled_val))
        test = log_probabilities(predict_logits(model, sd, pooled_test))
        entries.append(Entry(name, family, cost, details, val, test))

    for task, f in zip(tasks, task_models):
        add(f.name, "individual", 1, f"fine-tuned on {task} digits", f.state_dict)
    individual_val = [float(np.mean(e.val.argmax(1) == y_val)) for e in entries]
    reference = entries[int(np.argmax(individual_val))].name
    add("pre-trained", "individual", 1, "pre-trained on original digits only", base)
    add(
        "average",
        "merge",
        1,
        f"uniform average of the {n_tasks} task models",
        modelfuse.merge_state_dicts("linear", sds),
    )

    lambdas = tuple(settings.lambdas)
    ta_models = [
        modelfuse.merge_state_dicts("task_arithmetic", sds, base, lambda_=lam, normalize=True)
        for lam in lambdas
    ]
    correct = np.stack(
        [predict_logits(model, sd, pooled_val).argmax(1) == y_val for sd in ta_models]
    )
    choice = choose_by_nested_cv(
        [{"lambda": lam} for lam in lambdas],
        correct,
        y_val,
        outer_splits=settings.outer_splits,
        inner_splits=settings.inner_splits,
        seed=seed,
    )
    nested = choice.nested
    add(
        "task arithmetic",
        "merge",
        1,
        f"lambda {choice.chosen['lambda']:g} x mean task vector, chosen by CV on validation; "
        f"nested-CV estimate {nested.statistic:.3f} [{nested.ci[0]:.3f}, {nested.ci[1]:.3f}]",
        ta_models[choice.index],
    )
    step("multi-task: task arithmetic")

    space = {"density": list(settings.densities), "lambda": list(lambdas)}
    ties = grid_search("ties", sds, base, space, val_accuracy)
    add(
        "TIES",
        "merge",
        1,
        f"density {ties.parameters['density']:g}, lambda {ties.parameters['lambda']:g} "
        "(grid on validation)",
        ties.state_dict,
    )
    dare = grid_search(
        "dare_ties",
        sds,
        base,
        space,
        val_accuracy,
        parameters={"normalize": True, "random_seed": seed},
    )
    add(
        "DARE",
        "merge",
        1,
        f"DARE-TIES, density {dare.parameters['density']:g}, lambda "
        f"{dare.parameters['lambda']:g} (grid on validation)",
        dare.state_dict,
    )
    step("multi-task: TIES and DARE")

    fishers, grams = [], []
    for j, (task, f) in enumerate(zip(tasks, task_models)):
        net = make_mlp(settings.hidden)
        net.load_state_dict(f.state_dict)
        x_train = apply_task(task, splits.x_train, task_seed(seed, j, "train"))
        batches = [
            (torch.as_tensor(x_train[i : i + 128]), torch.as_tensor(splits.y_train[i : i + 128]))
            for i in range(0, len(x_train), 128)
        ]
        fishers.append(
            dict(fisher_diagonal(net, batches, n_examples=settings.fisher_examples, kind="exact"))
        )
        grams.append(dict(gram_matrices(net, batches, n_examples=settings.gram_examples)))
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
    vote_val = np.log(soft_vote(np.stack([e.val for e in entries[:k]]), kind="logits"))
    vote_test = np.log(soft_vote(np.stack([e.test for e in entries[:k]]), kind="logits"))
    entries.append(
        Entry(
            "soft vote",
            "ensemble",
            k,
            f"mean probabilities of the {k} task models",
            vote_val,
            vote_test,
        )
    )
    n = len(splits.y_test)
    per_task = {
        e.name: {
            t: float(np.mean(e.test[j * n : (j + 1) * n].argmax(1) == splits.y_test))
            for j, t in enumerate(tasks)
        }
        for e in entries
    }
    step("multi-task: ensemble")
    experts = {t: f.name for t, f in zip(tasks, task_models)}
    return MultiTaskStudy(tasks, entries, per_task, reference, y_test, choice, experts)
