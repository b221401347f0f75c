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

(or -o ./merged). OUT gets the weights, modelfuse.yaml (this
configuration with absolute paths: it merges the same weights again),
a README.md model card (--no-model-card: none), and the model folder's
config and tokenizer files. --dry-run lists every problem found (and
the plan) without writing anything.

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
    out: Annotated[
        Path | None, typer.Argument(help="the output model folder (or give -o/--out)")
    ] = None,
    out_option: Annotated[
        Path | None, typer.Option("-o", "--out", help="the output model folder")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="tensors merged at once [default: all cores]", min=1)
    ] = None,
    shard_size: Annotated[
        str, typer.Option(help="largest output shard, e.g. 5GB, 500MB")
    ] = "5GB",
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it exists (never an input or a folder holding one)")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="print the plan and every problem found; write nothing")
    ] = False,
    model_card: Annotated[
        bool,
        typer.Option(
            "--model-card/--no-model-card",
            help="write README.md naming the method, inputs, parameters and version",
        ),
    ] = True,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    from modelfuse.checkpoint import parse_size
    from modelfuse.cli._memory import return_freed_memory_promptly
    from modelfuse.errors import ConfigError, ModelfuseError
    from modelfuse.merge.engine import close_plan, describe_plan, merge, plan_merge
    from modelfuse.merge.output_paths import expand_user
    from modelfuse.progress import progress_bar

    if (out is None) == (out_option is None):
        raise ConfigError(
            "give the output folder once: as the second argument (modelfuse merge CONFIG OUT) "
            "or with -o/--out, not both" if out is not None else
            "missing the output folder: modelfuse merge CONFIG OUT (or -o/--out OUT)"
        )
    target = out if out is not None else out_option
    if target is None:  # for the type checker; refused above
        raise ConfigError("missing the output folder")
    target = expand_user(str(target), key="OUT")  # a quoted ~user/... names a home folder
    try:
        parse_size(shard_size)
    except ConfigError as exc:
        raise ConfigError(f"--shard-size: {exc}") from None
    return_freed_memory_promptly()

    # Every problem (configuration, inputs, output) is reported together before any work.
    try:
        plan = plan_merge(config, target, overwrite=overwrite)
    except ModelfuseError as exc:
        _report_problems(exc)
        raise
    try:
        if dry_run:
            print(describe_plan(plan))
        total, total_bytes = len(plan.tasks), plan.total_bytes
    finally:
        close_plan(plan)
    if dry_run:
        print(f"no problems found; {target} would be written", file=sys.stderr)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with progress_bar(
            "merging", total, total_bytes=total_bytes, enabled=not quiet
        ) as advance:
            result = merge(
                config,
                target,
                threads=threads,
                shard_size=shard_size,
                overwrite=overwrite,
                progress=advance,
                model_card=model_card,
            )
    for w in caught:  # one line each, and once: plan_merge may have printed the same already
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not quiet:
        for note in result.notes:
            print(f"modelfuse: {note}", file=sys.stderr)
    print(result.summary())


def _report_problems(exc: BaseException) -> None:
    """Several problems: ``modelfuse: error: N problems:`` and one line each, exit code 2."""
    problems = getattr(exc, "problems", None)
    if not isinstance(problems, list) or len(problems) < 2:
        return
    count = getattr(exc, "count", len(problems))
    print(f"modelfuse: error: {count} problems:", file=sys.stderr)
    for problem in problems:
        text = " ".join(str(problem).split())
        print(f"  {text if len(text) <= 400 else text[:397] + '...'}", file=sys.stderr)
    raise typer.Exit(2)


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
