"""Where a multi-stage merge writes: checked outputs, intermediate folders, stand-ins for planning,
and the record of every stage in the final output."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from modelfuse.checkpoint.safetensors_format import encode_header
from modelfuse.checkpoint.writer import (
    MARKER_NAME,
    _make_sibling,
    _marker_text,
    is_model_file,
    is_tokenizer_file,
)
from modelfuse.errors import OutputError
from modelfuse.merge.multistage_config import Stage
from modelfuse.merge.open_inputs import OpenedInputs
from modelfuse.merge.output_files import updated_model_config
from modelfuse.merge.output_paths import check_output_path, expand_user
from modelfuse.merge.parameters import short

__all__ = ["check_outputs", "intermediate_folder", "record_stages", "write_planned_output"]


def _stage_named(stage: Stage) -> str:
    return f"stage {stage.name!r}" if stage.name is not None else "the final merge"


def check_outputs(
    stages: list[Stage],
    path: Path,
    out: Path,
    intermediate_dir: Path | None,
    overwrite: bool,
) -> None:
    """Refuse an output that is or holds an input of any stage, or an intermediate folder."""
    inputs: list[tuple[str, str]] = [
        ("configuration file", str(path)),
        ("folder of the configuration", str(path.resolve().parent)),
    ]
    names = {stage.name for stage in stages if stage.name is not None}
    for stage in stages:
        config = stage.config
        references = [
            config.base_model,
            *(e.model for e in config.models or []),
            *(e.statistics for e in config.models or []),
            *(piece.base_model for piece in config.slices or []),
            *(s.model for piece in config.slices or [] for s in piece.sources),
            *(e.patch for e in config.patches or []),
        ]
        inputs += [
            (f"input of {_stage_named(stage)}:", str(expand_user(reference, key="model")))
            for reference in references
            if reference is not None and reference not in names
        ]
    check_output_path(out, inputs, overwrite=overwrite)
    if intermediate_dir is None:
        return
    if intermediate_dir.exists() and not intermediate_dir.is_dir():
        raise OutputError(
            f"--intermediate-dir {intermediate_dir}: is a file; give a folder (it is created "
            "when missing)"
        )
    real_out = os.path.realpath(out)
    real_dir = os.path.realpath(intermediate_dir)
    if real_dir == real_out or real_dir.startswith(real_out.rstrip(os.sep) + os.sep):
        raise OutputError(
            f"--intermediate-dir {intermediate_dir}: is inside the output folder {out}; "
            "keep the intermediate outputs elsewhere"
        )
    for what, path in inputs[2:]:  # writing into a model folder would change that input
        real = os.path.realpath(path)
        if real_dir == real or real_dir.startswith(real.rstrip(os.sep) + os.sep):
            raise OutputError(
                f"--intermediate-dir {intermediate_dir}: is inside {short(path, 200)}, an "
                f"{what.rstrip(':')}; choose a folder of its own"
            )
    for stage in stages:
        if stage.name is None or stage is stages[-1]:  # the final merge is written to out
            continue
        target = intermediate_dir / stage.name
        if os.path.realpath(target) == real_out:
            raise OutputError(
                f"--intermediate-dir {intermediate_dir}: stage {stage.name!r} would be written "
                f"to the output folder {out}; choose another output folder or --intermediate-dir"
            )
        if os.path.lexists(target):
            raise OutputError(
                f"--intermediate-dir {intermediate_dir}: {target} already exists (the output "
                f"of stage {stage.name!r}); remove it, or choose another --intermediate-dir"
            )


def write_planned_output(
    opened: OpenedInputs, folder: Path, *, copy_tokenizer: bool = True
) -> None:
    """A model folder with what the merge of ``opened`` writes, except the tensors' data.

    The safetensors file holds the tensor names, shapes and dtypes and is
    extended to its full size without writing its data (a sparse file); the
    other files are the merge's own (:func:`~modelfuse.merge.engine.merge`):
    its config.json, a built vocabulary's tokenizer (or the base's with a chat
    template) and the files copied from the base model's folder, tokenizer
    files included unless ``copy_tokenizer`` is off. So a later stage is
    planned against what it will read, tokenizer and all.
    """
    plan = opened.plan
    folder.mkdir()
    tensors, offset = [], 0
    for task in plan.tasks:
        tensors.append((task.name, task.out_dtype, task.shape, offset, offset + task.nbytes))
        offset += task.nbytes
    header = encode_header(tensors, {"format": "pt"})
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + offset)
    step = opened.vocabulary
    files: dict[str, str | bytes | Path] = {}
    updated = updated_model_config(
        opened.files_from, plan, step.vocab_size if step is not None else None
    )
    if updated is not None:
        files["config.json"] = updated[0]
    own = step is not None and bool(step.files) and (step.built or copy_tokenizer)
    if own and step is not None:
        files.update(step.files)
    source = opened.files_from
    if source is not None and source.is_dir():
        for path in sorted(source.iterdir()):
            if is_tokenizer_file(path.name) and not (copy_tokenizer and not own):
                continue
            if path.is_file() and is_model_file(path.name) and path.name not in files:
                files[path.name] = path
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, folder / name)
        else:
            (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)


@contextlib.contextmanager
def intermediate_folder(out: Path, intermediate_dir: Path | None) -> Iterator[Path]:
    """Where the named stages go; a temporary folder (or what this run added) removed on exit.

    The temporary folder beside ``out`` is named and marked as the
    checkpoint writer's own, so that one left by a killed process is removed
    by the next merge into ``out``.
    """
    if intermediate_dir is None:
        folder = _make_sibling(out.absolute(), "tmp")
        try:
            (folder / MARKER_NAME).write_text(_marker_text(), encoding="ascii")
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    created = [p for p in (intermediate_dir, *intermediate_dir.parents) if not p.exists()]
    intermediate_dir.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(intermediate_dir))
    try:
        yield intermediate_dir
    except BaseException:
        # An interrupted or failed run leaves nothing: only what it wrote is removed.
        for entry in set(os.listdir(intermediate_dir)) - before:
            shutil.rmtree(intermediate_dir / entry, ignore_errors=True)
        for folder in created:  # the folders it created, innermost first, if empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _renamed(value: Any, names: Mapping[str, str]) -> Any:
    """``value`` with every string that is an intermediate output's path replaced by its name."""
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, list):
        return [_renamed(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _renamed(v, names) for k, v in value.items()}
    return value


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot be written ({exc.strerror or exc}); the merged weights beside it "
            "are complete"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def record_stages(
    out: Path, written: Sequence[tuple[str | None, Path]], outputs: Mapping[str, str]
) -> None:
    """Make ``out``'s modelfuse.yaml and README.md describe every stage that made it.

    ``written`` holds, for each stage the final merge used (in run order, the
    final one last), its name and output folder, whose ``modelfuse.yaml`` the
    engine wrote with absolute paths. Their documents, with every
    intermediate output named by its stage, become ``out/modelfuse.yaml``: a
    multi-stage file that runs the same merges again. The model card names
    the stages instead of intermediate folders that may no longer exist.
    """
    from modelfuse import __version__

    names = {path: name for name, path in outputs.items()}
    documents = []
    for name, folder in written:
        data = yaml.safe_load((folder / "modelfuse.yaml").read_text())
        documents.append({**({"name": name} if name is not None else {}), **_renamed(data, names)})
    header = (
        f"# modelfuse_version: {__version__}\n"
        f"# The {len(documents)} merges that made this model, with absolute paths; a later "
        "one uses an earlier one's output by its name. `modelfuse merge modelfuse.yaml OUT` "
        "runs them again.\n"
    )
    _replace_file(out / "modelfuse.yaml", header + yaml.safe_dump_all(documents, sort_keys=False))
    card = out / "README.md"
    if card.is_file():
        text = card.read_text()
        for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
            text = text.replace(path, name)
        listed = [
            f"- `{document.get('name', 'final merge')}`: `{document.get('merge_method')}`"
            for document in documents
        ]
        text = text.rstrip("\n") + (
            "\n\n## Stages\n\nThis model is the last of several merges run from one "
            "multi-stage configuration (`modelfuse.yaml` holds them all), in this order:\n\n"
            + "\n".join(listed)
            + "\n"
        )
        _replace_file(card, text)
