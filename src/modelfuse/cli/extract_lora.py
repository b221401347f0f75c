"""``modelfuse extract-lora``: a PEFT LoRA adapter from a base and its fine-tune."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app, finite

__all__ = ["extract_lora_command"]


@app.command(
    "extract-lora",
    help="""Write the low-rank adapter (PEFT LoRA) that turns BASE into FINETUNED.

Each 2-D linear weight's difference is cut to its leading singular directions: \
--rank R for every module, or --energy E for the smallest rank per module keeping \
the fraction E of the squared singular values (capped by --rank when both are given).

What cannot be factored is stored whole as PEFT modules_to_save, as \
mergekit-extract-lora does: changed embeddings (--embeddings lora factors them, \
--embeddings skip leaves them out), a grown vocabulary (with the fine-tune's \
tokenizer), norms and biases (--skip-undecomposable leaves those out). Changed \
biases of the adapted layers are stored as PEFT lora_bias when every adapted \
layer has a bias. Load the result with \
peft.PeftModel.from_pretrained(base_model, OUT).

Example:

    modelfuse extract-lora ./base ./finetuned ./lora --rank 16
""",
)
def extract_lora_command(
    base: Annotated[Path, typer.Argument(help="the base checkpoint (file or model folder)")],
    finetuned: Annotated[Path, typer.Argument(help="the fine-tuned checkpoint")],
    out: Annotated[
        Path | None, typer.Argument(help="the adapter folder to write (or give -o/--out)")
    ] = None,
    out_option: Annotated[
        Path | None, typer.Option("-o", "--out", help="the adapter folder to write")
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="rank of every module (largest rank with --energy)", min=1)
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            help="per module, keep the smallest rank reaching this fraction of the squared "
            "singular values, in (0, 1]",
            min=0.0,
            max=1.0,
            callback=finite,
        ),
    ] = None,
    embeddings: Annotated[
        str,
        typer.Option(
            metavar="full|lora|skip",
            help="changed embeddings: stored whole (modules_to_save), as low-rank factors, "
            "or left out",
        ),
    ] = "full",
    skip_undecomposable: Annotated[
        bool,
        typer.Option(
            "--skip-undecomposable",
            help="leave out changed norms and biases instead of storing their modules whole",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="replace OUT if it exists (never BASE, FINETUNED or a folder holding them)"),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    from modelfuse.checkpoint import open_checkpoint
    from modelfuse.cli._memory import return_freed_memory_promptly
    from modelfuse.cli.ensemble import check_choice
    from modelfuse.errors import ConfigError
    from modelfuse.lora import extract_lora, matching_tensors
    from modelfuse.merge.output_paths import check_output_path, expand_user
    from modelfuse.progress import progress_bar

    if (out is None) == (out_option is None):
        raise ConfigError(
            "give the adapter folder once: as the third argument (modelfuse extract-lora BASE "
            "FINETUNED OUT) or with -o/--out, not both"
            if out is not None
            else "missing the adapter folder: modelfuse extract-lora BASE FINETUNED OUT "
            "(or -o/--out OUT)"
        )
    check_choice(embeddings, ("full", "lora", "skip"), "--embeddings")
    if rank is None and energy is None:
        raise ConfigError("expected --rank, --energy or both; pass e.g. --rank 16 or --energy 0.9")
    if energy is not None and not energy > 0:
        raise ConfigError(f"--energy: expected a fraction in (0, 1], got {energy:g}; pass e.g. 0.9")
    target = expand_user(str(out if out is not None else out_option), key="OUT")
    inputs = [("base checkpoint", base), ("fine-tuned checkpoint", finetuned)]
    check_output_path(target, inputs, overwrite=overwrite, flag="OUT")
    return_freed_memory_promptly()

    with open_checkpoint(base) as first, open_checkpoint(finetuned) as second:
        total = len(matching_tensors(first, second))  # a mismatch is refused before the bar shows
    with progress_bar("extract-lora", total, enabled=not quiet) as advance:
        result = extract_lora(
            base, finetuned, target, rank=rank, energy=energy, embeddings=embeddings,  # type: ignore[arg-type]
            skip_undecomposable=skip_undecomposable, overwrite=overwrite, progress=advance,
        )
    for note in result.notes():
        print(f"modelfuse: {note}", file=sys.stderr)
    if not quiet:
        worst = sorted(result.modules.items(), key=lambda item: -item[1].error)[:5]
        print("module                                             rank  relative error")
        for name, fit in worst:
            print(f"{name[:50]:<50} {fit.rank:>5}  {fit.error:.3g}")
    print(result.summary())
