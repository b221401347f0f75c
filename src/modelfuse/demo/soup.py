"""The soup scenario: K fine-tunes of one pre-trained model on the same digits, fused every way.

Weight space: uniform soup (through the file engine, ``modelfuse.merge`` on a
YAML configuration), greedy soup, Fisher-weighted averaging (Fisher
diagonals saved as statistics files and merged by the file engine), RegMean,
task arithmetic with lambda chosen by nested cross-validation, TIES, DARE,
Model Stock, the WiSE-FT sweep, DaWin (a per-sample interpolation between
the pre-trained model and the reference), AdaMerging (coefficients learned
on the unlabeled validation images) and gradient matching (Fisher-weighted
task vectors with the pre-trained model's Fisher as the prior, or a scalar
prior precision when that does better on validation). Prediction space:
soft voting and Caruana's ensemble selection. Back to one network: the soft
vote distilled into one MLP started from the best merge
(:mod:`modelfuse.demo.distilled`). Then temperature scaling of the best
merge and of the best ensemble. Every choice uses the validation
split; every candidate is scored on the test split and on a shifted test
split (the test images tilted, :func:`modelfuse.demo.data.shifted`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from modelfuse.demo.choice import (
    NestedChoice,
    choose_task_arithmetic,
    describe_grid,
    describe_nested,
    search_ties_and_dare,
)
from modelfuse.demo.data import Splits, shifted
from modelfuse.demo.distilled import (
    DistilledSummary,
    best_merge,
    distil_ensemble,
    soft_vote_log_probabilities,
)
from modelfuse.demo.evaluate import (
    Entry,
    Family,
    accuracy_of,
    log_probabilities,
    model_entry,
    same_predictions,
    vote_entry,
)
from modelfuse.demo.settings import DemoSettings
from modelfuse.demo.zoo import Zoo, batches, load_mlp, predict_logits, read_checkpoint

__all__ = ["DaWinSummary", "SoupStudy", "config_reference", "run_file_merge", "soup_study"]

REFERENCE_RULE = (
    "the fine-tune with the highest validation accuracy, ties broken by the lower validation "
    "NLL, then by name order"
)
"""How the soup scenario's reference is chosen (stated in the report)."""

PRIOR_SCALES = (0.0, 0.1, 1.0, 10.0)
"""Gradient matching's prior precisions tried, in units of the mean Fisher entry."""


@dataclass(frozen=True)
class DaWinSummary:
    """DaWin's per-sample coefficients (0: the pre-trained model, 1: the fine-tune).

    Attributes
    ----------
    lambdas : dict
        ``"val"``, ``"test"`` and ``"shift"`` to the coefficient of every sample.
    endpoint : str
        The fine-tune interpolated with the pre-trained model.
    """

    lambdas: dict[str, np.ndarray]
    endpoint: str


StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SoupStudy:
    """Everything the soup scenario produced.

    Attributes
    ----------
    entries : list of Entry
        Every candidate, individuals first.
    reference : str
        The best individual fine-tune by validation accuracy.
    reference_rule : str
        How ``reference`` was chosen.
    greedy_trace : list of (label, validation accuracy, status)
        Each model alone (status ``"alone"``, in input order), then each soup
        tried (``"accepted"`` or ``"rejected"``), in the order tried.
    greedy_ingredients : tuple of str
    wise_curve : list of (alpha, validation, test, shifted test accuracy)
    wise_alpha : float
        Chosen on the validation split.
    wise_endpoint : str
        The fine-tune interpolated with the pre-trained model.
    task_arithmetic : NestedChoice
    lambdas : tuple of float
    caruana_weights : dict
        Member name to weight.
    calibration : list of (name, calibrated name, temperature)
    configs : list of Path
        YAML configurations merged through the file engine.
    dawin : DaWinSummary
    adamerging_lambdas : tuple of float
        AdaMerging's mean coefficient of each fine-tune (over its layers).
    prior_scale : float or None
        Gradient matching's chosen scalar prior precision, in units of the mean Fisher
        entry; None when the pre-trained model's Fisher (the paper's estimator) was chosen.
    distilled : DistilledSummary
        How the distilled ensemble was made.
    """

    entries: list[Entry]
    reference: str
    reference_rule: str
    greedy_trace: list[tuple[str, float, str]]
    greedy_ingredients: tuple[str, ...]
    wise_curve: list[tuple[float, float, float, float]]
    wise_alpha: float
    wise_endpoint: str
    task_arithmetic: NestedChoice
    lambdas: tuple[float, ...]
    caruana_weights: dict[str, float]
    calibration: list[tuple[str, str, float]]
    configs: list[Path]
    dawin: DaWinSummary
    adamerging_lambdas: tuple[float, ...]
    prior_scale: float | None
    distilled: DistilledSummary


def config_reference(path: Path, folder: Path) -> str:
    """How a configuration in ``folder/configs`` names ``path``: relative to that folder,
    so that the output folder can be moved, unless the same relative path also exists
    from the working folder (the engine would take that one), then absolute."""
    relative = os.path.relpath(path, folder / "configs")
    return str(path.resolve()) if Path(relative).exists() else relative


def run_file_merge(config: dict[str, Any], name: str, folder: Path) -> tuple[StateDict, Path]:
    """Write ``config`` as ``folder/configs/NAME.yaml``, merge it with ``modelfuse.merge``
    into ``folder/merges/NAME`` and read the merged weights back."""
    import modelfuse

    path = folder / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = modelfuse.merge(path, folder / "merges" / name, overwrite=True, threads=1)
    return read_checkpoint(result.out), path


def soup_study(
    zoo: Zoo,
    splits: Splits,
    settings: DemoSettings,
    folder: Path,
    seed: int,
    *,
    tick: Callable[[str], None] | None = None,
) -> SoupStudy:
    """Fuse the soup scenario's fine-tunes with every family; see the module docstring.

    ``tick(step)`` is called after each step (for progress). Files (YAML
    configurations, merged models, statistics) go under ``folder``.
    """
    import modelfuse
    from modelfuse.calibration import TemperatureScaling
    from modelfuse.ensemble import caruana_selection
    from modelfuse.evaluation import choose_reference
    from modelfuse.search import DaWinClassifier, accuracy_score, greedy_soup, wise_ft_sweep
    from modelfuse.search.adamerging import adamerging
    from modelfuse.statistics import fisher_diagonal, gram_matrices
    from modelfuse.statistics import save as save_statistics

    step = tick or (lambda name: None)
    model = zoo.model
    fine_tunes = list(zoo.soup)
    names = [f.name for f in fine_tunes]
    sds = [f.state_dict for f in fine_tunes]
    base = zoo.pretrained.state_dict
    k = len(sds)
    x_val, y_val = splits.x_val, splits.y_val
    x_shift = splits.x_shift if splits.x_shift is not None else shifted(splits.x_test, seed)
    val_batches = [(torch.as_tensor(x_val), torch.as_tensor(y_val))]
    val_accuracy = accuracy_score(model, val_batches)
    train_batches = batches(splits.x_train, splits.y_train)

    entries: list[Entry] = []
    merged_weights: dict[str, StateDict] = {}  # every one-network merge's weights

    def add(name: str, family: Family, cost: int, details: str, sd: StateDict) -> None:
        entries.append(
            model_entry(name, family, cost, details, model, sd, x_val, splits.x_test, x_shift)
        )
        if family == "merge":
            merged_weights[name] = sd

    # individuals
    for f in fine_tunes:
        hp = f.settings
        add(
            f.name,
            "individual",
            1,
            f"lr {hp['lr']:g}, weight decay {hp['weight_decay']:g}, "
            f"augmentation {hp['augment']}, seed {hp['seed']}",
            f.state_dict,
        )
    reference = choose_reference(
        {e.name: accuracy_of(e.val, y_val) for e in entries},
        tie_breaker={e.name: _nll(e.val, y_val) for e in entries},
    )
    add("pre-trained", "individual", 1, "the starting point of every fine-tune", base)
    step("individual models")

    # uniform soup through the file engine
    configs: list[Path] = []
    soup_config = {
        "merge_method": "linear",
        "models": [
            {"model": config_reference(f.path, folder), "parameters": {"weight": 1.0}}
            for f in fine_tunes
        ],
        "dtype": "float32",
    }
    soup_sd, path = run_file_merge(soup_config, "uniform-soup", folder)
    configs.append(path)
    add(
        "uniform soup",
        "merge",
        1,
        f"average of all {k} fine-tunes (modelfuse.merge, {path.name})",
        soup_sd,
    )
    step("uniform soup")

    # greedy soup
    greedy = greedy_soup(sds, val_accuracy)
    trace: list[tuple[str, float, str]] = []
    for candidate in greedy.trace:
        p = candidate.parameters
        if "model" in p:
            trace.append((names[int(p["model"])], float(candidate.score), "alone"))
        else:
            label = "+ " + names[int(p["ingredients"][-1])]
            status = "accepted" if p["accepted"] else "rejected"
            trace.append((label, float(candidate.score), status))
    ingredients = tuple(names[int(i)] for i in greedy.parameters["ingredients"])
    add(
        "greedy soup",
        "merge",
        1,
        f"{len(ingredients)} of {k} fine-tunes kept by validation accuracy: {', '.join(ingredients)}",
        greedy.state_dict,
    )
    step("greedy soup")

    # Fisher: diagonals saved as statistics files, merged by the file engine
    fisher_models = []
    fishers = []
    (folder / "statistics").mkdir(parents=True, exist_ok=True)
    for f in fine_tunes:
        net = load_mlp(settings.hidden, f.state_dict)
        stats = fisher_diagonal(
            net, train_batches, n_examples=settings.fisher_examples, kind="exact"
        )
        fishers.append(dict(stats))
        n_fisher = stats.n_examples
        stats_path = save_statistics(stats, folder / "statistics" / f"{f.name}.fisher.safetensors")
        fisher_models.append(
            {
                "model": config_reference(f.path, folder),
                "statistics": config_reference(stats_path, folder),
            }
        )
    fisher_sd, path = run_file_merge(
        {"merge_method": "fisher", "models": fisher_models, "dtype": "float32"}, "fisher", folder
    )
    configs.append(path)
    add(
        "Fisher merge",
        "merge",
        1,
        f"exact diagonal Fisher of each fine-tune on {n_fisher} training images "
        f"(modelfuse.merge, {path.name})",
        fisher_sd,
    )
    step("Fisher merge")

    # RegMean
    grams = []
    for f in fine_tunes:
        net = load_mlp(settings.hidden, f.state_dict)
        stats = gram_matrices(net, train_batches, n_examples=settings.gram_examples)
        n_gram = stats.n_examples
        grams.append(dict(stats))
    regmean_sd = modelfuse.merge_state_dicts("regmean", sds, grams=grams, alpha=0.1)
    add(
        "RegMean",
        "merge",
        1,
        f"Gram matrices of each linear layer's inputs on {n_gram} training images, alpha 0.1",
        regmean_sd,
    )
    step("RegMean")

    # task arithmetic: lambda by nested cross-validation on the validation split
    choice, ta_merge = choose_task_arithmetic(model, sds, base, x_val, y_val, settings, seed)
    add(
        "task arithmetic",
        "merge",
        1,
        f"base + lambda x mean task vector, lambda {choice.chosen['lambda']:g} chosen by CV on "
        f"validation; {describe_nested(choice)}",
        ta_merge,
    )
    step("task arithmetic")

    # TIES and DARE: density and lambda on the validation split
    ties, dare = search_ties_and_dare(sds, base, settings, val_accuracy, seed)
    add("TIES", "merge", 1, describe_grid(ties), ties.state_dict)
    add(
        "DARE",
        "merge",
        1,
        f"DARE-TIES, {describe_grid(dare)}, drop seed {seed}",
        dare.state_dict,
    )
    step("TIES and DARE")

    # Model Stock
    stock = modelfuse.merge_state_dicts("model_stock", sds, base)
    add("Model Stock", "merge", 1, "per tensor, mean pairwise cosine of task vectors", stock)
    step("Model Stock")

    # WiSE-FT: the pre-trained model interpolated with the best fine-tune
    endpoint = sds[names.index(reference)]
    wise = wise_ft_sweep(base, endpoint, val_accuracy, alphas=settings.wise_alphas)
    curve = []
    for candidate in wise.trace:
        alpha = float(candidate.parameters["alpha"])
        sd = modelfuse.merge_state_dicts("linear", [base, endpoint], weights=[1 - alpha, alpha])
        test_acc, shift_acc = (
            accuracy_of(predict_logits(model, sd, x), splits.y_test)
            for x in (splits.x_test, x_shift)
        )
        curve.append((alpha, float(candidate.score), test_acc, shift_acc))
    wise_alpha = float(wise.parameters["alpha"])
    add(
        "WiSE-FT",
        "merge",
        1,
        f"(1 - alpha) pre-trained + alpha {reference}, alpha {wise_alpha:.2g} "
        "(sweep on validation)",
        wise.state_dict,
    )
    step("WiSE-FT sweep")

    # DaWin: each input gets its own interpolation, from the two endpoints' entropies
    dawin = DaWinClassifier(model, base, endpoint, mode="sample").fit()
    inputs = {"val": x_val, "test": splits.x_test, "shift": x_shift}
    logits = {
        k: dawin.decision_function(torch.as_tensor(x)).double().numpy() for k, x in inputs.items()
    }
    lambdas = {k: dawin.lambdas(torch.as_tensor(x)).numpy() for k, x in inputs.items()}
    entries.append(
        Entry(
            "DaWin",
            "merge",
            3,
            f"per input, lambda(x) pre-trained -> {reference} from the two models' prediction "
            f"entropies (training-free; mean lambda {lambdas['test'].mean():.2f} on test, "
            f"{lambdas['shift'].mean():.2f} shifted); runs both endpoints, then each input's "
            "interpolated model: 3 networks per prediction",
            *(log_probabilities(logits[k]) for k in ("val", "test", "shift")),
        )
    )
    step("DaWin")

    # AdaMerging: layer-wise coefficients by entropy minimisation on unlabeled validation images
    ada = adamerging(
        model,
        base,
        sds,
        [torch.as_tensor(x_val)],
        granularity="layer",
        init_lambda=1.0 / k,
        steps=settings.adamerging_steps,
        lr=0.01,
        bounds=(0.0, 1.0),
    )
    per_layer = ada.parameters["lambdas"]
    ada_lambdas = tuple(
        float(np.mean([layer[i] for layer in per_layer.values()])) for i in range(k)
    )
    add(
        "AdaMerging",
        "merge",
        1,
        f"layer-wise task-vector coefficients from 1/{k}, {settings.adamerging_steps} Adam steps "
        "minimising the merge's prediction entropy on the validation images (labels unused); "
        "mean coefficient per fine-tune "
        + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, ada_lambdas)),
        ada.state_dict,
    )
    step("AdaMerging")

    # gradient matching: the paper's estimator, with the pre-trained model's Fisher H0 (on its
    # pre-training images) and the dataset sizes; the scalar prior precision is the fallback
    pre = splits.pretrain
    base_stats = fisher_diagonal(
        load_mlp(settings.hidden, base),
        batches(splits.x_train[pre], splits.y_train[pre]),
        n_examples=settings.fisher_examples,
        kind="exact",
    )
    n_base, n_train = len(pre), len(splits.y_train)
    mean_fisher = float(np.mean([float(t.double().mean()) for f in fishers for t in f.values()]))
    tried = []
    for scale in (None, *PRIOR_SCALES):  # None: the pre-trained model's Fisher
        if scale is None:
            sd = modelfuse.merge_state_dicts(
                "gradient_matching",
                sds,
                base,
                fishers=fishers,
                base_fisher=dict(base_stats),
                model_parameters=[{"dataset_size": n_train}] * k,
                base_dataset_size=n_base,
            )
        else:
            sd = modelfuse.merge_state_dicts(
                "gradient_matching",
                sds,
                base,
                fishers=fishers,
                prior_precision=scale * mean_fisher,
            )
        val_lp = log_probabilities(predict_logits(model, sd, x_val))
        tried.append((accuracy_of(val_lp, y_val), -_nll(val_lp, y_val), scale, sd))
    best_gm = max(tried, key=lambda t: t[:2])  # the first of equals: the base Fisher first
    prior_scale = best_gm[2]
    scalars = ", ".join(f"{x:g}" for x in PRIOR_SCALES)
    if prior_scale is None:
        how = (
            f"the paper's estimator: precision H0 = {n_base} x the pre-trained model's exact "
            f"diagonal Fisher on its {base_stats.n_examples} pre-training images, each "
            f"fine-tune's H_t = {n_train} x its Fisher (the Fisher merge's); chosen by "
            "validation accuracy (then NLL) over the scalar prior precisions "
            f"{scalars} x the mean Fisher entry"
        )
    else:
        how = (
            f"task vectors weighted by each fine-tune's Fisher (the Fisher merge's), scalar prior "
            f"precision {prior_scale:g} x the mean Fisher entry, chosen by validation accuracy "
            f"(then NLL) among {scalars} and the paper's estimator with the pre-trained model's "
            "Fisher (the fallback: the scalar prior did better on validation)"
            + (
                "; with prior 0 it is Fisher-weighted averaging, the Fisher merge up to the floor "
                "of the Fisher entries"
                if prior_scale == 0
                else ""
            )
        )
    add("gradient matching", "merge", 1, how, best_gm[3])
    step("gradient matching")

    # ensembles
    members = entries[:k]
    entries.append(vote_entry("soft vote", members, k, f"mean probabilities of all {k} fine-tunes"))
    selection = caruana_selection(
        np.stack([e.val for e in members]),
        y_val,
        kind="logits",
        n_rounds=settings.caruana_rounds,
        random_state=seed,
    )
    weights = np.asarray(selection.weights, dtype=np.float64)
    used = int(np.count_nonzero(weights))
    caruana_weights = {n: float(w) for n, w in zip(names, weights) if w > 0}
    entries.append(
        vote_entry(
            "Caruana ensemble",
            members,
            used,
            f"{used} of {k} fine-tunes, weights by validation NLL: "
            + ", ".join(f"{n} {w:.2f}" for n, w in caruana_weights.items()),
            weights=weights,
        )
    )
    step("ensembles")

    individuals = [e for e in entries if e.family == "individual"]

    def copy_of_individual(entry: Entry) -> bool:
        return any(
            same_predictions(entry.val, i.val) and same_predictions(entry.test, i.test)
            for i in individuals
        )

    # the soft vote distilled into one network, started from the best merge
    vote = next(e for e in entries if e.name == "soft vote")
    starts = {
        e.name: merged_weights[e.name]
        for e in entries
        if e.name in merged_weights and not copy_of_individual(e)
    } or merged_weights
    start = best_merge(entries, starts, y_val)
    distilled, distilled_summary, _ = distil_ensemble(
        name="distilled ensemble",
        hidden=settings.hidden,
        teacher=vote,
        teacher_train=soft_vote_log_probabilities(
            [predict_logits(model, sd, splits.x_train) for sd in sds]
        ),
        start=start,
        start_weights=starts[start],
        x_train=splits.x_train,
        y_train=splits.y_train,
        x_val=x_val,
        x_test=splits.x_test,
        x_shift=x_shift,
        max_epochs=settings.distill_epochs,
        seed=seed,
        folder=folder / "distilled" / "soup",
    )
    entries.append(distilled)
    step("distilled ensemble")

    # temperature scaling of the best merge and the best ensemble (by validation NLL)

    def best(family: Family) -> Entry | None:
        pool = [e for e in entries if e.family == family and not copy_of_individual(e)]
        return min(pool, key=lambda e: _nll(e.val, y_val)) if pool else None

    calibration = []
    for entry in (best("merge"), best("ensemble")):
        if entry is None:  # every candidate of the family is a copy of a fine-tune
            continue
        scaler = TemperatureScaling(kind="logits").fit(entry.val, y_val)
        val, test, shift = (
            np.log(np.clip(scaler.predict_proba(x), 1e-300, None))
            for x in (entry.val, entry.test, entry.shift)
        )
        temperature = float(scaler.temperature_)
        name = f"{entry.name} + temperature"
        entries.append(
            Entry(
                name,
                "calibrated",
                entry.cost,
                f"temperature {temperature:.3g} fitted on validation",
                val,
                test,
                shift,
            )
        )
        calibration.append((entry.name, name, temperature))
    step("calibration")
    return SoupStudy(
        entries=entries,
        reference=reference,
        reference_rule=REFERENCE_RULE,
        greedy_trace=trace,
        greedy_ingredients=ingredients,
        wise_curve=curve,
        wise_alpha=wise_alpha,
        wise_endpoint=reference,
        task_arithmetic=choice,
        lambdas=tuple(settings.lambdas),
        caruana_weights=caruana_weights,
        calibration=calibration,
        configs=configs,
        dawin=DaWinSummary(lambdas, reference),
        adamerging_lambdas=ada_lambdas,
        prior_scale=prior_scale,
        distilled=distilled_summary,
    )


def _nll(log_probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under (normalised) log-probabilities."""
    lp = log_probabilities(log_probs)
    return float(-np.mean(lp[np.arange(len(y)), y]))
