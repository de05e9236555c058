"""Retrieval metrics: recall@K, median / mean rank, rsum, the evaluation protocols, and MTFN
re-ranking of a score matrix (:func:`mtfn_rerank`, scored by :func:`recall_from_orders`)."""

from itm.metrics.protocols import PROTOCOLS, ensemble, evaluate_protocol
from itm.metrics.recall import (
    METRIC_KEYS,
    CrossModalRecall,
    ranks_i2t_t2i,
    recall_at_k,
    recall_from_ranks,
)
from itm.metrics.rerank import RerankSpec, mtfn_rerank, recall_from_orders

__all__ = [
    "METRIC_KEYS",
    "PROTOCOLS",
    "RerankSpec",
    "CrossModalRecall",
    "ensemble",
    "evaluate_protocol",
    "mtfn_rerank",
    "ranks_i2t_t2i",
    "recall_at_k",
    "recall_from_orders",
    "recall_from_ranks",
]
