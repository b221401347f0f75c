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
    base: Annotated[
        Path | None, typer.Argument(help="the base checkpoint (file or model folder)")
    ] = None,
    finetuned: Annotated[Path | None, typer.Argument(help="the fine-tuned checkpoint")] = None,
    out: Annotated[
        Path | None, typer.Argument(help="the adapter folder to write (or give -o/--out)")
    ] = None,
    out_option: Annotated[
        Path | None, typer.Option("-o", "--out", help="the adapter folder to write")
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", "--max-rank", help="rank of every module (largest rank with --energy)", min=1
        ),
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
    sv_epsilon: Annotated[
        float,
        typer.Option(
            help="per module, keep only singular values above this", min=0.0, callback=finite
        ),
    ] = 0.0,
    include_regex: Annotated[
        list[str] | None,
        typer.Option(
            "--include-regex", "-i", help="factor only modules this pattern finds (repeatable)"
        ),
    ] = None,
    exclude_regex: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude-regex", "-e", help="leave out modules this pattern finds (repeatable)"
        ),
    ] = None,
    save_module: Annotated[
        list[str] | None,
        typer.Option(help="store this module whole, by name or last part: lm_head (repeatable)"),
    ] = None,
    # mergekit-extract-lora's spellings
    model_option: Annotated[Path | None, typer.Option("--model", hidden=True)] = None,
    base_option: Annotated[Path | None, typer.Option("--base-model", hidden=True)] = None,
    out_path: Annotated[Path | None, typer.Option("--out-path", hidden=True)] = None,
    embed_lora: Annotated[
        bool | None, typer.Option("--embed-lora/--no-embed-lora", hidden=True)
    ] = None,
    distribute_scale: Annotated[
        bool, typer.Option("--distribute-scale/--no-distribute-scale", hidden=True)
    ] = True,
) -> None:
    from modelfuse.checkpoint import open_checkpoint
    from modelfuse.cli._memory import return_freed_memory_promptly
    from modelfuse.cli.ensemble import check_choice
    from modelfuse.errors import ConfigError
    from modelfuse.lora import extract_lora, matching_tensors
    from modelfuse.merge.output_paths import check_output_path, expand_user
    from modelfuse.progress import progress_bar

    base = _once(base, base_option, "the base checkpoint", "BASE", "--base-model")
    finetuned = _once(finetuned, model_option, "the fine-tuned checkpoint", "FINETUNED", "--model")
    given = [p for p in (out, out_option, out_path) if p is not None]
    if len(given) != 1:
        raise ConfigError(
            "give the adapter folder once: as the third argument (modelfuse extract-lora BASE "
            "FINETUNED OUT) or with -o/--out, not both"
            if given
            else "missing the adapter folder: modelfuse extract-lora BASE FINETUNED OUT "
            "(or -o/--out OUT)"
        )
    if embed_lora is not None:
        if embeddings != "full" and embeddings != ("lora" if embed_lora else "full"):
            raise ConfigError(
                f"--embeddings {embeddings} and --{'' if embed_lora else 'no-'}embed-lora "
                "disagree; give one of them"
            )
        embeddings = "lora" if embed_lora else "full"
    if not distribute_scale:
        print(
            "modelfuse: --no-distribute-scale is mergekit's; the singular values are split "
            "evenly between lora_A and lora_B, and PEFT applies their product, which is the "
            "same; ignored",
            file=sys.stderr,
        )
    check_choice(embeddings, ("full", "lora", "skip"), "--embeddings")
    if rank is None and energy is None:
        raise ConfigError("expected --rank, --energy or both; pass e.g. --rank 16 or --energy 0.9")
    if energy is not None and not energy > 0:
        raise ConfigError(f"--energy: expected a fraction in (0, 1], got {energy:g}; pass e.g. 0.9")
    target = expand_user(str(given[0]), key="OUT")
    inputs = [("base checkpoint", base), ("fine-tuned checkpoint", finetuned)]
    check_output_path(target, inputs, overwrite=overwrite, flag="OUT")
    return_freed_memory_promptly()

    with open_checkpoint(base) as first, open_checkpoint(finetuned) as second:
        total = len(matching_tensors(first, second))  # a mismatch is refused before the bar shows
    with progress_bar("extract-lora", total, enabled=not quiet) as advance:
        result = extract_lora(
            base, finetuned, target, rank=rank, energy=energy, embeddings=embeddings,  # type: ignore[arg-type]
            skip_undecomposable=skip_undecomposable, overwrite=overwrite, progress=advance,
            sv_epsilon=sv_epsilon, include=include_regex or (), exclude=exclude_regex or (),
            save_modules=save_module or (),
        )
    for note in result.notes():
        print(f"modelfuse: {note}", file=sys.stderr)
    if not quiet:
        worst = sorted(result.modules.items(), key=lambda item: -item[1].error)[:5]
        print("module                                             rank  relative error")
        for name, fit in worst:
            print(f"{name[:50]:<50} {fit.rank:>5}  {fit.error:.3g}")
    print(result.summary())


def _once(argument: Path | None, option: Path | None, what: str, name: str, flag: str) -> Path:
    """A checkpoint given as an argument or with mergekit's option, exactly once."""
    from modelfuse.errors import ConfigError

    if (argument is None) == (option is None):
        raise ConfigError(
            f"give {what} once: as {name} or with {flag} (mergekit's), not both"
            if argument is not None
            else f"missing {what}: modelfuse extract-lora BASE FINETUNED OUT (or {flag})"
        )
    return argument if argument is not None else option  # type: ignore[return-value]
