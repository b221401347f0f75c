"""The ServerApp: MergeStrategy with the run configuration's modelfuse- settings."""

from __future__ import annotations

import json
import os
import tempfile
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from safetensors.torch import save_file

from fedfuse.task import build_model, central_test_set, evaluate
from modelfuse.errors import ModelfuseError
from modelfuse.federated import MergeStrategy, settings

app = ServerApp()


def _central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = build_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = evaluate(model, *central_test_set())
    return MetricRecord({"loss": loss, "accuracy": accuracy})


def _write(path: Path, arrays: ArrayRecord, history: dict[int, MetricRecord]) -> None:
    """The final model (safetensors) and the accuracy per round (JSON beside it), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
    rounds = {str(r): dict(metrics) for r, metrics in sorted(history.items())}
    for target, write in (
        (path.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(rounds, indent=1))),
        (path, lambda p: save_file(state, p)),
    ):
        handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{target.name}.")
        os.close(handle)
        try:
            write(staging)
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds; a bad setting or, with on-failure = raise, a bad client reply ends the
    run with one logged line and no model written."""
    config = context.run_config
    nodes = int(config["min-nodes"])
    try:
        aggregation = settings(
            {k: v for k, v in config.items() if k.startswith("modelfuse-")}, where="run config"
        )
        strategy = MergeStrategy(
            aggregation, min_train_nodes=nodes, min_evaluate_nodes=nodes, min_available_nodes=nodes
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(build_model().state_dict()),
            num_rounds=int(config["num-server-rounds"]),
            evaluate_fn=_central_evaluation,
        )
    except ModelfuseError as error:
        log(ERROR, "modelfuse: %s", error)
        return
    out = Path(str(config["out"])).expanduser().resolve()
    _write(out, result.arrays, result.evaluate_metrics_serverapp)
    skipped = len(strategy.skipped_)
    log(INFO, "modelfuse: wrote %s (%d client replies skipped)", out, skipped)
