"""``modelfuse merge`` and ``modelfuse methods``."""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer

from modelfuse.cli._app import app

__all__ = ["merge_command", "methods_command", "parse_parameter_count"]

MERGEKIT_ONLY = {
    "--cuda": "modelfuse merges on the CPU, in row blocks on every core; ignored",
    "--low-cpu-memory": "memory is bounded by a few tensors already; ignored",
    "--lazy-unpickle": "PyTorch files are always read lazily, with weights_only=True; ignored",
    "--clone-tensors": "every output tensor is written from its own buffer; ignored",
    "--trust-remote-code": "modelfuse runs no code from model folders; ignored",
    "--safe-serialization": "the output is always safetensors; ignored",
    "--transformers-cache": "modelfuse never downloads (models are local paths); ignored",
    "--lora-merge-cache": "a MODEL+LORA reference's adapter is applied as its tensors are "
    "read, nothing is cached; ignored",
    "--lora-merge-dtype": "a MODEL+LORA reference's adapter is applied in float32 (mergekit's "
    "default); the configuration's dtype sets the merge's; ignored",
    "--read-to-gpu": "modelfuse reads into CPU memory, a block of rows at a time; ignored",
    "--multi-gpu": "modelfuse merges on the CPU, in row blocks on every core; ignored",
    "--gpu-rich": "modelfuse merges on the CPU, in row blocks on every core; ignored",
    "--device": "modelfuse merges on the CPU, in row blocks on every core; ignored",
    "--async-write": "tensors are written as they are merged, from every thread; ignored",
    "--write-threads": "tensors are written as they are merged, from every thread; ignored",
    "-v": "modelfuse prints its notes and a summary line (--quiet: the summary only); ignored",
    "--lazy": "an intermediate output is never reused, since nothing would say it came from "
    "the same configuration: DIR/NAME must not exist yet; ignored",
}
"""mergekit-yaml's options that have no use in modelfuse, and what it does instead."""

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_parameter_count(text: str, *, flag: str) -> int:
    """A number of parameters as mergekit writes it: ``5B`` is 5 * 10**9, ``500M``, ``1000``.

    Examples
    --------
    >>> parse_parameter_count("5B", flag="--out-shard-size"), parse_parameter_count("1.5M", flag="x")
    (5000000000, 1500000)
    """
    from modelfuse.errors import ConfigError

    match = _COUNT.match(text) if len(text) <= 40 else None
    count = int(float(match.group(1)) * _COUNT_UNITS[match.group(2).upper()]) if match else 0
    if count < 1:
        raise ConfigError(
            f"{flag}: expected a positive number of parameters such as 5B or 500M, "
            f"got {text[:40]!r}"
        )
    return count


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

A file of several merges separated by '---', each with a name: key
(mergekit-multi's format), runs them in order: a later merge uses an
earlier one's output by writing its name as a model path, the document
without a name (else the last) is written to OUT, and the others go to
--intermediate-dir DIR (kept) or to a temporary folder (removed).
""",
)
def merge_command(
    config: Annotated[Path, typer.Argument(help="the YAML configuration")],
    out: Annotated[
        Path | None, typer.Argument(help="the output model folder (or give -o/--out)")
    ] = None,
    out_option: Annotated[
        Path | None,
        typer.Option("-o", "--out", "--out-path", help="the output model folder"),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", "-j", "--num-threads", help="tensors merged at once (default: all cores)",
            min=1,
        ),
    ] = None,
    shard_size: Annotated[
        str, typer.Option(help="largest output shard, e.g. 5GB, 500MB")
    ] = "5GB",
    out_shard_size: Annotated[
        str | None,
        typer.Option(
            help="largest output shard in parameters, as mergekit counts it: 5B, 500M "
            "(instead of --shard-size)"
        ),
    ] = None,
    copy_tokenizer: Annotated[
        bool,
        typer.Option(
            "--copy-tokenizer/--no-copy-tokenizer",
            help="copy the base (else first) model's tokenizer files beside the weights",
        ),
    ] = True,
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
            "--write-model-card/--no-write-model-card",
            help="write README.md naming the method, inputs, parameters and version",
        ),
    ] = True,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    allow_crimes: Annotated[
        bool,
        typer.Option(
            help="merge models whose config.json names different architectures (mergekit's "
            "--allow-crimes); tensor names and shapes must still match"
        ),
    ] = False,
    allow_prefix: Annotated[
        bool,
        typer.Option(
            help="match models whose tensor names differ by a prefix (a classifier's 'bert.' "
            "around a BertModel base), as the configuration key allow_prefix: true"
        ),
    ] = False,
    random_seed: Annotated[
        int | None,
        typer.Option(
            help="seed of a method's random draws (DARE) when the configuration sets none",
            min=0,
            max=2**32 - 1,
        ),
    ] = None,
    intermediate_dir: Annotated[
        Path | None,
        typer.Option(
            "--intermediate-dir",
            "-I",
            help="multi-stage file (several '---' documents with name: keys): keep each named "
            "stage's output in DIR/NAME (default: a temporary folder, removed)",
        ),
    ] = None,
    # mergekit-yaml's options that have no use here: accepted, with one line saying why
    cuda: Annotated[bool, typer.Option("--cuda/--no-cuda", hidden=True)] = False,
    low_cpu_memory: Annotated[bool, typer.Option(hidden=True)] = False,
    lazy_unpickle: Annotated[bool, typer.Option(hidden=True)] = False,
    clone_tensors: Annotated[bool, typer.Option(hidden=True)] = False,
    trust_remote_code: Annotated[bool, typer.Option(hidden=True)] = False,
    safe_serialization: Annotated[bool, typer.Option(hidden=True)] = False,
    transformers_cache: Annotated[str | None, typer.Option(hidden=True)] = None,
    lora_merge_cache: Annotated[str | None, typer.Option(hidden=True)] = None,
    lora_merge_dtype: Annotated[str | None, typer.Option(hidden=True)] = None,
    read_to_gpu: Annotated[bool, typer.Option(hidden=True)] = False,
    multi_gpu: Annotated[bool, typer.Option(hidden=True)] = False,
    gpu_rich: Annotated[bool, typer.Option("--gpu-rich", hidden=True)] = False,
    device: Annotated[str | None, typer.Option(hidden=True)] = None,
    async_write: Annotated[bool, typer.Option(hidden=True)] = False,
    write_threads: Annotated[int | None, typer.Option(hidden=True)] = None,
    verbosity: Annotated[int, typer.Option("-v", count=True, hidden=True)] = 0,
    lazy: Annotated[bool, typer.Option("--lazy/--no-lazy", hidden=True)] = False,
) -> None:
    from modelfuse.checkpoint import parse_size
    from modelfuse.cli._memory import return_freed_memory_promptly
    from modelfuse.errors import ConfigError, ModelfuseError
    from modelfuse.merge.engine import close_plan, describe_plan, merge, plan_merge
    from modelfuse.merge.output_paths import expand_user
    from modelfuse.progress import progress_bar

    given = {
        "--cuda": cuda,
        "--low-cpu-memory": low_cpu_memory,
        "--lazy-unpickle": lazy_unpickle,
        "--clone-tensors": clone_tensors,
        "--trust-remote-code": trust_remote_code,
        "--safe-serialization": safe_serialization,
        "--transformers-cache": transformers_cache is not None,
        "--lora-merge-cache": lora_merge_cache is not None,
        "--lora-merge-dtype": lora_merge_dtype is not None,
        "--read-to-gpu": read_to_gpu,
        "--multi-gpu": multi_gpu,
        "--gpu-rich": gpu_rich,
        "--device": device is not None and device != "cpu",
        "--async-write": async_write,
        "--write-threads": write_threads is not None,
        "-v": verbosity > 0,
        "--lazy": lazy,
    }
    for flag in (flag for flag, used in given.items() if used):
        print(f"modelfuse: {flag} is mergekit's; {MERGEKIT_ONLY[flag]}", file=sys.stderr)
    if out is None and out_option is None and intermediate_dir is not None:
        out = _named_final_output(config, intermediate_dir)
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
    shard_parameters = None
    if out_shard_size is not None:
        if shard_size != "5GB":
            raise ConfigError("give --shard-size (bytes) or --out-shard-size (parameters), not both")
        shard_parameters = parse_parameter_count(out_shard_size, flag="--out-shard-size")
    return_freed_memory_promptly()
    from modelfuse.merge.multistage import is_multistage

    if is_multistage(config) and allow_prefix:
        raise ConfigError(
            f"--allow-prefix: {config} holds several merges; set allow_prefix: true in the "
            "documents that need it instead"
        )
    if is_multistage(config):
        _merge_multistage(
            config,
            target,
            intermediate_dir=intermediate_dir,
            dry_run=dry_run,
            quiet=quiet,
            shard_size=shard_size,
            shard_parameters=shard_parameters,
            options={
                "threads": threads,
                "overwrite": overwrite,
                "model_card": model_card,
                "copy_tokenizer": copy_tokenizer,
                "allow_crimes": allow_crimes,
                "random_seed": random_seed,
            },
        )
        return
    if intermediate_dir is not None:
        raise ConfigError(
            f"--intermediate-dir: {config} holds one merge, which has no intermediate outputs; "
            "leave the option out (it is for files of several '---' documents with name: keys)"
        )

    # Every problem (configuration, inputs, output) is reported together before any work.
    try:
        plan = plan_merge(
            config,
            target,
            overwrite=overwrite,
            allow_crimes=allow_crimes,
            random_seed=random_seed,
            allow_prefix=allow_prefix,
        )
    except ModelfuseError as exc:
        _report_problems(exc)
        raise
    try:
        if dry_run:
            print(describe_plan(plan))
        total, total_bytes = len(plan.tasks), plan.total_bytes
        if shard_parameters is not None:  # mergekit counts parameters; the writer counts bytes
            elements = sum(math.prod(task.shape) for task in plan.tasks)
            shard_size = str(max(1, shard_parameters * total_bytes // max(1, elements)))
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
                copy_tokenizer=copy_tokenizer,
                allow_crimes=allow_crimes,
                random_seed=random_seed,
                allow_prefix=allow_prefix,
            )
    for w in caught:  # one line each, and once: plan_merge may have printed the same already
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not quiet:
        for note in result.notes:
            print(f"modelfuse: {note}", file=sys.stderr)
    print(result.summary())


def _merge_multistage(
    config: Path,
    target: Path,
    *,
    intermediate_dir: Path | None,
    dry_run: bool,
    quiet: bool,
    shard_size: str,
    shard_parameters: int | None,
    options: dict[str, Any],
) -> None:
    """A file of several merges (mergekit-multi's format): check all, then run them in order."""
    from modelfuse.errors import ModelfuseError
    from modelfuse.merge.multistage import PlannedStage, merge_multistage, plan_multistage
    from modelfuse.progress import progress_bar

    try:
        stages = plan_multistage(
            config,
            target,
            intermediate_dir=intermediate_dir,
            overwrite=options["overwrite"],
            allow_crimes=options["allow_crimes"],
            random_seed=options["random_seed"],
            copy_tokenizer=options["copy_tokenizer"],
        )
    except ModelfuseError as exc:
        _report_problems(exc)
        raise
    if dry_run:
        for stage in stages:
            where = stage.out if stage.out is not None else "a temporary folder"
            print(f"stage {stage.number}/{stage.count}: {stage.label} -> {where}")
            print("  " + stage.description.replace("\n", "\n  "))
        print("order: " + " -> ".join(stage.label for stage in stages))
        print(f"no problems found; {target} would be written", file=sys.stderr)
        return
    if shard_parameters is not None:  # mergekit counts parameters; the writer counts bytes
        final = stages[-1]
        shard_size = str(max(1, shard_parameters * final.bytes // max(1, final.parameters)))

    def stage_progress(stage: PlannedStage) -> AbstractContextManager[Callable[[int, int], None]]:
        if not quiet:
            print(f"stage {stage.number}/{stage.count}: {stage.label}", file=sys.stderr)
        return progress_bar(
            "merging", stage.tensors, total_bytes=stage.bytes, enabled=not quiet
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = merge_multistage(
                config,
                target,
                intermediate_dir=intermediate_dir,
                shard_size=shard_size,
                stage_progress=stage_progress,
                **options,
            )
        except ModelfuseError as exc:
            _report_problems(exc)
            raise
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not quiet:
        for _, stage_result in result.stages:
            for note in stage_result.notes:
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


def _named_final_output(config: Path, intermediate_dir: Path) -> Path | None:
    """Where mergekit-multi writes a file's final merge when it has a name and no output
    folder is given: ``DIR/NAME``; None when the file is not multi-stage."""
    from modelfuse.errors import ConfigError
    from modelfuse.merge.multistage import is_multistage
    from modelfuse.merge.multistage_config import read_stages

    if not is_multistage(config):
        return None
    final = read_stages(Path(config), keep_all=True)[-1]
    if final.name is None:
        raise ConfigError(
            f"missing the output folder: the final merge of {config} has no name, so it is not "
            "written to --intermediate-dir; give OUT (mergekit-multi's --out-path)"
        )
    return intermediate_dir / final.name
