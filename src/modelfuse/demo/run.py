"""``run_demo``: the whole study, stage by stage, with progress, timings and an atomic output folder."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfuse.demo.evaluate import MetricRow
from modelfuse.errors import OutputError

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
        The test-split comparisons of both scenarios.
    soup_reference, multitask_reference : str
        The best individual model of each scenario (by validation accuracy).
    headlines : tuple of str
    federated : FederatedStudy or None
        The federated scenario (None when Flower's simulation engine is not installed).
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


def _flower_installed() -> bool:
    """Flower and Ray (its simulation engine's backend) can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("flwr", "ray"))


def _check_target(target: Path) -> None:
    if not target.exists():
        return
    if target.is_dir() and (target / _MARKER).is_file() and (target / "report.md").is_file():
        return  # a previous demo's output: replaced once the new one is complete
    raise OutputError(
        f"{target}: exists and is not the output of an earlier `modelfuse demo`; "
        "choose another --out folder or remove it"
    )


def _install(built: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit repeatable training and merges
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


class _Stages:
    """Runs named stages, times them and shows a progress bar per stage."""

    def __init__(self, console: Any, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.timings: dict[str, float] = {}

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
        if self.enabled:
            self.console.print(f"[green]done[/green] {title} [dim]({seconds:.1f} s)[/dim]")


def run_demo(
    out: str | os.PathLike[str] = "modelfuse-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    console: Any = None,
    progress: bool = True,
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
    from modelfuse.demo.evaluate import compare_entries
    from modelfuse.demo.multitask import multitask_study
    from modelfuse.demo.report import write_demo_report
    from modelfuse.demo.settings import settings_for
    from modelfuse.demo.soup import soup_study
    from modelfuse.demo.zoo import build_zoo

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
    command = f"modelfuse demo --out {target} --seed {seed}" + (" --quick" if quick else "")
    if progress:
        console.print(f"[bold]modelfuse demo[/bold] ({settings.name}, seed {seed}) -> {target}")
    try:
        with _one_thread(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with stages.stage("data", 1) as tick:
                splits = load_splits(seed)
                tick("digits split")
            n_models = 1 + settings.n_soup + len(settings.tasks)
            with stages.stage("model zoo", n_models) as tick:
                zoo = build_zoo(splits, settings, built / "models", seed, on_model=tick)
            with stages.stage("soup scenario: fusions", 11) as tick:
                soup = soup_study(zoo, splits, settings, built, seed, tick=tick)
            with stages.stage("multi-task scenario: fusions", 4) as tick:
                multitask = multitask_study(zoo, splits, settings, seed, tick=tick)
            with stages.stage("test-split comparison", 2) as tick:
                soup_rows = compare_entries(
                    soup.entries,
                    splits.y_test,
                    soup.reference,
                    n_resamples=settings.n_resamples,
                    interval=settings.interval,
                    seed=seed,
                )
                tick("soup scenario")
                mt_rows = compare_entries(
                    multitask.entries,
                    multitask.y_test,
                    multitask.reference,
                    metrics=("accuracy",),
                    n_resamples=settings.n_resamples,
                    interval=settings.interval,
                    seed=seed,
                )
                tick("multi-task scenario")
            federated = None
            fed = settings.federated
            if _flower_installed():
                from modelfuse.demo.federated import federated_study

                steps = len(fed.concentrations) * (len(fed.aggregators) * fed.rounds + 1)
                with stages.stage("federated scenario (Flower simulation)", steps) as tick:
                    federated = federated_study(settings, seed, tick=tick)
            notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
            with stages.stage("report", 1) as tick:
                report = write_demo_report(
                    built,
                    settings=settings,
                    seed=seed,
                    zoo=zoo,
                    soup=soup,
                    soup_rows=soup_rows,
                    multitask=multitask,
                    multitask_rows=mt_rows,
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
        _install(built, target)
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
        soup_rows=list(soup_rows),
        multitask_rows=list(mt_rows),
        soup_reference=soup.reference,
        multitask_reference=multitask.reference,
        headlines=report.headlines,
        federated=federated,
    )
    if progress:
        from modelfuse.demo.summary import print_summary

        print_summary(console, result)
    return result
