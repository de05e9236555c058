"""Retrieval metrics: recall@K, median / mean rank, rsum, and the evaluation protocols."""

from itm.metrics.protocols import PROTOCOLS, ensemble, evaluate_protocol
from itm.metrics.recall import (
    METRIC_KEYS,
    RetrievalRecall,
    ranks_i2t_t2i,
    recall_at_k,
    recall_from_ranks,
)

__all__ = [
    "METRIC_KEYS",
    "PROTOCOLS",
    "RetrievalRecall",
    "ensemble",
    "evaluate_protocol",
    "ranks_i2t_t2i",
    "recall_at_k",
    "recall_from_ranks",
]
