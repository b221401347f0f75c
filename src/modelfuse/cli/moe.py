"""``modelfuse moe``: a mixture of experts from a mergekit-moe configuration."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app

__all__ = ["moe_command"]

MOE_ONLY = {
    "--load-in-4bit": "the base model runs in its own dtype on the CPU for hidden gates; ignored",
    "--load-in-8bit": "the base model runs in its own dtype on the CPU for hidden gates; ignored",
    "--num-threads": "torch's threads run the base model and write the experts; ignored",
    "--allow-crimes": "the output architecture decides which models fit, as in mergekit-moe, "
    "which reads no --allow-crimes either; ignored",
}
"""mergekit-moe's own options that have no use in modelfuse (the rest are mergekit-yaml's,
:data:`modelfuse.cli.merge.MERGEKIT_ONLY`), and what it does instead."""

DEVICES = ("cpu", "auto")
"""``--device`` values: the base model runs on the CPU either way."""


@app.command(
    "moe",
    help="""Build a mixture of experts from a mergekit-moe configuration.

Writes a Mixtral checkpoint (MixtralForCausalLM) from Llama or Mistral
experts, or a Qwen2-MoE one (Qwen2MoeForCausalLM) when the configuration
gives one shared expert: the base model's tensors outside the MLPs, each
expert's MLP weights, and routers made from each expert's prompts
(gate_mode hidden: the base model's hidden states, run on the CPU;
cheap_embed: the prompts' token embeddings; random: seeded draws). The
base model's tokenizer is copied.

Example:

    modelfuse moe moe.yaml ./moe

with moe.yaml:

    base_model: ./base
    gate_mode: hidden
    dtype: bfloat16
    experts:
      - source_model: ./math
        positive_prompts: ["solve the equation"]
      - source_model: ./code
        positive_prompts: ["write a python function"]
""",
)
def moe_command(
    config: Annotated[Path, typer.Argument(help="the mergekit-moe YAML configuration")],
    out: Annotated[
        Path | None, typer.Argument(help="the output model folder (or give -o/--out)")
    ] = None,
    out_option: Annotated[
        Path | None, typer.Option("-o", "--out", help="the output model folder")
    ] = None,
    out_shard_size: Annotated[
        str,
        typer.Option(help="largest output shard in parameters, as mergekit counts them: 5B, 500M"),
    ] = "5B",
    random_seed: Annotated[
        int,
        typer.Option(
            "--random-seed",
            "--seed",
            help="seed of random routers (gate_mode random) and of the experts' noise_scale",
            min=0,
            max=2**32 - 1,
        ),
    ] = 0,
    device: Annotated[
        str, typer.Option(help="where the base model runs for hidden gates: cpu (or auto: cpu)")
    ] = "cpu",
    copy_tokenizer: Annotated[
        bool,
        typer.Option(
            "--copy-tokenizer/--no-copy-tokenizer", help="copy the base model's tokenizer files"
        ),
    ] = True,
    write_model_card: Annotated[
        bool,
        typer.Option(
            "--write-model-card/--no-write-model-card",
            help="write the configuration (absolute paths) as mergekit_moe_config.yml",
        ),
    ] = True,
    not_useful: Annotated[
        bool,
        typer.Option(
            "--i-understand-this-is-not-useful-without-training",
            help="allow every expert to be the same model",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it exists (never an input or a folder holding one)")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    # mergekit-moe's options that have no use here: accepted, with one line saying why
    load_in_4bit: Annotated[bool, typer.Option(hidden=True)] = False,
    load_in_8bit: Annotated[bool, typer.Option(hidden=True)] = False,
    threads: Annotated[int | None, typer.Option("--num-threads", "-j", hidden=True)] = None,
    allow_crimes: Annotated[bool, typer.Option(hidden=True)] = False,
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
    async_write: Annotated[bool, typer.Option(hidden=True)] = False,
    write_threads: Annotated[int | None, typer.Option(hidden=True)] = None,
    verbosity: Annotated[int, typer.Option("-v", count=True, hidden=True)] = 0,
) -> None:
    from modelfuse.cli._memory import return_freed_memory_promptly
    from modelfuse.cli.merge import MERGEKIT_ONLY

    given = {
        "--load-in-4bit": load_in_4bit,
        "--load-in-8bit": load_in_8bit,
        "--num-threads": threads is not None,
        "--allow-crimes": allow_crimes,
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
        "--async-write": async_write,
        "--write-threads": write_threads is not None,
        "-v": verbosity > 0,
    }
    for flag in (flag for flag, used in given.items() if used):
        why = MOE_ONLY.get(flag) or MERGEKIT_ONLY[flag]
        print(f"modelfuse: {flag} is mergekit's; {why}", file=sys.stderr)
    from modelfuse.cli.merge import parse_parameter_count
    from modelfuse.errors import ConfigError
    from modelfuse.merge.output_paths import expand_user
    from modelfuse.moe import build_moe, plan_moe
    from modelfuse.progress import progress_bar

    if (out is None) == (out_option is None):
        raise ConfigError(
            "give the output folder once: as the second argument (modelfuse moe CONFIG OUT) "
            "or with -o/--out, not both"
            if out is not None
            else "missing the output folder: modelfuse moe CONFIG OUT (or -o/--out OUT)"
        )
    target = expand_user(str(out if out is not None else out_option), key="OUT")
    if device not in DEVICES:
        raise ConfigError(
            f"--device: {device[:40]!r} is not available; modelfuse moe runs the base model on "
            "the CPU; pass --device cpu or leave it out"
        )
    shard_parameters = parse_parameter_count(out_shard_size, flag="--out-shard-size")
    return_freed_memory_promptly()

    plan = plan_moe(config, target, overwrite=overwrite, allow_all_same=not_useful)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with progress_bar(
            "moe", plan.steps, total_bytes=plan.total_bytes, enabled=not quiet
        ) as advance:
            result = build_moe(
                config,
                target,
                overwrite=overwrite,
                random_seed=random_seed,
                out_shard_size=shard_parameters,
                copy_tokenizer=copy_tokenizer,
                write_config=write_model_card,
                allow_all_same=not_useful,
                progress=advance,
            )
    for w in caught:  # transformers' deprecation notices are not the user's concern
        if not issubclass(
            w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
        ):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not quiet:
        for note in result.notes:
            print(f"modelfuse: {note}", file=sys.stderr)
    print(result.summary())
