"""Fisher diagonal speed (batched torch.func against a per-example loop) and Fisher merge memory.

Part 1, measured in one run on the same model and data: the diagonal Fisher of
an MLP of about 1M parameters (784-1000-200-10) over 4096 examples, with

- ``modelfuse.statistics.fisher_diagonal`` (batched per-example gradients with
  torch.func, linear-layer shortcut on: the default);
- the same with ``linear_shortcut=False`` (every per-example gradient materialised);
- a per-example loop: one ``torch.autograd.grad`` per example and class.

All three give the same numbers (checked); the ratios are loop / batched.

Part 2: peak memory of ``modelfuse.merge`` with ``merge_method: fisher`` on the
merge benchmark's checkpoints (bench/merge_speed.py, generated once into
--cache) with stand-in Fisher files (float32, one per model), in a fresh process.

    python bench/statistics_speed.py
    python bench/statistics_speed.py --kind empirical --loop-examples 1024 --skip-merge
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(), nn.Linear(200, 10)
    ).eval()


def loop_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> dict:
    """The naive reference: one autograd call per example and class."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    sums = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1]), -1)[0]
        classes = range(logp.shape[0]) if kind == "exact" else [int(y[i])]
        for c in classes:
            weight = float(logp[c].detach().exp()) if kind == "exact" else 1.0
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            for n, g in zip(names, grads):
                sums[n].add_(g.square(), alpha=weight)
    return {n: s / len(x) for n, s in sums.items()}


def speed(args: argparse.Namespace) -> None:
    from modelfuse.statistics import fisher_diagonal

    model = mlp()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.examples, 784, generator=g)
    y = torch.randint(0, 10, (args.examples,), generator=g)
    batches = [
        (x[i : i + args.batch_size], y[i : i + args.batch_size])
        for i in range(0, len(x), args.batch_size)
    ]
    print(
        f"MLP 784-1000-200-10: {n_params:,} parameters; {args.examples} examples; "
        f"{args.kind} Fisher; torch threads {torch.get_num_threads()}"
    )

    start = time.perf_counter()
    fast = fisher_diagonal(model, batches, n_examples=args.examples, kind=args.kind)
    t_fast = time.perf_counter() - start

    n_general = min(args.general_examples, args.examples)
    start = time.perf_counter()
    general = fisher_diagonal(
        model, batches, n_examples=n_general, kind=args.kind, linear_shortcut=False
    )
    t_general = (time.perf_counter() - start) * args.examples / n_general

    n_loop = min(args.loop_examples, args.examples)
    start = time.perf_counter()
    loop = loop_fisher(model, x[:n_loop], y[:n_loop], args.kind)
    t_loop = (time.perf_counter() - start) * args.examples / n_loop

    reference = fisher_diagonal(model, batches, n_examples=n_loop, kind=args.kind)
    materialised_reference = fisher_diagonal(model, batches, n_examples=n_general, kind=args.kind)

    def difference(a: dict, b: dict) -> float:
        """max over tensors of ||a - b|| / ||b|| (entry-wise maxima are dominated by ReLU kinks)."""
        return max(
            float(torch.linalg.vector_norm(a[k] - b[k]) / torch.linalg.vector_norm(b[k])) for k in b
        )

    error = difference(reference, loop)
    error_general = difference(general, materialised_reference)
    del fast

    def note(n: int) -> str:
        return "" if n == args.examples else f"  (timed on {n} examples, scaled to {args.examples})"

    print(f"{'method':<44} {'seconds':>9} {'loop / this':>12}")
    print(
        f"{'per-example loop (autograd per example+class)':<44} {t_loop:9.2f} {1.0:12.1f}"
        + note(n_loop)
    )
    print(
        f"{'torch.func vmap, every gradient materialised':<44} {t_general:9.2f} "
        f"{t_loop / t_general:12.1f}" + note(n_general)
    )
    print(
        f"{'torch.func vmap + linear shortcut (default)':<44} {t_fast:9.2f} {t_loop / t_fast:12.1f}"
    )
    print(
        f"relative L2 difference, batched vs loop: {error:.2e}; shortcut vs materialised: "
        f"{error_general:.2e}"
    )
    target = "met" if t_loop / t_fast >= 10 else "NOT met"
    print(f"target >= 10x faster than the loop: {target} ({t_loop / t_fast:.1f}x)")


def _merge_benchmark():
    path = Path(__file__).with_name("merge_speed.py")
    spec = importlib.util.spec_from_file_location("merge_speed", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def stand_in_fishers(folders: list[Path], cache: Path) -> list[Path]:
    """A float32 Fisher-like file per model (squares of random values), written once."""
    from safetensors.torch import save_file

    from modelfuse.checkpoint import open_checkpoint

    files = []
    for i, folder in enumerate(folders):
        path = cache / f"{folder.name}.fisher.safetensors"
        files.append(path)
        if path.is_file():
            continue
        print(f"writing stand-in Fisher {path} ...", flush=True)
        checkpoint = open_checkpoint(folder)
        tensors = {}
        for j, name in enumerate(checkpoint.keys()):
            g = torch.Generator().manual_seed(7919 * i + j)
            shape = tuple(checkpoint.info(name).shape)
            tensors[name] = torch.randn(shape, generator=g).square_()
        checkpoint.close()
        save_file(tensors, str(path))
        del tensors
    return files


def child_merge(args: argparse.Namespace) -> None:
    import modelfuse
    from modelfuse.memory import peak_rss_bytes

    config = json.loads(args.config)
    start = time.perf_counter()
    modelfuse.merge(config, args.out, threads=args.threads, overwrite=True)
    peak = peak_rss_bytes() / 1e6  # MB, 10^6 bytes; this process only, not its parent's peak
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak}))


def merge_memory(args: argparse.Namespace) -> None:
    bench = _merge_benchmark()
    args.cache.mkdir(parents=True, exist_ok=True)
    folders = bench.generate(args.cache, args.models, bench.LAYERS)
    fishers = stand_in_fishers(folders, args.cache)
    size = sum(p.stat().st_size for p in folders[0].glob("*.safetensors")) / 1e6
    fsize = fishers[0].stat().st_size / 1e6
    config = {
        "merge_method": "fisher",
        "models": [{"model": str(m), "statistics": str(f)} for m, f in zip(folders, fishers)],
    }
    scratch = Path(tempfile.mkdtemp(prefix="modelfuse-bench-", dir=args.cache))
    try:
        results = {}
        for label, cfg in [
            ("linear", {"merge_method": "linear", "models": [str(m) for m in folders]}),
            ("fisher", config),
        ]:
            command = [
                sys.executable,
                __file__,
                "--child-merge",
                "--config",
                json.dumps(cfg),
                "--out",
                str(scratch / label),
            ]
            if args.threads is not None:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{label} merge failed: {done.stderr.strip().splitlines()[-1:]}")
                return
            results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{args.models} checkpoints x {size:.0f} MB (bfloat16) + Fisher files x {fsize:.0f} MB "
            "(float32)"
        )
        print(f"{'merge':<8} {'seconds':>8} {'peak RSS MB':>12}")
        for label, r in results.items():
            print(f"{label:<8} {r['seconds']:8.2f} {r['peak_rss_mb']:12.0f}")
        peak = results["fisher"]["peak_rss_mb"]
        print(
            f"target: Fisher merge peak memory < 1 GB: {'met' if peak < 1024 else 'NOT met'} "
            f"({peak:.0f} MB)"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=4096, help="examples in the Fisher")
    parser.add_argument("--batch-size", type=int, default=512, help="examples per batch")
    parser.add_argument("--kind", choices=["exact", "empirical"], default="exact")
    parser.add_argument(
        "--loop-examples",
        type=int,
        default=1024,
        help="examples the loop is timed on (scaled up to --examples)",
    )
    parser.add_argument(
        "--general-examples",
        type=int,
        default=512,
        help="examples the materialising path is timed on (scaled up)",
    )
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--skip-merge", action="store_true", help="only the Fisher speed part")
    parser.add_argument("--skip-speed", action="store_true", help="only the merge memory part")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("bench/.cache"),
        help="where the merge benchmark's checkpoints are generated once",
    )
    parser.add_argument("--models", type=int, default=3, help="checkpoints merged")
    parser.add_argument("--threads", type=int, default=None, help="merge threads")
    parser.add_argument("--child-merge", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_merge:
        child_merge(args)
        return
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    if not args.skip_speed:
        speed(args)
    if not args.skip_merge:
        merge_memory(args)


if __name__ == "__main__":
    main()
