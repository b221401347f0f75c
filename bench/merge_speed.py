"""Merge speed and memory against the I/O floor, every method in a fresh process.

Generates once, into --cache, N Hugging Face Llama-format checkpoints (default
3 x about 220M parameters in bfloat16: hidden 1024, intermediate 2816, 12
layers, 16 heads, vocab 32000), then measures in one run:

- the I/O floor: read every input tensor once and write one output of the same size;
- each merge method: ``modelfuse merge CONFIG OUT`` (the command line, as users
  run it) on the N checkpoints.

Each measurement runs in its own process and reports wall seconds and peak RSS;
each process imports the modules it uses before its clock starts (imports are
a fixed cost per process, not part of the merge's speed).
Every run of a method is paired with a run of the floor just before it; the
table gives the fastest run, the fastest paired floor, the median of the
pairs' ratios (drift of the machine cancels out), a 95 % confidence interval
of that median (distribution-free, from the ratios' order statistics: it
needs six pairs or more), the lowest and highest of those ratios, and the
largest peak RSS.

    python bench/merge_speed.py                 # every data-free method
    python bench/merge_speed.py --methods linear ties --scale 2
    python bench/merge_speed.py --methods della sce --repeat 15   # a narrower interval
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 1024, 2816, 12, 16, 32000

# Parameters a benchmark run gives each method (methods not listed run on their defaults).
METHOD_PARAMETERS: dict[str, dict] = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.8},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "della": {"density": 0.5},
    "della_linear": {"density": 0.5},
    "sce": {"select_topk": 0.1},
    "slerp": {"t": 0.4},
    "nearswap": {"t": 0.001},
    "arcee_fusion": {},
    "ram": {},
    "ramplus_tl": {},
}

# Methods that take fewer models than the benchmark has (slerp: the base and one other).
MODEL_COUNT: dict[str, int] = {"slerp": 1}


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        kv = HIDDEN  # no grouped-query attention: 16 key-value heads
        shapes += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return shapes


def generate(cache: Path, n_models: int, layers: int) -> list[Path]:
    """Write the checkpoints once; later runs reuse them."""
    from modelfuse.checkpoint import CheckpointWriter

    shapes = llama_shapes(layers)
    folders = [cache / f"llama-{layers}l-{i}" for i in range(n_models)]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "torch_dtype": "bfloat16",
    }
    for i, folder in enumerate(folders):
        if (folder / "config.json").is_file():
            continue
        print(f"generating {folder} ...", flush=True)
        layout = [(name, shape, torch.bfloat16) for name, shape in shapes]
        with CheckpointWriter(folder, layout, shard_size="5GB", overwrite=True) as writer:
            for j, (name, shape) in enumerate(shapes):
                g = torch.Generator().manual_seed(j)  # the same "pre-trained" values in every model
                base = torch.randn(shape, generator=g) * 0.02
                if i > 0:  # fine-tunes: the base plus a small model-specific change
                    g.manual_seed(1_000_003 * i + j)
                    base += torch.randn(shape, generator=g) * 0.002
                writer.write(name, base.to(torch.bfloat16))
            writer.add_file("config.json", json.dumps(config, indent=2))
            writer.commit()
    return folders


def _peak_rss_mb() -> float:
    """Peak resident memory in MB (10^6 bytes), as the merge summary prints it."""
    from modelfuse.memory import peak_rss_bytes

    # not ru_maxrss: Linux carries it over from this benchmark's parent process,
    # which may just have generated the checkpoints
    return peak_rss_bytes() / 1e6


def child_io_floor(folders: list[Path], out: Path, threads: int | None) -> dict:
    """Read every input tensor once and write one output of the same size, with as
    many threads as the merges use: no arithmetic, the same I/O."""
    from concurrent.futures import ThreadPoolExecutor

    from modelfuse.checkpoint import CheckpointWriter, open_checkpoint
    from modelfuse.merge.execute import default_threads

    start = time.perf_counter()
    checkpoints = [open_checkpoint(f) for f in folders]
    names = checkpoints[0].keys()
    layout = [(n, tuple(checkpoints[0].info(n).shape), checkpoints[0].info(n).dtype) for n in names]
    with CheckpointWriter(out, layout, overwrite=True) as writer:

        def copy(name: str) -> None:
            tensors = [c.read(name) for c in checkpoints]
            writer.write(name, tensors[0])

        with ThreadPoolExecutor(max_workers=threads or default_threads()) as pool:
            list(pool.map(copy, names))
        writer.commit()
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}


def child_merge(method: str, folders: list[Path], out: Path, threads: int | None) -> dict:
    """``modelfuse merge`` as a user runs it (the command line, in this process).

    As the floor's child does, it imports what it uses before its clock starts
    (the merge engine and the progress bar: a fixed cost of a few tenths of a
    second per process that does not grow with the model)."""
    import yaml

    import modelfuse.merge.engine  # noqa: F401
    import modelfuse.merge.multistage  # noqa: F401
    import modelfuse.progress  # noqa: F401
    from modelfuse.cli import main as cli
    from modelfuse.merge.registry import get_method

    spec = get_method(method)
    models = [str(f) for f in folders]
    config: dict = {"merge_method": method, "parameters": METHOD_PARAMETERS.get(method, {})}
    if spec.uses_base:
        config["base_model"], models = models[0], models[1:]
    if method in MODEL_COUNT:
        models = models[: MODEL_COUNT[method]]
    elif spec.max_models is not None:
        models = models[: spec.max_models]
    config["models"] = models
    path = out.parent / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["merge", str(path), str(out), "--overwrite", "--quiet"]
    if threads is not None:
        args += ["--threads", str(threads)]
    start = time.perf_counter()
    code = cli(args)
    if code != 0:
        raise SystemExit(code)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median of ``values``.

    The order statistics ``x_(k)`` and ``x_(n+1-k)`` (1-based, sorted) cover
    the median with probability ``1 - 2 P(B <= k - 1)``, ``B ~ Binomial(n, 1/2)``,
    whatever the distribution; ``k`` is the largest for which that is at least
    ``level``. None when even the lowest and highest values are not enough
    (fewer than six values at 95 %).

    >>> median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])
    (1.0, 6.0)
    >>> median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    True
    """
    from scipy.stats import binom

    ordered = sorted(values)
    n = len(ordered)
    k = 0
    while k < n // 2 and 2 * binom.cdf(k, n, 0.5) <= 1 - level:
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k]


def run_child(args: argparse.Namespace, what: str, folders: list[Path], out: Path) -> dict:
    command = [
        sys.executable, __file__, "--child", what, "--out", str(out),
        "--folders", *[str(f) for f in folders],
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="where checkpoints are generated once")
    parser.add_argument("--models", type=int, default=3, help="number of checkpoints")
    parser.add_argument("--scale", type=int, default=1, help="multiply the number of layers (2: twice as large)")
    parser.add_argument("--methods", nargs="*", help="methods to run (default: every registered one)")
    parser.add_argument("--threads", type=int, default=None, help="merge threads (default: all cores)")
    parser.add_argument("--repeat", type=int, default=3, help="paired runs (floor, method) per method")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folders", nargs="*", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "io-floor":
            result = child_io_floor(args.folders, args.out, args.threads)
        else:
            result = child_merge(args.child, args.folders, args.out, args.threads)
        print(json.dumps(result))
        return

    from modelfuse.merge.registry import METHODS

    layers = LAYERS * args.scale
    folders = generate(args.cache, args.models, layers)
    size_mb = sum(p.stat().st_size for p in folders[0].glob("*.safetensors")) / 1e6
    # Data-aware methods need statistics files; bench/statistics_speed.py measures them.
    methods = args.methods or sorted(n for n, m in METHODS.items() if not m.statistics)
    print(f"{args.models} checkpoints x {size_mb:.0f} MB ({layers} layers, bfloat16); "
          f"threads={args.threads or os.cpu_count()}")
    scratch = Path(tempfile.mkdtemp(prefix="modelfuse-bench-", dir=args.cache))
    try:
        # Each run of a method is paired with a run of the floor just before it; the ratio
        # is the median of the pairs' ratios, so that the machine's drift (this VM's floor
        # moves between 0.7 and 2 s) cancels out; the pairs' lowest and highest ratios show
        # how far a single pair can be off.
        print(f"{'method':<18} {'seconds':>8} {'floor s':>8} {'x floor':>8} {'95% CI':>11} "
              f"{'pairs':>11} {'peak RSS MB':>12}")
        for method in methods:
            pairs = []
            for _ in range(args.repeat):
                floor = run_child(args, "io-floor", folders, scratch / "out")
                result = run_child(args, method, folders, scratch / "out")
                if "error" in floor:
                    raise SystemExit(f"the I/O floor failed: {floor['error']}")
                if "error" in result:
                    pairs = [(floor, result)]
                    break
                pairs.append((floor, result))
            if "error" in pairs[0][1]:
                print(f"{method:<18} failed: {pairs[0][1]['error']}")
                continue
            ratios = [r["seconds"] / f["seconds"] for f, r in pairs]
            ratio = statistics.median(ratios)
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            interval = median_interval(ratios)
            within = "-" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}"
            seconds = min(r["seconds"] for _, r in pairs)
            floor_seconds = min(f["seconds"] for f, _ in pairs)
            rss = max(r["peak_rss_mb"] for _, r in pairs)
            print(f"{method:<18} {seconds:8.2f} {floor_seconds:8.2f} {ratio:8.2f} {within:>11} "
                  f"{spread:>11} {rss:12.0f}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
