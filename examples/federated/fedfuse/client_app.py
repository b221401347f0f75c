"""The ClientApp: train on this node's share, send the model and what the server's method reads."""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfuse.task import build_model, client_data, evaluate, train
from modelfuse.federated import client_reply, client_statistics, requested_statistics

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """Local SGD from the global model, then the reply with the requested statistics."""
    model = build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y, _x_val, _y_val = client_data(*_partition(context))
    config = msg.content["config"]
    loss, snapshots = train(
        model,
        x,
        y,
        epochs=int(context.run_config["local-epochs"]),
        learning_rate=float(context.run_config["learning-rate"]),
        batch_size=int(context.run_config["batch-size"]),
        seed=int(config["server-round"]) * 1000 + _partition(context)[0],
    )
    if _partition(context)[0] == int(context.run_config["nan-partition"]):
        with torch.no_grad():  # the demonstration of a broken client: the server skips it
            next(model.parameters()).view(-1)[0] = float("nan")
    needs = requested_statistics(config)
    statistics = client_statistics(model, [(x, y)], needs, snapshots=snapshots)
    content = client_reply(model, len(y), statistics=statistics, metrics={"train-loss": loss})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_round(msg: Message, context: Context) -> Message:
    """The global model on this node's held-out share."""
    model = build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _x, _y, x_val, y_val = client_data(*_partition(context))
    loss, accuracy = evaluate(model, x_val, y_val)
    metrics = MetricRecord(
        {"eval-loss": loss, "eval-accuracy": accuracy, "num-examples": len(y_val)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
