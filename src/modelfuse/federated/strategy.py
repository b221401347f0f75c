"""A Flower strategy whose aggregation is a modelfuse merge method.

This module imports Flower (``pip install 'modelfuse[federated]'``); the rest of
:mod:`modelfuse.federated` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from modelfuse.errors import DataError
from modelfuse.federated.aggregate import prepare_round
from modelfuse.federated.aggregators import AGGREGATORS
from modelfuse.federated.client import STATISTICS_KEY, VARIANCE_KEY
from modelfuse.federated.settings import AggregationSettings
from modelfuse.federated.settings import settings as validate_settings
from modelfuse.federated.updates import ClientUpdate, ServerState, SkippedClient

__all__ = ["MergeStrategy", "client_update"]


def client_update(
    message: Message,
    *,
    arrayrecord_key: str = "arrays",
    weighted_by_key: str = "num-examples",
) -> ClientUpdate:
    """A Flower reply seen as a :class:`~modelfuse.federated.ClientUpdate` (nothing is copied).

    The model is the ArrayRecord under ``arrayrecord_key`` (or the reply's only
    ArrayRecord other than ``fisher`` and ``gram``); the example count and the
    update variance come from the MetricRecord holding ``weighted_by_key``;
    statistics from the ArrayRecords ``fisher`` and ``gram``. What is missing is
    left empty, for :func:`~modelfuse.federated.prepare_round` to report.
    """
    content = message.content
    arrays: Mapping[str, Any] = {}
    records = content.array_records
    if arrayrecord_key in records:
        arrays = records[arrayrecord_key]
    else:
        others = [k for k in records if k not in ("fisher", "gram")]
        if len(others) == 1:
            arrays = records[others[0]]
    num_examples: Any = None
    variance: Any = None
    for record in content.metric_records.values():
        if weighted_by_key in record:
            num_examples = record[weighted_by_key]
            variance = record.get(VARIANCE_KEY)
            break
    return ClientUpdate(
        client=f"node {message.metadata.src_node_id}",
        arrays=arrays,
        num_examples=num_examples,
        fisher=records.get("fisher"),
        gram=records.get("gram"),
        variance=variance,
    )


class MergeStrategy(FedAvg):
    """Flower's FedAvg strategy with any modelfuse aggregation in place of its average.

    Sampling, configuration and evaluation are FedAvg's (Flower's server API
    of ``flwr.serverapp``: ``strategy.start(grid=..., initial_arrays=...)``
    in a ``ServerApp``). Training rounds are aggregated by the method named
    in ``settings`` (see :data:`modelfuse.federated.AGGREGATORS`), tensor by
    tensor. Each training message's ConfigRecord carries
    ``modelfuse-statistics``, the statistics the method needs from every
    client (``fisher``, ``gram``, ``variance`` or empty), which
    :func:`modelfuse.federated.client_reply` packs.

    A bad reply (tensors missing or of another shape, NaN or inf values, a
    missing example count or statistics) is left out of the round with a
    logged warning naming the node and the reason (``on_failure="skip"``), or
    stops the run with one :class:`~modelfuse.errors.DataError` line
    (``"raise"``); the skipped clients are in :attr:`skipped_`.

    Parameters
    ----------
    settings : AggregationSettings or mapping, optional
        The method and its settings; a mapping (e.g. a Flower run configuration's
        ``modelfuse-`` keys) is validated by :func:`modelfuse.federated.settings`.
    **kwargs
        Settings as keywords (``method="ties", density=0.3``), and FedAvg's own
        keywords (``fraction_train``, ``min_available_nodes``, ...).

    Attributes
    ----------
    settings : AggregationSettings
        The validated settings.
    state_ : ServerState
        FedAvgM's momentum and FedAU's participation estimates.
    skipped_ : list of SkippedClient
        Every client left out so far, with the round and the reason.

    Raises
    ------
    ConfigError
        An unknown method or a bad setting, in one line.

    Examples
    --------
    >>> strategy = MergeStrategy(method="fedavgm", server_momentum=0.9, min_available_nodes=4)
    >>> strategy.settings.method, strategy.min_available_nodes
    ('fedavgm', 4)
    """

    _FEDAVG_KEYWORDS = frozenset(
        {
            "fraction_train",
            "fraction_evaluate",
            "min_train_nodes",
            "min_evaluate_nodes",
            "min_available_nodes",
            "arrayrecord_key",
            "configrecord_key",
            "train_metrics_aggr_fn",
            "evaluate_metrics_aggr_fn",
        }
    )

    def __init__(
        self,
        settings: AggregationSettings | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        fedavg = {k: kwargs.pop(k) for k in list(kwargs) if k in self._FEDAVG_KEYWORDS}
        values = settings.model_dump() if isinstance(settings, AggregationSettings) else settings
        validated = validate_settings(values, where="MergeStrategy", **kwargs)
        super().__init__(weighted_by_key=validated.weighted_by_key, **fedavg)
        self.settings = validated
        self.state_ = ServerState()
        self.skipped_: list[SkippedClient] = []
        self._global: ArrayRecord | None = None
        self._nodes: list[str] = []

    def summary(self) -> None:
        """Log the aggregation and FedAvg's sampling settings."""
        aggregator = AGGREGATORS[self.settings.method]
        log(INFO, "\t├──> modelfuse aggregation: %s (%s)", aggregator.name, aggregator.summary)
        log(INFO, "\t│\t└── on failure: %s", self.settings.on_failure)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; the message also asks for the statistics the method reads."""
        self._global = arrays
        self._nodes = [f"node {node}" for node in grid.get_node_ids()]
        needs = AGGREGATORS[self.settings.method].statistics(self.settings)
        config[STATISTICS_KEY] = ",".join(needs)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, then merge the kept ones with the configured method.

        Returns ``(None, None)`` (the global model stays as it is) when no reply
        can be aggregated.
        """
        valid, _errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        if self._global is None:
            raise DataError(
                f"round {server_round}: aggregate_train was called before configure_train, so "
                "there is no global model to aggregate into; run the strategy with start()"
            )
        updates = [
            client_update(
                message,
                arrayrecord_key=self.arrayrecord_key,
                weighted_by_key=self.weighted_by_key,
            )
            for message in valid
        ]
        prepared = prepare_round(
            self._global,
            updates,
            self.settings,
            state=self.state_,
            server_round=server_round,
            clients=self._nodes,
        )
        for skipped in prepared.skipped:
            log(WARNING, "modelfuse: %s", skipped)
        self.skipped_.extend(prepared.skipped)
        if not prepared.kept:
            log(
                WARNING,
                "modelfuse: round %s: no client reply could be aggregated; the global model "
                "stays as it was",
                server_round,
            )
            return None, None
        record = ArrayRecord()
        for name, tensor in prepared.tensors():
            record[name] = Array(tensor.numpy())
        kept = {update.client for update in prepared.kept}
        contents = [
            message.content for message in valid if f"node {message.metadata.src_node_id}" in kept
        ]
        return record, self._metrics(self.train_metrics_aggr_fn, contents, server_round)

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """FedAvg's weighted average of the metrics; inconsistent replies are logged, not raised."""
        try:
            return super().aggregate_evaluate(server_round, list(replies))
        except InconsistentMessageReplies as error:
            log(
                WARNING,
                "modelfuse: round %s: evaluation metrics not aggregated: %s",
                server_round,
                error,
            )
            return None

    def _metrics(
        self,
        function: Callable[[list[RecordDict], str], MetricRecord],
        contents: list[RecordDict],
        server_round: int,
    ) -> MetricRecord | None:
        try:
            return function(contents, self.weighted_by_key)
        except (InconsistentMessageReplies, KeyError, TypeError, ValueError) as error:
            log(
                WARNING,
                "modelfuse: round %s: training metrics not aggregated: %s",
                server_round,
                error,
            )
            return None
