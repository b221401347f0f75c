"""Checking a multi-stage merge before any work: every stage planned in run order.

A later stage is planned against stand-ins for the earlier stages' outputs
(:func:`~modelfuse.merge.multistage_outputs.write_planned_output`: the tensor
names, shapes and dtypes they will write, their config.json and tokenizer), so
that every problem of the file shows before the first merge starts. The rules of
multi-stage files are in :mod:`modelfuse.merge.multistage`.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from modelfuse.errors import ModelfuseError
from modelfuse.merge.engine import close_plan, describe_plan, open_merge
from modelfuse.merge.multistage_config import Stage, read_stages, stage_label, stage_where
from modelfuse.merge.multistage_outputs import check_outputs, write_planned_output
from modelfuse.merge.multistage_references import bind
from modelfuse.merge.plan import MergePlan

__all__ = ["PlannedStage", "plan_multistage", "prepare_stages", "renamed", "restated", "stage_warnings"]


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a checked multi-stage merge, in the order it runs.

    Attributes
    ----------
    name : str or None
        The stage's ``name:`` (None for an unnamed final merge).
    document : int
        Its position in the file (1 for the first document).
    number, count : int
        Its position in the run order (1-based) and the number of stages.
    final : bool
        Whether it is the final merge (written to the output folder).
    out : Path or None
        Where it is written: the output folder, ``intermediate_dir/NAME``, or
        None for an intermediate output in a temporary folder.
    uses : tuple of str
        The names of the stages whose outputs it reads.
    tensors, bytes, parameters : int
        Tensors, bytes and elements it writes.
    description : str
        Its plan, as :func:`modelfuse.merge.engine.describe_plan` prints it.
    """

    name: str | None
    document: int
    number: int
    count: int
    final: bool
    out: Path | None
    uses: tuple[str, ...]
    tensors: int
    bytes: int
    parameters: int
    description: str

    @property
    def label(self) -> str:
        """The name, or ``"the final merge"`` for an unnamed one."""
        return stage_label(self.name)


def _elements(plan: MergePlan) -> int:
    total = 0
    for task in plan.tasks:
        count = 1
        for size in task.shape:
            count *= size
        total += count
    return total


def restated(error: ModelfuseError, where: str, names: Mapping[str, str]) -> ModelfuseError:
    """``error`` said of one stage: ``where`` first, stand-in folders named by their stage."""

    def fix(text: str) -> str:
        return f"{where}: {renamed(text, names)}"

    problems = getattr(error, "problems", None)
    if isinstance(problems, list) and len(problems) > 1:
        listed = [fix(str(p)) for p in problems]
        count = getattr(error, "count", len(listed))
        new = type(error)(f"{count} problems:\n" + "\n".join(f"  {p}" for p in listed))
        new.problems = listed  # type: ignore[attr-defined]
        new.count = count  # type: ignore[attr-defined]
        return new
    return type(error)(fix(str(error)))


@contextlib.contextmanager
def stage_warnings(where: str, names: Mapping[str, str], *, show: bool = True) -> Iterator[None]:
    """Warnings raised in the block, said again of one stage (or dropped when not ``show``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if show:
        for w in caught:
            warnings.warn(f"{where}: {renamed(str(w.message), names)}", w.category, stacklevel=3)


def prepare_stages(
    config: str | Path,
    out: str | Path,
    *,
    intermediate_dir: str | Path | None,
    overwrite: bool,
    allow_crimes: bool,
    random_seed: int | None,
    show_warnings: bool,
    copy_tokenizer: bool = True,
) -> tuple[list[Stage], list[PlannedStage]]:
    """The stages in run order, each checked; warnings of the checks shown or dropped."""
    path = Path(config)
    target = Path(out)
    folder = Path(intermediate_dir) if intermediate_dir is not None else None
    stages = read_stages(path, keep_all=folder is not None)
    check_outputs(stages, path, target, folder, overwrite)
    planned: list[PlannedStage] = []
    with tempfile.TemporaryDirectory(prefix="modelfuse-stages-") as scratch:
        stand_ins: dict[str, str] = {}
        for number, stage in enumerate(stages, start=1):
            final = number == len(stages)
            named = {folder_: name for name, folder_ in stand_ins.items()}
            try:
                with stage_warnings(stage_where(path, stage), named, show=show_warnings):
                    opened = open_merge(
                        bind(stage.config, stand_ins),
                        target if final else None,
                        overwrite=overwrite,
                        allow_crimes=allow_crimes,
                        random_seed=random_seed,
                    )
                    plan = opened.plan
            except ModelfuseError as exc:
                raise restated(exc, stage_where(path, stage), named) from None
            try:
                description = renamed(describe_plan(plan), named)
                if not final and stage.name is not None:
                    stand_ins[stage.name] = str(Path(scratch) / stage.name)
                    write_planned_output(
                        opened, Path(stand_ins[stage.name]), copy_tokenizer=copy_tokenizer
                    )
                planned.append(
                    PlannedStage(
                        name=stage.name,
                        document=stage.document,
                        number=number,
                        count=len(stages),
                        final=final,
                        out=target if final else (
                            folder / stage.name if folder is not None and stage.name else None
                        ),
                        uses=stage.uses,
                        tensors=len(plan.tasks),
                        bytes=plan.total_bytes,
                        parameters=_elements(plan),
                        description=description,
                    )
                )
            finally:
                close_plan(plan)
    return stages, planned


def plan_multistage(
    config: str | Path,
    out: str | Path,
    *,
    intermediate_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_crimes: bool = False,
    random_seed: int | None = None,
    copy_tokenizer: bool = True,
) -> list[PlannedStage]:
    """Check every stage of a multi-stage file without merging; list them in run order.

    Parameters
    ----------
    config : path
        A YAML file of several merge documents (``---`` separated) with
        ``name:`` keys (see the module's rules).
    out : path
        The final merge's output folder.
    intermediate_dir : path, optional
        Where the named stages are written and kept (``intermediate_dir/NAME``,
        none of which may exist yet); otherwise they go to a temporary folder.
    overwrite, allow_crimes, random_seed, copy_tokenizer
        As for :func:`modelfuse.merge.merge`, applied to every stage
        (``overwrite`` replaces ``out`` only).

    Returns
    -------
    list of PlannedStage
        Every stage in the order it would run, the final merge last.

    Raises
    ------
    ConfigError, CheckpointError, OutputError
        The first stage with problems, named in the message (every problem
        of that stage listed), or a problem of the file as a whole (a cycle,
        a duplicate name, an unknown reference, an empty document).

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
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
    >>> [s.label for s in plan_multistage(os.path.join(d, "soup.yaml"), os.path.join(d, "out"))]
    ['pair', 'the final merge']
    """
    return prepare_stages(
        config,
        out,
        intermediate_dir=intermediate_dir,
        overwrite=overwrite,
        allow_crimes=allow_crimes,
        random_seed=random_seed,
        show_warnings=True,
        copy_tokenizer=copy_tokenizer,
    )[1]


def renamed(text: str, names: Mapping[str, str]) -> str:
    for folder, name in sorted(names.items(), key=lambda item: -len(item[0])):
        text = text.replace(folder, name)
    return text
