"""``modelfuse statistics fisher|gram``: Fisher diagonals and Gram matrices for data-aware merges."""

from __future__ import annotations

import contextlib
import importlib
import logging
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from modelfuse.cli._app import app
from modelfuse.cli._output import check_output
from modelfuse.errors import ConfigError, OutputError

if TYPE_CHECKING:
    from modelfuse.executors import Executor

__all__ = ["call_factory", "load_factory", "statistics_command"]


def call_factory(spec: str) -> Any:
    """Import ``package.module:function``, call it without arguments and return its result.

    The working directory is importable, so ``--factory my_models:make`` finds
    ``./my_models.py``.

    Raises
    ------
    ConfigError
        The spec is malformed, the module or function cannot be found, or
        calling the function raised.
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(
            f"--factory: expected package.module:function, got {spec!r}; e.g. my_models:make"
        )
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--factory: cannot import module {module_name!r} ({exc}); run from the folder "
            "holding it or add it to PYTHONPATH"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(
            f"--factory: module {module_name!r} has no function {function_name!r}; "
            "give package.module:function"
        )
    try:
        return function()
    except Exception as exc:  # the user's factory failed: say where, in one line
        raise ConfigError(
            f"--factory: calling {spec} raised {type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def load_factory(spec: str) -> tuple[Any, Any]:
    """Call ``package.module:function`` and check it returns ``(model, batches)``.

    See :func:`call_factory`.

    Raises
    ------
    ConfigError
        The spec is malformed, the module or function cannot be found, or the
        result is not an ``(nn.Module, iterable)`` pair.
    """
    from torch import nn

    result = call_factory(spec)
    if (
        not isinstance(result, (tuple, list))
        or len(result) != 2
        or not isinstance(result[0], nn.Module)
    ):
        raise ConfigError(
            f"--factory: {spec} returned {type(result).__name__}; expected a pair "
            "(model: torch.nn.Module, batches: iterable of (inputs, labels) or inputs)"
        )
    return result[0], result[1]


def _replaced_input(output: Path, model: Path | None, data: Path | None) -> str | None:
    """The input that writing ``output`` would replace or hide, if any (symlinks resolved).

    Statistics may be written inside the model's folder, but never over the
    data file, the model folder itself or a file the model is loaded from.
    """
    out = output.resolve()
    if data is not None and out == data.resolve():
        return f"--data {data}"
    if model is None:
        return None
    folder = model.resolve()
    if out == folder or out in folder.parents:
        return f"--model {model}"
    if out.parent == folder and (out.name.startswith(("model", "pytorch_model"))):
        return f"the weights of --model {model}"
    return None


@app.command(
    "statistics",
    help="""Compute Fisher diagonals or Gram matrices of a model on data, for the fisher,
gradient_matching and regmean merge methods (`statistics: FILE` per model).

Examples:

    modelfuse statistics fisher --model ./sst2 --data train.jsonl --text-column sentence -o sst2.fisher.safetensors

    modelfuse statistics gram --model ./sst2 --data train.csv -o sst2.gram.safetensors

    modelfuse statistics fisher --factory my_models:make -o mlp.fisher.safetensors

    modelfuse statistics gram --factory my_models:make --workers 4 -o mlp.gram.safetensors

    modelfuse statistics fisher --factory my_models:make --ray-address auto -o f.safetensors

A factory takes no arguments and returns (model, batches): batches of (inputs, labels) or of inputs.
With --workers N (or --ray-address) the examples are cut into N shards computed in parallel and
combined; the result equals one process's up to float rounding.
""",
)
def statistics_command(
    what: Annotated[
        str,
        typer.Argument(help="fisher (Fisher diagonal) or gram (Gram matrices of linear inputs)"),
    ],
    output: Annotated[
        Path, typer.Option("--out", "--output", "-o", help="the .safetensors file to write")
    ],
    model: Annotated[
        Path | None, typer.Option(help="a Hugging Face sequence-classification model folder")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="a .jsonl or .csv file of texts")] = None,
    text_column: Annotated[str, typer.Option(help="the column holding the text")] = "text",
    label_column: Annotated[
        str, typer.Option(help="the column holding the label (empirical Fisher only)")
    ] = "label",
    factory: Annotated[
        str | None,
        typer.Option(help="package.module:function returning (model, batches), for any model"),
    ] = None,
    kind: Annotated[
        str,
        typer.Option(
            "--estimator",
            help="Fisher estimator: exact (over the model's distribution) or empirical "
            "(the true labels)",
        ),
    ] = "exact",
    n_examples: Annotated[
        int | None,
        typer.Option(help="examples used (default: 4096 for fisher, 1000 for gram)", min=1),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="texts per batch", min=1)] = 16,
    max_length: Annotated[int, typer.Option(help="tokens kept per text", min=1)] = 256,
    workers: Annotated[
        int | None,
        typer.Option(
            help="data shards computed in parallel: local processes, or Ray tasks with "
            "--ray-address (default: 1; with --ray-address the cluster's CPUs)",
            min=1,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="compute the shards on the Ray cluster at this address ('auto' for the "
            "cluster started on this machine by `ray start`, 'local' to start one for this "
            "run); needs pip install 'modelfuse[ray]'",
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="gram only: backbone (the linear layers a merge of backbones uses: a Hugging "
            "Face classifier's encoder, not its task head) or all (default: backbone)"
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(help="seeds a classification head the --model folder does not have", min=0),
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace OUTPUT if it exists")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    if what not in ("fisher", "gram"):
        raise ConfigError(f"statistics: unknown kind of statistics {what!r}; valid: fisher, gram")
    if kind not in ("exact", "empirical"):
        raise ConfigError(
            f"--estimator: unknown Fisher estimator {kind[:40]!r}; valid: exact, empirical"
        )
    if layers is not None and layers not in ("backbone", "all"):
        raise ConfigError(f"--layers: unknown choice {layers[:40]!r}; valid: backbone, all")
    if layers is not None and what != "gram":
        raise ConfigError(
            f"--layers {layers}: applies to gram only (a Fisher covers every parameter); "
            "leave it out"
        )
    if factory is not None and (model is not None or data is not None):
        raise ConfigError("give either --factory, or --model with --data, not both")
    if factory is None and (model is None or data is None):
        raise ConfigError(
            "give --model DIR and --data FILE (a Hugging Face classifier and its texts), "
            "or --factory package.module:function"
        )
    check_output(output, suffix=".safetensors", overwrite=overwrite)
    replaced = _replaced_input(output, model, data)
    if replaced is not None:
        raise OutputError(
            f"-o {output}: would replace {replaced}; write the statistics to another file, "
            "e.g. -o fisher.safetensors"
        )
    if ray_address is not None and not _import_ray().is_initialized():
        _check_reachable(ray_address)  # before the model and the data are loaded
    _run(
        what,  # type: ignore[arg-type]
        output,
        model=model,
        data=data,
        text_column=text_column,
        label_column=label_column,
        factory=factory,
        kind=kind,  # type: ignore[arg-type]
        n_examples=n_examples or (4096 if what == "fisher" else 1000),
        batch_size=batch_size,
        max_length=max_length,
        workers=workers,
        ray_address=ray_address,
        quiet=quiet,
        layers=layers or "backbone",  # type: ignore[arg-type]
        seed=seed,
    )


def _import_ray() -> Any:
    """The ray module, or a ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--ray-address: Ray is not installed; install it with pip install 'modelfuse[ray]', "
            "or use --workers N for local processes"
        ) from None
    return ray


def _check_reachable(address: str) -> None:
    """Refuse a HOST:PORT address nothing listens on (Ray itself retries for minutes)."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        return  # auto, local, or a form Ray checks itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)[:80] or type(exc).__name__
        raise ConfigError(
            f"--ray-address {address[:60]!r}: nothing answers at {host[:40]}:{port[:8]} "
            f"({reason}); give the address `ray start --head` printed, or local to start "
            "Ray for this run"
        ) from None


@contextlib.contextmanager
def _executor(workers: int | None, ray_address: str | None) -> Iterator[tuple[Executor, int]]:
    """The executor for ``--workers``/``--ray-address`` and the number of shards; shut down after."""
    from modelfuse.executors import LocalExecutor, RayExecutor

    if ray_address is None:
        with LocalExecutor(workers=workers or 1) as local:
            yield local, workers or 1
        return
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Ray's own tips and notices, not the user's
                ray.init(
                    address=ray_address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError: one line
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(
                f"--ray-address {ray_address[:60]!r}: cannot connect to a Ray cluster ({reason}); "
                "give the address of a running cluster (`ray start --head` prints it), auto for "
                "the cluster started on this machine, or local to start one for this run"
            ) from None
    try:
        shards = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield RayExecutor(), shards
    finally:
        if started:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unclosed log files of Ray's processes
                ray.shutdown()


def _run(
    what: Literal["fisher", "gram"],
    output: Path,
    *,
    model: Path | None,
    data: Path | None,
    text_column: str,
    label_column: str,
    factory: str | None,
    kind: Literal["exact", "empirical"],
    n_examples: int,
    batch_size: int,
    max_length: int,
    quiet: bool,
    workers: int | None = None,
    ray_address: str | None = None,
    layers: Literal["backbone", "all"] = "backbone",
    seed: int = 0,
) -> None:
    from modelfuse.statistics import save, shard_batches
    from modelfuse.statistics.huggingface import backbone_name

    needs_labels = what == "fisher" and kind == "empirical"
    if factory is not None:
        from modelfuse.statistics.batches import count_examples

        network, batches = load_factory(factory)
        available = count_examples(batches)
        total = n_examples if available is None else min(n_examples, available)
        source = factory
    else:
        from modelfuse.errors import DataError
        from modelfuse.statistics.huggingface import (
            label_ids,
            length_grouped_batches,
            load_sequence_classifier,
            position_limit,
        )
        from modelfuse.statistics.text_data import read_text_examples

        if model is None or data is None:
            raise ConfigError("give --model DIR and --data FILE, or --factory")
        examples = read_text_examples(
            data,
            text_column=text_column,
            label_column=label_column if needs_labels else None,
            limit=n_examples,
        )
        if needs_labels and examples.labels is None:
            raise DataError(
                f"{data}: no column {label_column!r}, but the empirical Fisher needs labels; "
                "choose it with --label-column or use --estimator exact"
            )
        network, tokenizer = load_sequence_classifier(model, seed=seed)
        labels = (
            None
            if examples.labels is None
            else label_ids(examples.labels, network.config, source=str(data))
        )
        limit = position_limit(network, tokenizer)
        if limit is not None and limit < max_length:
            longest = max(len(ids) for ids in tokenizer(examples.texts)["input_ids"])
            if longest > limit:
                print(
                    f"modelfuse: warning: --max-length {max_length}: {model} takes at most "
                    f"{limit} tokens; texts longer than that were cut to {limit}",
                    file=sys.stderr,
                )
            max_length = limit
        batches = list(
            length_grouped_batches(
                tokenizer, examples.texts, labels, batch_size=batch_size, max_length=max_length
            )
        )
        total = len(examples.texts)
        source = str(model)

    within = backbone_name(network) if what == "gram" and layers == "backbone" else None
    parallel = ray_address is not None or (workers or 1) > 1
    with contextlib.ExitStack() as stack:
        if parallel:  # Ray starts (and stops) outside the warnings recorded for the user
            executor, n_shards = stack.enter_context(_executor(workers, ray_address))
        with (
            warnings.catch_warnings(record=True) as caught,
            _flags_in_data_errors(),
            _model_failures(None if factory is not None else model),
        ):
            warnings.simplefilter("always")
            # files left unclosed by other libraries (Ray's logs) are not the user's concern
            warnings.simplefilter("ignore", ResourceWarning)
            if not parallel:
                stats = _one_process(
                    what, network, batches, output, kind=kind, n_examples=n_examples,
                    total=total, quiet=quiet, within=within,
                )
            else:
                shards = shard_batches(
                    batches, n_shards, n_examples=n_examples, need_labels=needs_labels
                )
                stats = _sharded(
                    what, network, shards, executor, kind=kind, n_examples=n_examples,
                    quiet=quiet, within=within, flag=(
                        f"--workers {workers}"
                        if ray_address is None
                        else f"--ray-address {ray_address[:60]!r}"
                    ),
                )
        for message in dict.fromkeys(str(w.message) for w in caught):
            print(f"modelfuse: warning: {message}", file=sys.stderr)
    if parallel or what == "fisher":  # a gram in this process is already written, layer by layer
        save(stats, output)
    label = "Fisher diagonals" if what == "fisher" else "Gram matrices"
    estimator = f" ({kind})" if what == "fisher" else ""
    print(
        f"wrote {label}{estimator} of {len(stats)} tensors of {source}, over "
        f"{stats.n_examples} examples, to {output}"
    )


@contextlib.contextmanager
def _model_failures(folder: Path | None) -> Iterator[None]:
    """A Hugging Face model that fails on its texts (a shape or index error inside it): one line."""
    from modelfuse.errors import CheckpointError

    if folder is None:
        yield
        return
    try:
        yield
    except (RuntimeError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"--model {folder}: the model failed on the texts ({type(exc).__name__}: {reason}); "
            "check that the tokenizer and the model were saved together"
        ) from None


@contextlib.contextmanager
def _flags_in_data_errors() -> Iterator[None]:
    """Re-word the library's ``kind='exact'`` advice as the flag ``--estimator exact``."""
    from modelfuse.errors import DataError

    try:
        yield
    except DataError as exc:
        message = str(exc)
        if "kind='exact'" not in message:
            raise
        raise DataError(message.replace("kind='exact'", "--estimator exact")) from None


def _sharded(
    what: Literal["fisher", "gram"],
    network: Any,
    shards: list[list[Any]],
    executor: Executor,
    *,
    kind: Literal["exact", "empirical"],
    n_examples: int,
    quiet: bool,
    within: str | None,
    flag: str,
) -> Any:
    """The statistic computed per shard through ``executor``; the bar moves when all are done."""
    from modelfuse.executors import ExecutorError
    from modelfuse.progress import progress_bar
    from modelfuse.statistics import sharded_statistics
    from modelfuse.statistics.batches import count_examples

    options: dict[str, Any] = {"n_examples": n_examples}
    if what == "fisher":
        options["kind"] = kind
    else:
        options["within"] = within
    total = sum(count_examples(shard) or 0 for shard in shards)
    description = f"{what} statistics on {len(shards)} shards"
    with progress_bar(description, total, enabled=not quiet) as advance:
        try:
            stats = sharded_statistics(what, network, shards, executor=executor, **options)
        except ExecutorError as exc:  # a worker process or the cluster failed
            raise ConfigError(f"{flag}: {exc}; run again") from None
        advance(total, 0)
    return stats


def _one_process(
    what: Literal["fisher", "gram"],
    network: Any,
    batches: Any,
    output: Path,
    *,
    kind: Literal["exact", "empirical"],
    n_examples: int,
    total: int,
    quiet: bool,
    within: str | None,
) -> Any:
    """The statistic computed in this process, streaming the batches, with a progress bar.

    Gram matrices are written to ``output`` here, group of layers by group
    (memory bounded by the sums of one group); a Fisher is returned for the
    caller to write.
    """
    from modelfuse.progress import progress_bar
    from modelfuse.statistics import fisher_diagonal
    from modelfuse.statistics.gram import gram_passes, write_gram_matrices

    passes = 1 if what == "fisher" else len(gram_passes(network, within=within))
    done = 0
    with progress_bar(f"{what} statistics", total * passes, enabled=not quiet) as advance:

        def progress(n_seen: int) -> None:
            nonlocal done
            advance(n_seen - done, 0)
            done = n_seen

        if what == "fisher":
            return fisher_diagonal(
                network, batches, n_examples=n_examples, kind=kind, progress=progress
            )
        return write_gram_matrices(
            network, batches, output, n_examples=n_examples, within=within, progress=progress
        )
