"""Every merge of the text study: configurations written, run by the file engine, scored."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelfuse.demo.text.candidates import Candidate, TaskScorer
from modelfuse.demo.text.merging import (
    adamerging_lambdas,
    load_backbone,
    merge_config,
    relative,
    run_merge,
    write_config,
)
from modelfuse.demo.text.settings import TextSettings
from modelfuse.demo.text.tasks import TextTask

__all__ = ["run_merges"]


def run_merges(
    built: Path,
    tasks: Sequence[TextTask],
    task_models: Sequence[Any],
    tokenizer: Any,
    scorer: TaskScorer,
    settings: TextSettings,
    seed: int,
    say: Callable[[str], None],
) -> list[Candidate]:
    """Task arithmetic, TIES, DARE (scaling by validation), Fisher, RegMean, AdaMerging.

    Each merge's configuration goes to ``configs/NAME.yaml`` and its output
    (backbone, each task's head in ``heads/``) to ``merges/NAME/``. For the
    methods with a grid, every grid point is merged by the file engine and
    scored on the validation splits (mean accuracy over the tasks; the
    smaller scaling wins ties); the chosen point's configuration and merge
    are kept.
    """
    configs, merges = built / "configs", built / "merges"
    configs.mkdir()
    merges.mkdir()
    base = relative(built / "models" / "base", configs)
    models = [relative(built / "models" / t.name, configs) for t in tasks]
    out: list[Candidate] = []

    def scored(name: str, config: Mapping[str, Any], folder: Path, comment: str) -> tuple[
        Path, dict[str, dict[str, Any]]
    ]:
        path = write_config(config, configs / f"{folder.name}.yaml", comment)
        run_merge(path, folder, seed)
        return path, scorer.logits(load_backbone(folder))

    def keep(name: str, path: Path, folder: Path, logits: Any, details: str) -> Candidate:
        if folder != merges / name:
            os.replace(folder, merges / name)
            os.replace(path, configs / f"{name}.yaml")
        say(f"  {name}: mean validation accuracy {scorer.mean_accuracy(logits, 'val'):.3f}")
        return Candidate(name, "merge", details, logits,
                         config=relative(configs / f"{name}.yaml", built))

    def one(name: str, config: Mapping[str, Any], details: str, comment: str) -> Candidate:
        path, logits = scored(name, config, merges / name, comment)
        return keep(name, path, merges / name, logits, details)

    def grid(
        name: str, label: str, make: Callable[[float], dict[str, Any]], what: str
    ) -> Candidate:
        """Every lambda merged (configs/.NAME-i.yaml into merges/.NAME-i) and scored; the
        best on validation is kept as configs/NAME.yaml and merges/NAME, the others removed."""
        tried = []
        for i, value in enumerate(settings.lambdas):
            folder = merges / f".{name}-{i}"
            path, logits = scored(name, make(value), folder, "")
            tried.append((scorer.mean_accuracy(logits, "val"), value, path, folder, logits))
        scores = ", ".join(f"{value:g}: {accuracy:.3f}" for accuracy, value, *_ in tried)
        # the best validation accuracy; the first (smallest) lambda among equals
        best = max(tried, key=lambda item: item[0])
        for _, _, path, folder, _ in tried:
            if folder is not best[3]:
                shutil.rmtree(folder)
                path.unlink()
        _, value, path, folder, logits = best
        text = path.read_text(encoding="utf-8")
        comment = (f"{label}: lambda {value:g} chosen on the validation splits (mean accuracy "
                   f"per lambda: {scores})\nrerun from the output folder: modelfuse merge "
                   f"configs/{name}.yaml merges/{name} --overwrite")
        path.write_text("".join(f"# {line}\n" for line in comment.splitlines()) + text,
                        encoding="utf-8")
        details = f"{what}, lambda {value:g} chosen on validation (mean accuracy per lambda: {scores})"
        return keep(name, path, folder, logits, details)

    rerun = "rerun from the output folder: modelfuse merge configs/{0}.yaml merges/{0} --overwrite"
    out.append(
        grid(
            "task_arithmetic", "task arithmetic",
            lambda v: merge_config("task_arithmetic", base, models, parameters={"lambda": v}),
            "sum of the task vectors",
        )
    )
    out.append(
        grid(
            "ties", "TIES",
            lambda v: merge_config(
                "ties", base, models,
                model_parameters=[{"density": settings.ties_density}] * len(models),
                parameters={"lambda": v},
            ),
            f"TIES, density {settings.ties_density:g} (trim, elect sign, disjoint mean)",
        )
    )
    out.append(
        grid(
            "dare", "DARE",
            lambda v: merge_config(
                "dare_ties", base, models,
                model_parameters=[{"density": settings.dare_density}] * len(models),
                parameters={"lambda": v},
            ),
            f"DARE-TIES, density {settings.dare_density:g} (random drops, rescaled)",
        )
    )
    stats = relative(built / "statistics", built / "configs")
    out.append(
        one(
            "fisher",
            merge_config("fisher", base, models,
                         statistics=[f"{stats}/{t.name}.fisher.safetensors" for t in tasks]),
            f"Fisher-weighted average, each fine-tune's exact diagonal Fisher on "
            f"{settings.fisher_examples} of its training texts",
            "Fisher merging\n" + rerun.format("fisher"),
        )
    )
    out.append(
        one(
            "regmean",
            merge_config("regmean", base, models,
                         statistics=[f"{stats}/{t.name}.gram.safetensors" for t in tasks],
                         parameters={"alpha": 0.9}),
            f"RegMean, Gram matrices of each fine-tune on {settings.gram_examples} of its "
            "training texts, alpha 0.9",
            "RegMean\n" + rerun.format("regmean"),
        )
    )
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(
        str(built / "models" / "base"), local_files_only=True, attn_implementation="eager"
    )
    holder = _Holder(encoder)
    lambdas, _ = adamerging_lambdas(
        holder, task_models, tokenizer, [t.texts["val"] for t in tasks],
        steps=settings.adamerging_steps, max_length=settings.max_length, seed=seed,
    )
    values = [v for row in lambdas.values() for v in row]
    low, high = min(values), max(values)
    weights = [
        [{"filter": group, "value": round(values[i], 6)} for group, values in lambdas.items()]
        for i in range(len(tasks))
    ]
    out.append(
        one(
            "adamerging",
            merge_config("task_arithmetic", base, models,
                         model_parameters=[{"weight": w} for w in weights],
                         parameters={"lambda": 1.0}),
            f"layer-wise AdaMerging: {len(lambdas)} blocks x {len(tasks)} coefficients learned "
            f"in {settings.adamerging_steps} Adam steps minimising the prediction entropy on "
            f"unlabeled validation texts (each batch scored by its task's head), starting "
            f"from 0.3; learned coefficients from {low:.3f} to {high:.3f}",
            "layer-wise AdaMerging: task arithmetic with one learned coefficient per task and "
            "block\n" + rerun.format("adamerging"),
        )
    )
    return out


class _Holder:
    """Gives an encoder the ``.bert`` attribute AdaMerging's task wrapper reads."""

    def __init__(self, encoder: Any) -> None:
        self.bert = encoder
