"""Multi-stage merges: several named merges in one YAML file, run in dependency order.

The file holds several YAML documents separated by ``---``, each a merge
configuration with a ``name:`` key, as ``mergekit-multi`` reads them. A later
merge uses an earlier one's output by writing its name where a model path
goes::

    name: math-code
    merge_method: linear
    models: [./math, ./code]
    ---
    merge_method: slerp
    base_model: math-code
    models: [math-code, ./chat]
    parameters: {t: 0.5}

The rules:

- **The final merge** is the document without a name; when every document has
  a name, it is the last one. Two documents without a name, or a final merge
  that another stage uses, are refused.
- **References**: a model path (``base_model``, ``models[i].model``,
  ``slices[i].sources[j].model``, ``slices[i].base_model``) that equals a
  stage's name exactly is that stage's output; anything else is a path,
  looked up from the working directory and then beside the file. A name that
  is also an existing path is refused where it is used (write the path
  differently, e.g. ``./NAME``, or rename the stage), and so is a reference
  that is neither a name nor a path.
- **Order**: a stage runs after the stages it uses (file order otherwise); a
  cycle is refused naming it (``a -> b -> a``).
- **Intermediate outputs** go to ``intermediate_dir/NAME`` (kept) or to a
  temporary folder beside the output that is removed at the end, on failure
  and on interruption. Without ``intermediate_dir``, a stage the final merge
  does not use is refused (its output would be thrown away).

Every stage is checked before any work, as :func:`plan_merge` checks one
merge: a later stage is planned against the tensor names, shapes and dtypes
the earlier stage will write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from modelfuse.errors import ModelfuseError
from modelfuse.merge.engine import MergeResult, merge
from modelfuse.merge.multistage_config import is_multistage, stage_where
from modelfuse.merge.multistage_outputs import intermediate_folder, record_stages
from modelfuse.merge.multistage_plan import (
    PlannedStage,
    plan_multistage,
    prepare_stages,
    renamed,
    restated,
    stage_warnings,
)
from modelfuse.merge.multistage_references import bind

__all__ = [
    "MultistageResult",
    "PlannedStage",
    "is_multistage",
    "merge_multistage",
    "plan_multistage",
]

ProgressCallback = Callable[[int, int], None]
StageProgress = Callable[["PlannedStage"], AbstractContextManager[ProgressCallback | None]]


@dataclass(frozen=True)
class MultistageResult:
    """What a multi-stage merge did.

    Attributes
    ----------
    out : Path
        The final merge's output folder.
    stages : tuple of (PlannedStage, MergeResult)
        Every stage in the order it ran, the final one last.
    seconds : float
        Wall time of the whole run.
    """

    out: Path
    stages: tuple[tuple[PlannedStage, MergeResult], ...]
    seconds: float

    def summary(self) -> str:
        """One line per stage (where its output is), then the final merge's summary."""
        lines = []
        for stage, result in self.stages:
            if stage.final:
                continue
            kept = f"kept in {result.out}" if stage.out is not None else "temporary, removed"
            lines.append(
                f"stage {stage.number}/{stage.count} {stage.label}: merged {result.tensors} "
                f"tensors ({result.bytes / 1e9:.3f} GB) in {result.seconds:.1f} s ({kept})"
            )
        stage, result = self.stages[-1]
        lines.append(f"stage {stage.number}/{stage.count} {stage.label}: {result.summary()}")
        return "\n".join(lines)


def merge_multistage(
    config: str | Path,
    out: str | Path,
    *,
    intermediate_dir: str | Path | None = None,
    threads: int | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    stage_progress: StageProgress | None = None,
    model_card: bool = True,
    copy_tokenizer: bool = True,
    allow_crimes: bool = False,
    random_seed: int | None = None,
) -> MultistageResult:
    """Run every merge of a multi-stage file in dependency order, the final one into ``out``.

    Parameters
    ----------
    config : path
        A YAML file of several merge documents (``---`` separated) with
        ``name:`` keys, as ``mergekit-multi`` reads it (see the module's rules).
    out : path
        The final merge's output folder.
    intermediate_dir : path, optional
        Where the named stages are written and kept (``intermediate_dir/NAME``);
        otherwise they go to a temporary folder beside ``out``, removed at the
        end. Either way a failed or interrupted run leaves nothing.
    threads, shard_size, overwrite, model_card, copy_tokenizer, allow_crimes, random_seed
        As for :func:`modelfuse.merge.merge`, applied to every stage
        (``overwrite`` replaces ``out`` only).
    stage_progress : callable, optional
        ``stage_progress(stage)`` returns a context manager entered around each
        stage, which yields the engine's ``progress(tensors, bytes)`` callback
        (or None).

    Returns
    -------
    MultistageResult

    Raises
    ------
    ConfigError, CheckpointError, OutputError
        As :func:`plan_multistage` (every stage is checked before any work),
        or a stage failed while merging (named in the message).

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import load_file, save_file
    >>> d = tempfile.mkdtemp()
    >>> for i in range(3):
    ...     save_file({"w": torch.full((2,), float(i))}, os.path.join(d, f"m{i}.safetensors"))
    >>> text = '''name: pair
    ... merge_method: linear
    ... models: [m0.safetensors, m1.safetensors]
    ... ---
    ... merge_method: linear
    ... models: [pair, m2.safetensors]
    ... '''
    >>> _ = open(os.path.join(d, "soup.yaml"), "w").write(text)
    >>> result = merge_multistage(os.path.join(d, "soup.yaml"), os.path.join(d, "out"))
    >>> load_file(os.path.join(result.out, "model.safetensors"))["w"]
    tensor([1.2500, 1.2500])
    >>> sorted(os.listdir(d))
    ['m0.safetensors', 'm1.safetensors', 'm2.safetensors', 'out', 'soup.yaml']
    """
    started = time.perf_counter()
    path, target = Path(config), Path(out)
    folder = Path(intermediate_dir) if intermediate_dir is not None else None
    stages, planned = prepare_stages(  # its warnings come again, with real paths, from the run
        path,
        target,
        intermediate_dir=folder,
        overwrite=overwrite,
        allow_crimes=allow_crimes,
        random_seed=random_seed,
        show_warnings=False,
        copy_tokenizer=copy_tokenizer,
    )
    results: list[tuple[PlannedStage, MergeResult]] = []
    with intermediate_folder(target, folder) as where:
        outputs: dict[str, str] = {}
        for stage, plan in zip(stages, planned):
            written = target if plan.final else where / (stage.name or "final")
            progress = stage_progress(plan) if stage_progress is not None else None
            named = {folder_: name for name, folder_ in outputs.items()}
            try:
                with (
                    stage_warnings(stage_where(path, stage), named),
                    progress if progress is not None else contextlib.nullcontext() as advance,
                ):
                    result = merge(
                        bind(stage.config, outputs),
                        written,
                        threads=threads,
                        shard_size=shard_size,
                        overwrite=overwrite and plan.final,
                        progress=advance,
                        model_card=model_card,
                        copy_tokenizer=copy_tokenizer,
                        allow_crimes=allow_crimes,
                        random_seed=random_seed,
                    )
            except ModelfuseError as exc:
                raise restated(exc, stage_where(path, stage), named) from None
            if stage.name is not None:
                outputs[stage.name] = os.path.abspath(written)
            results.append((plan, result))
        used = _used_by_final(planned)
        record_stages(
            results[-1][1].out,
            [(plan.name, result.out) for plan, result in results if plan.name in used],
            outputs,
        )
    names = {folder_: name for name, folder_ in outputs.items()}
    return MultistageResult(
        out=results[-1][1].out,
        stages=tuple(
            (plan, dataclasses.replace(result, notes=[renamed(n, names) for n in result.notes]))
            for plan, result in results
        ),
        seconds=time.perf_counter() - started,
    )


def _used_by_final(planned: list[PlannedStage]) -> set[str | None]:
    """The final merge's name and the names of every stage it uses, directly or not."""
    used: set[str | None] = {planned[-1].name}
    for stage in reversed(planned):  # every stage comes after the stages it uses
        if stage.name in used:
            used.update(stage.uses)
    return used
