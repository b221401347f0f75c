"""``modelfuse inspect``: which merge method, when, from the task vectors of a configuration."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app, finite

__all__ = ["inspect_command"]


@app.command(
    "inspect",
    help="""Measure the task vectors of a merge configuration's models and recommend a method.

Streams the models tensor by tensor (as the merge does) and reports, per
tensor group, per layer and overall: task-vector norms, pairwise cosines,
sign conflict (the entries TIES' election rejects), overlap of the top-k
entries and each model's share of the merged delta. Writes
OUT/inspection.json (every figure) and OUT/heatmap.png; prints a table and
the recommendation with its reasons. Nothing is merged.

Example:

    modelfuse inspect ties.yaml -o inspect/ --density 0.2
""",
)
def inspect_command(
    config: Annotated[Path, typer.Argument(help="the merge configuration (YAML)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the folder to write")],
    base: Annotated[
        Path | None,
        typer.Option(help="the base model, when the configuration has no base_model (e.g. linear)"),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            help="density of the top-k sets compared (default: the configuration's density, else 0.2)",
            min=0.0,
            max=1.0,
            callback=finite,
        ),
    ] = None,
    exact: Annotated[
        bool,
        typer.Option(
            help="measure overlap and sign conflict on every entry (default: a strided sample "
            "of 65536 entries of larger tensors; norms, cosines and shares use every entry)"
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", "-j", help="tensors measured at once (default: all cores)", min=1
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it exists (never an input or a folder holding one)")
    ] = False,
    allow_crimes: Annotated[
        bool,
        typer.Option(help="inspect models whose config.json names different architectures"),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar and no table")] = False,
) -> None:
    from modelfuse.cli._memory import return_freed_memory_promptly
    from modelfuse.cli._output import (
        check_folder_output,
        publish_folder,
        refuse_output_over_inputs,
        require_parent_folder,
        staging_folder,
        write_json,
    )
    from modelfuse.cli.merge import _report_problems
    from modelfuse.errors import ConfigError, ModelfuseError
    from modelfuse.inspection import (
        DEFAULT_SAMPLE,
        inspection_heatmap,
        plan_inspection,
        run_inspection,
    )
    from modelfuse.merge.output_paths import expand_user
    from modelfuse.progress import progress_bar

    if density is not None and not density > 0:
        raise ConfigError(f"--density: expected a number in (0, 1], got {density:g}; pass e.g. 0.2")
    out = expand_user(str(out), key="--out")
    check_folder_output(out, overwrite=overwrite)
    require_parent_folder(out)
    refuse_output_over_inputs(out, {"the configuration": config, "--base": base})
    # Every problem of the configuration and its inputs (the output holding one, too) is
    # found from the headers before any tensor is read.
    try:
        planned = plan_inspection(
            config,
            base=base,
            density=density,
            sample=None if exact else DEFAULT_SAMPLE,
            allow_crimes=allow_crimes,
            out=out,
            overwrite=overwrite,
        )
    except ModelfuseError as exc:
        _report_problems(exc)
        raise
    with planned:
        return_freed_memory_promptly()
        with progress_bar(
            "inspecting", planned.tensors, total_bytes=planned.nbytes, enabled=not quiet
        ) as advance:
            inspection = run_inspection(planned, threads=threads, progress=advance)
    staging = staging_folder(out)
    try:
        write_json(staging / "inspection.json", inspection.to_dict())
        inspection_heatmap(inspection, staging / "heatmap.png")
        publish_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    recommendation = inspection.recommendation
    if not quiet:
        print(inspection.table())
        print()
        print(f"recommendation: {recommendation.summary}")
        for reason in recommendation.reasons:
            print(f"  - {reason}")
        for note in inspection.notes:
            print(f"modelfuse: {note}", file=sys.stderr)
    print(
        f"wrote {out / 'inspection.json'} and {out / 'heatmap.png'}; "
        f"recommended: {recommendation.method}"
    )
