"""Models: encoders, alignment heads, pooling, similarity, loss and the LightningModule."""

from itm.models.loss import ContrastiveLoss
from itm.models.penalty import weight_norm_penalty
from itm.models.pooling import AvgPool, LSEPool, MaxPool, SumPool
from itm.models.similarity import Similarity

__all__ = [
    "AvgPool",
    "ContrastiveLoss",
    "LSEPool",
    "MaxPool",
    "Similarity",
    "SumPool",
    "weight_norm_penalty",
]
