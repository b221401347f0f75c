"""``modelfuse merge`` and ``modelfuse methods``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app

__all__ = ["merge_command", "methods_command"]


@app.command(
    "merge",
    help="""Merge checkpoints as a YAML configuration says (mergekit's format).

Example:

    modelfuse merge soup.yaml ./merged --threads 2 --shard-size 2GB

with soup.yaml:

    merge_method: linear
    models:
      - model: ./finetune-a
        parameters: {weight: 0.6}
      - model: ./finetune-b
        parameters: {weight: 0.4}
    dtype: bfloat16
""",
)
def merge_command(
    config: Annotated[Path, typer.Argument(help="the YAML configuration")],
    out: Annotated[Path, typer.Argument(help="the output model folder")],
    threads: Annotated[
        int | None, typer.Option(help="tensors merged at once [default: all cores]", min=1)
    ] = None,
    shard_size: Annotated[
        str, typer.Option(help="largest output shard, e.g. 5GB, 500MB")
    ] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="print the plan and every problem found; write nothing")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    from modelfuse.cli._memory import return_freed_memory_promptly
    from modelfuse.merge.engine import describe_plan, merge, plan_merge
    from modelfuse.progress import progress_bar

    return_freed_memory_promptly()

    if dry_run:
        plan = plan_merge(config)
        try:
            print(describe_plan(plan))
        finally:
            for model in [*plan.models, *([plan.base] if plan.base else [])]:
                model.source.close()
        print(f"no problems found; {out} would be written", file=sys.stderr)
        return
    plan = plan_merge(config)  # every problem is reported before the bar appears
    total, total_bytes = len(plan.tasks), plan.total_bytes
    for model in [*plan.models, *([plan.base] if plan.base else [])]:
        model.source.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with progress_bar(
            "merging", total, total_bytes=total_bytes, enabled=not quiet
        ) as advance:
            result = merge(
                config,
                out,
                threads=threads,
                shard_size=shard_size,
                overwrite=overwrite,
                progress=advance,
            )
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"modelfuse: warning: {message}", file=sys.stderr)
    for note in result.notes:
        print(f"modelfuse: {note}", file=sys.stderr)
    print(result.summary())


@app.command(
    "methods",
    help="""List the merge methods, or one method's parameters.

Example:

    modelfuse methods task_arithmetic
""",
)
def methods_command(
    name: Annotated[str | None, typer.Argument(help="a method's name")] = None,
) -> None:
    from modelfuse.merge.registry import METHODS, get_method

    if name is None:
        width = max(len(n) for n in METHODS)
        for method_name in sorted(METHODS):
            print(f"{method_name:<{width}}  {METHODS[method_name].summary}")
        return
    method = get_method(name, where="methods")
    print(f"{method.name}: {method.summary}")
    needs = "required" if method.requires_base else ("optional" if method.optional_base else "unused")
    print(f"base model: {needs}")
    rows = method.parameters.describe()
    if not rows:
        print("no parameters")
    for key, scope, default, description in rows:
        print(f"  {key:<14} {scope:<10} default {default:<8} {description}")
