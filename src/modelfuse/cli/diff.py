"""``modelfuse diff``: the task-vector patch between two checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app, finite

__all__ = ["diff_command"]


@app.command(
    "diff",
    help="""Write the difference B - A of two checkpoints as a patch.

Apply it in a merge configuration with `patches: [{patch: PATCH, scale: 0.5}]`;
several patches add up and a negative scale removes one.

Example:

    modelfuse diff ./clean ./robust -o robust.patch --density 0.1 --dtype bfloat16
""",
)
def diff_command(
    a: Annotated[Path, typer.Argument(help="the checkpoint the patch starts from")],
    b: Annotated[Path, typer.Argument(help="the checkpoint the patch leads to")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the patch folder to write")],
    density: Annotated[
        float,
        typer.Option(
            help="fraction of entries kept per tensor (largest magnitudes), in (0, 1]",
            min=0.0,
            max=1.0,
            callback=finite,
        ),
    ] = 1.0,
    dtype: Annotated[
        str | None, typer.Option(help="storage dtype: float32, float16 or bfloat16")
    ] = None,
    shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB")] = "5GB",
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it exists (never A, B or a folder holding them)")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    from modelfuse.checkpoint import open_checkpoint, parse_size
    from modelfuse.cli._memory import return_freed_memory_promptly
    from modelfuse.errors import ConfigError
    from modelfuse.merge.config import resolve_dtype
    from modelfuse.merge.output_paths import check_output_path, expand_user
    from modelfuse.merge.patch import diff_checkpoints
    from modelfuse.progress import progress_bar

    if not density > 0:
        raise ConfigError(f"--density: expected a number in (0, 1], got {density:g}; pass e.g. 0.1")
    resolve_dtype(dtype, key="--dtype")
    try:
        parse_size(shard_size)
    except ConfigError as exc:
        raise ConfigError(f"--shard-size: {exc}") from None
    out = expand_user(str(out), key="--out")  # a quoted ~user/... names a home folder
    check_output_path(out, [("checkpoint A", a), ("checkpoint B", b)], overwrite=overwrite)
    return_freed_memory_promptly()

    with open_checkpoint(b) as checkpoint:
        total = sum(1 for n in checkpoint.keys() if checkpoint.info(n).dtype.is_floating_point)
    with progress_bar("diff", total, enabled=not quiet) as advance:
        result = diff_checkpoints(
            a, b, out, density=density, dtype=dtype, shard_size=shard_size,
            overwrite=overwrite, progress=advance,
        )
    for note in result.notes:
        print(f"modelfuse: {note}", file=sys.stderr)
    print(result.summary())
