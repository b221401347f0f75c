"""``run_demo``: the whole study, stage by stage, with progress, timings and an atomic output folder."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelfuse.demo.evaluate import MetricRow
from modelfuse.demo.output_folder import check_demo_target, install_folder
from modelfuse.demo.seeds import SeedResult
from modelfuse.errors import ConfigError

__all__ = ["DemoResult", "run_demo"]

_MARKER = "results.json"


@dataclass(frozen=True)
class DemoResult:
    """What a demo run produced.

    Attributes
    ----------
    out : Path
        The output folder.
    report, html : Path
        ``report.md`` and the self-contained ``report.html``.
    timings : dict
        Seconds per stage.
    soup_rows, multitask_rows : list of MetricRow
        The test-split comparisons of both scenarios (one row per distinct model).
    soup_reference, multitask_reference : str
        The best individual model of each scenario (by validation accuracy).
    headlines : tuple of str
    federated : FederatedStudy or None
        The federated scenario (None when Flower's simulation engine is not installed).
    soup_shift_rows : list of MetricRow
        The soup scenario's comparison on the shifted test split.
    seeds : tuple of SeedResult
        The soup scenario's comparisons on every seed (the first is ``soup_rows``'s).
    """

    out: Path
    report: Path
    html: Path
    timings: dict[str, float]
    soup_rows: list[MetricRow]
    multitask_rows: list[MetricRow]
    soup_reference: str
    multitask_reference: str
    headlines: tuple[str, ...]
    federated: Any = None
    soup_shift_rows: list[MetricRow] = field(default_factory=list)
    seeds: tuple[Any, ...] = ()


def _flower_installed() -> bool:
    """Flower and Ray (its simulation engine's backend) can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("flwr", "ray"))


def _check_target(target: Path) -> None:
    check_demo_target(target, _MARKER, "modelfuse demo")


@contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    from modelfuse.distill.running import torch_threads

    # one thread: bit-for-bit repeatable training and merges
    with torch_threads(1), torch.random.fork_rng(devices=[]):
        yield


class _Stages:
    """Runs named stages, times them and shows a progress bar per stage."""

    def __init__(self, console: Any, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self.caught: list[Any] = []  # the warnings recorded so far (set by run_demo)
        self.notes: dict[str, None] = {}  # "stage: Category: message", in order, once each

    @contextmanager
    def stage(self, title: str, steps: int) -> Iterator[Callable[[str], None]]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        start = time.perf_counter()
        start_warnings = len(self.caught)
        if not (self.enabled and self.console.is_terminal):  # no bars in pipes and files
            yield lambda step: None
        else:
            progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("[dim]{task.fields[step]}"),
                console=self.console,
                transient=True,
            )
            with progress:
                task = progress.add_task(title, total=steps, step="")

                def tick(step: str) -> None:
                    progress.update(task, advance=1, step=step)

                yield tick
        seconds = time.perf_counter() - start
        self.timings[title] = seconds
        for w in self.caught[start_warnings:]:
            self.notes.setdefault(f"{title}: {w.category.__name__}: {w.message}")
        if self.enabled:
            self.console.print(f"[green]done[/green] {title} [dim]({seconds:.1f} s)[/dim]")


SOUP_STEPS = 15
"""Progress steps of :func:`modelfuse.demo.soup.soup_study`."""

MAX_SEEDS = 10
"""The most seeds one run takes (each repeats the soup scenario)."""


def check_seeds(seeds: Sequence[int], *, flag: str = "seeds") -> tuple[int, ...]:
    """The seeds as a tuple, refused when empty, too many, repeated or out of range.

    ``flag`` names the setting in messages (``--seeds`` on the command line).

    Examples
    --------
    >>> check_seeds([0, 1, 2])
    (0, 1, 2)
    """
    values = tuple(seeds)
    if not values:
        raise ConfigError(f"{flag}: expected at least one seed, got none; pass e.g. 0,1,2")
    if len(values) > MAX_SEEDS:
        raise ConfigError(
            f"{flag}: {len(values)} seeds; at most {MAX_SEEDS} (each repeats the soup scenario)"
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{flag}: expected integers, got {repr(value)[:60]}")
        if not 0 <= value <= 2**32 - 1:
            raise ConfigError(f"{flag}: {value} is out of range; expected 0 to {2**32 - 1}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(
            f"{flag}: seed {repeated[0]} is given twice; give each seed once, e.g. 0,1,2"
        )
    return tuple(int(v) for v in values)


def _soup(
    zoo: Any, splits: Any, settings: Any, folder: Path, seed: int, tick: Callable[[str], None]
) -> tuple[Any, list[Any], dict[str, str]]:
    """The soup study and its entries with identical models merged into one row."""
    from modelfuse.demo.evaluate import merge_duplicates
    from modelfuse.demo.soup import soup_study

    soup = soup_study(zoo, splits, settings, folder, seed, tick=tick)
    entries, renamed = merge_duplicates(soup.entries)
    return soup, entries, renamed


def _soup_comparisons(
    entries: Sequence[Any], splits: Any, reference: str, settings: Any, seed: int
) -> dict[str, Any]:
    from modelfuse.demo.evaluate import compare_split

    return {
        split: compare_split(
            entries,
            splits.y_test,
            reference,
            split=split,
            n_resamples=settings.n_resamples,
            interval=settings.interval,
            seed=seed + offset,
        )
        for split, offset in (("test", 0), ("shift", 10))
    }


def _rows(comparisons: dict[str, Any]) -> dict[str, list[MetricRow]]:
    return {split: list(c.rows) for split, c in comparisons.items()}


def _soup_on_seed(settings: Any, folder: Path, seed: int, tick: Callable[[str], None]) -> Any:
    """The soup scenario on another seed, its files in a folder removed afterwards."""
    from modelfuse.demo.data import load_splits
    from modelfuse.demo.seeds import SeedResult
    from modelfuse.demo.zoo import build_zoo

    scratch = folder / f".seed-{seed}"
    scratch.mkdir()
    try:
        splits = load_splits(seed)
        zoo = build_zoo(splits, settings, scratch / "models", seed, soup_only=True)
        tick("model zoo")
        soup, entries, renamed = _soup(zoo, splits, settings, scratch, seed, tick)
        reference = renamed[soup.reference]
        comparisons = _soup_comparisons(entries, splits, reference, settings, seed)
        tick("comparisons")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return SeedResult(seed, reference, _rows(comparisons), renamed)


def run_demo(
    out: str | os.PathLike[str] = "modelfuse-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    console: Any = None,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
) -> DemoResult:
    """Run the end-to-end fusion study on scikit-learn's digits and write its report.

    Stages: split the data; train the model zoo (a pre-trained MLP, K
    fine-tunes for the soup scenario, one model per task for the multi-task
    scenario) and save it as safetensors folders; fuse the soup scenario with
    every family (weight space, prediction space, calibration); fuse the
    multi-task scenario; compare everything on the test split; run the
    federated scenario (:mod:`modelfuse.demo.federated`: digits over 10
    Dirichlet non-IID clients, FedAvg, FedAvgM, FedAU, TIES and Fisher in
    Flower's simulation engine, local / global / interpolated / FedLabel per
    client); write the report. The output folder is built beside ``out`` and moved into place
    only when complete; an earlier demo output at ``out`` is then replaced.

    Parameters
    ----------
    out : path
        The output folder (``report.md``, ``report.html``, ``results.json``,
        figures, ``models/``, ``configs/``, ``merges/``, ``statistics/``).
    quick : bool
        A smaller run (fewer models, epochs and bootstrap resamples).
    seed : int
        Fixes the splits, the training, the searches and the bootstrap:
        equal seeds give equal results.
    seeds : sequence of int, optional
        Run the study on each seed (``seed`` is then ignored): the first
        seed's study is reported in full, and the soup scenario is repeated
        on the others (data, zoo, fusions, comparisons on both test splits)
        for a table of each method's mean and spread across seeds.
    console : rich.console.Console, optional
        Where progress and the final summary go (default: standard output).
    progress : bool
        Show progress and the summary; ``False`` runs silently.

    Returns
    -------
    DemoResult

    Raises
    ------
    OutputError
        ``out`` exists and is not an earlier demo's output.
    ConfigError
        ``seeds`` is empty, repeats a seed or holds a negative one.

    References
    ----------
    Wortsman et al., "Model soups", ICML 2022; Ilharco et al., "Editing models
    with task arithmetic", ICLR 2023; Yadav et al., "TIES-Merging", NeurIPS
    2023; Yu et al., "Language models are Super Mario" (DARE), ICML 2024;
    Matena and Raffel, "Merging models with Fisher-weighted averaging",
    NeurIPS 2022; Jin et al., "Dataless knowledge fusion by merging weights
    of language models" (RegMean), ICLR 2023; Jang et al., "Model Stock",
    ECCV 2024; Wortsman et al., "Robust fine-tuning of zero-shot models"
    (WiSE-FT), CVPR 2022; Caruana et al., "Ensemble selection from libraries
    of models", ICML 2004; Guo et al., "On calibration of modern neural
    networks", ICML 2017; McMahan et al., "Communication-efficient learning
    of deep networks from decentralized data" (FedAvg), AISTATS 2017; Hsu, Qi
    and Brown, arXiv:1909.06335 (FedAvgM, Dirichlet partitions); Wang and Ji,
    "A lightweight method for tackling unknown participation statistics in
    federated averaging" (FedAU), ICLR 2024; Cho et al., "Local or Global"
    (FedLabel), ICCV 2023.

    Examples
    --------
    >>> import tempfile, os
    >>> result = run_demo(os.path.join(tempfile.mkdtemp(), "demo"), quick=True,
    ...                   progress=False)  # doctest: +SKIP
    >>> result.report.name  # doctest: +SKIP
    'report.md'
    """
    from rich.console import Console

    from modelfuse.demo.data import load_splits
    from modelfuse.demo.evaluate import compare_split, merge_duplicates
    from modelfuse.demo.multitask import multitask_study
    from modelfuse.demo.report import write_demo_report
    from modelfuse.demo.settings import settings_for
    from modelfuse.demo.zoo import build_zoo

    seed_list = check_seeds(seeds if seeds is not None else (seed,))
    seed = seed_list[0]
    target = Path(out)
    _check_target(target)
    settings = settings_for(quick)
    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: wide enough for the summary table
            console = Console(width=110)
    stages = _Stages(console, progress)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    built = target.parent / f".{target.name}.building-{os.getpid()}"
    if built.exists():
        shutil.rmtree(built)
    built.mkdir()
    command = (
        f"modelfuse demo --out {target} "
        + (f"--seed {seed}" if len(seed_list) == 1 else "--seeds " + ",".join(map(str, seed_list)))
        + (" --quick" if quick else "")
    )
    if progress:
        which = f"seed {seed}" if len(seed_list) == 1 else f"seeds {', '.join(map(str, seed_list))}"
        console.print(f"[bold]modelfuse demo[/bold] ({settings.name}, {which}) -> {target}")
    try:
        with _one_thread(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stages.caught = caught
            with stages.stage("data", 1) as tick:
                splits = load_splits(seed)
                tick("digits split")
            n_models = 1 + settings.n_soup + len(settings.tasks)
            with stages.stage("model zoo", n_models) as tick:
                zoo = build_zoo(splits, settings, built / "models", seed, on_model=tick)
            with stages.stage("soup scenario: fusions", SOUP_STEPS) as tick:
                soup, soup_entries, renamed = _soup(zoo, splits, settings, built, seed, tick)
            with stages.stage("multi-task scenario: fusions", 4) as tick:
                multitask = multitask_study(zoo, splits, settings, seed, tick=tick, folder=built)
            with stages.stage("test-split comparisons", 3) as tick:
                soup_reference = renamed[soup.reference]
                soup_cmp = _soup_comparisons(soup_entries, splits, soup_reference, settings, seed)
                tick("soup scenario, both test splits")
                n_test = len(splits.y_test)
                mt_entries, mt_renamed = merge_duplicates(multitask.entries)
                multitask_reference = mt_renamed[multitask.reference]
                mt_cmp = compare_split(
                    mt_entries,
                    multitask.y_test,
                    multitask_reference,
                    metrics=("accuracy",),
                    n_resamples=settings.n_resamples,
                    interval=settings.interval,
                    seed=seed,
                    groups=np.tile(np.arange(n_test), len(multitask.tasks)),
                )
                tick("multi-task scenario")
            seed_results = [SeedResult(seed, soup_reference, _rows(soup_cmp), renamed)]
            for other in seed_list[1:]:
                with stages.stage(f"soup scenario, seed {other}", SOUP_STEPS + 2) as tick:
                    seed_results.append(_soup_on_seed(settings, built, other, tick))
            federated = None
            fed = settings.federated
            if _flower_installed():
                from modelfuse.demo.federated import federated_study

                steps = len(fed.concentrations) * (len(fed.aggregators) * fed.rounds + 1)
                with stages.stage("federated scenario (Flower simulation)", steps) as tick:
                    federated = federated_study(settings, seed, tick=tick)
            notes = list(stages.notes)
            with stages.stage("report", 1) as tick:
                report = write_demo_report(
                    built,
                    settings=settings,
                    seed=seed,
                    zoo=zoo,
                    soup=soup,
                    soup_rows=soup_cmp["test"].rows,
                    soup_shift=soup_cmp["shift"],
                    soup_test_notes=soup_cmp["test"].notes,
                    soup_reference=soup_reference,
                    multitask=multitask,
                    multitask_rows=mt_cmp.rows,
                    multitask_reference=multitask_reference,
                    multitask_notes=mt_cmp.notes,
                    seeds=tuple(seed_results),
                    y_val=splits.y_val,
                    y_test=splits.y_test,
                    n_samples={
                        "train": len(splits.y_train),
                        "val": len(splits.y_val),
                        "test": len(splits.y_test),
                    },
                    timings=dict(stages.timings),  # the stages before the report
                    notes=notes,
                    command=command,
                    federated=federated,
                )
                tick("report.md, report.html")
        install_folder(built, target)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        for folder in created:  # deepest first: the folders this run made for OUT
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    result = DemoResult(
        out=target,
        report=target / report.markdown.name,
        html=target / report.html.name,
        timings=dict(stages.timings),
        soup_rows=list(soup_cmp["test"].rows),
        multitask_rows=list(mt_cmp.rows),
        soup_reference=soup_reference,
        multitask_reference=multitask_reference,
        headlines=report.headlines,
        federated=federated,
        soup_shift_rows=list(soup_cmp["shift"].rows),
        seeds=tuple(seed_results),
    )
    if progress:
        from modelfuse.demo.summary import print_summary

        print_summary(console, result)
    return result
