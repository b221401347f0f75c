"""Search throughput: candidates per second with 1 and 2 workers, measured in the same run.

One grid search (``task_arithmetic`` over ``--candidates`` values of lambda,
four fine-tuned copies of a 784-512-512-10 MLP, each candidate merged and
scored by ``nll_score`` on ``--examples`` held-out examples) is timed end to
end, start-up of the worker processes included:

- 1 worker: ``executor=None`` (in this process, torch limited to 1 thread so
  that one worker is one core);
- 2 workers: ``LocalExecutor(workers=2)`` (spawned processes, 1 thread each);
- with Ray installed, a local Ray instance of 2 CPUs: ``RayExecutor(num_cpus=2)``
  (one task at a time: 1 worker) and ``RayExecutor(num_cpus=1)`` (2 workers).
  Ray keeps its worker processes between calls, so they are started (and
  import torch) once, before the rows are timed, as on a running cluster.

Every run returns the same trace (checked). Each row runs ``--rounds`` times,
1 and 2 workers alternating; the table gives medians, and the ratio is the
2-worker throughput over the 1-worker throughput of the same executor kind.
The Ray task of the 1-worker row holds both CPUs, so torch may use two threads
in it. Process
start-up (spawning, importing torch, receiving the models) is part of the
2-worker local time; it is also measured alone (a fresh pool running one
torch call) and printed, with the throughput once it is paid.

    python bench/search_scaling.py
    python bench/search_scaling.py --candidates 64 --examples 8192 --no-ray
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from modelfuse.executors import LocalExecutor, RayExecutor
from modelfuse.search import SearchResult, grid_search, nll_score


def problem(examples: int) -> tuple[dict, list[dict], Callable]:
    """A base MLP, four perturbed fine-tunes and a held-out score; nothing is downloaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fine_tuned = [{k: v + 0.02 * torch.randn_like(v) for k, v in base.items()} for _ in range(4)]
    x = torch.randn(examples, 784)
    y = torch.randint(0, 10, (examples,))
    score = nll_score(model, [(x[i : i + 1024], y[i : i + 1024]) for i in range(0, examples, 1024)])
    return base, fine_tuned, score


def timed(run: Callable[[], SearchResult]) -> tuple[float, SearchResult]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--examples", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each row (medians)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    args = parser.parse_args()

    base, fine_tuned, score = problem(args.examples)
    space = {"lambda": [0.1 + 0.9 * i / (args.candidates - 1) for i in range(args.candidates)]}

    def search(executor: object) -> Callable[[], SearchResult]:
        return lambda: grid_search(
            "task_arithmetic", fine_tuned, base, space, score, executor=executor  # type: ignore[arg-type]
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds: dict[tuple[str, int], list[float]] = {}
    reference: list[float] = []

    def record(label: str, workers: int, run: Callable[[], SearchResult]) -> None:
        took, result = timed(run)
        scores = [c.score for c in result.trace]
        if not reference:
            reference.extend(scores)
        elif scores != reference:
            raise SystemExit(f"{label} with {workers} workers gave another trace")
        seconds.setdefault((label, workers), []).append(took)
        print(f"{label:<6} {workers} worker(s): {args.candidates / took:6.2f} candidates/s "
              f"({took:.2f} s)", flush=True)

    print(f"grid search, {args.candidates} candidates, 4 MLPs of "
          f"{sum(v.numel() for v in base.values()) / 1e6:.2f} M parameters, "
          f"{args.examples} held-out examples, {os.cpu_count()} CPUs, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    startups = []
    for _ in range(args.rounds):  # 1 and 2 workers alternate, so load changes hit both
        record("local", 1, search(None))
        with LocalExecutor(workers=2) as executor:
            record("local", 2, search(executor))
        with LocalExecutor(workers=2) as executor:
            start = time.perf_counter()
            executor.map(functools.partial(torch.zeros, 1), [1, 2])  # spawn and import torch
            startups.append(time.perf_counter() - start)
    startup = statistics.median(startups)
    two = statistics.median(seconds["local", 2])
    print(f"start-up of 2 worker processes alone: {startup:.2f} s (median); "
          f"{args.candidates / max(two - startup, 1e-9):.2f} candidates/s once paid")

    ray = None
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            print("Ray is not installed: no Ray rows (pip install 'modelfuse[ray]')")
    if ray is not None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            # Ray keeps its worker processes between calls: start two first (each imports
            # torch), as a running cluster would have them
            RayExecutor(num_cpus=1).map(functools.partial(torch.zeros, 1), [1, 2])
            for _ in range(args.rounds):
                record("ray", 1, search(RayExecutor(num_cpus=2)))
                record("ray", 2, search(RayExecutor(num_cpus=1)))
        finally:
            ray.shutdown()
    torch.set_num_threads(threads)

    print(f"\nmedians of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f} at the end")
    print("| executor | candidates/s, 1 worker | candidates/s, 2 workers | ratio |")
    print("|---|---|---|---|")
    for label in dict.fromkeys(label for label, _ in seconds):
        one = statistics.median(seconds[label, 1])
        two = statistics.median(seconds[label, 2])
        print(f"| {label} | {args.candidates / one:.2f} | {args.candidates / two:.2f} | "
              f"{one / two:.2f}x |")


if __name__ == "__main__":
    main()
