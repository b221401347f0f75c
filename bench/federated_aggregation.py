"""Server-side aggregation time per round: modelfuse's merge methods against Flower's FedAvg.

The same round for every aggregator: N client updates (ArrayRecords with an
example count) of an MLP-sized model, aggregated by Flower's own
``aggregate_arrayrecords`` (what its FedAvg strategy calls) and by
:func:`modelfuse.federated.prepare_round` with each method, every merged
tensor produced. Prints seconds per round (best of --repeat) and the ratio to
Flower's FedAvg measured in the same run.

    python bench/federated_aggregation.py
    python bench/federated_aggregation.py --clients 20 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10, help="client updates per round")
    parser.add_argument("--layers", type=int, default=8, help="512 x 512 layers of the model")
    parser.add_argument("--repeat", type=int, default=3, help="rounds timed per aggregator")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--methods", nargs="*", default=["linear", "fedavgm", "ties", "residual"],
        help="modelfuse aggregation methods to time",
    )
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        import torch
        from flwr.app import ArrayRecord, MetricRecord, RecordDict
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
    except ImportError:
        raise SystemExit("needs Flower: pip install 'modelfuse[federated]'") from None
    from modelfuse.federated import AggregationSettings, ClientUpdate, prepare_round

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shapes = {f"l{i}.weight": (512, 512) for i in range(args.layers)}
    shapes |= {f"l{i}.bias": (512,) for i in range(args.layers)}
    start = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    records = []
    for c in range(args.clients):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in start.items()}
        records.append(
            RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 100 + c})})
        )
    global_arrays = ArrayRecord(start)

    def flower() -> None:
        aggregate_arrayrecords(records, "num-examples")

    def ours(method: str) -> None:
        updates = [
            ClientUpdate(f"c{i}", r["arrays"], r["metrics"]["num-examples"])
            for i, r in enumerate(records)
        ]
        prepared = prepare_round(global_arrays, updates, AggregationSettings(method=method))
        for _ in prepared.tensors():
            pass

    def best(function) -> float:
        function()  # warm-up
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
        return min(times)

    parameters = sum(int(torch.Size(s).numel()) for s in shapes.values())
    print(f"{args.clients} clients x {parameters / 1e6:.2f}M parameters, {args.threads} torch threads")
    reference = best(flower)
    print(f"{'aggregator':<22}{'s/round':>9}{'x FedAvg':>10}")
    print(f"{'Flower FedAvg':<22}{reference:>9.3f}{1.0:>10.2f}")
    for method in args.methods:
        seconds = best(lambda method=method: ours(method))
        print(f"{'modelfuse ' + method:<22}{seconds:>9.3f}{seconds / reference:>10.2f}")


if __name__ == "__main__":
    main()
